"""The save/load protocol every result follows (rhlens.results)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import pytest
import torch

from rhlens.errors import ConfigError
from rhlens.results import Config, Result, ResultError, load_result


@dataclass(frozen=True)
class _ToyConfig(Config):
    ks: tuple[int, ...] = (1, 2)
    name: str = "toy"

    def __post_init__(self) -> None:
        object.__setattr__(self, "ks", tuple(self.ks))
        if any(k < 0 for k in self.ks):
            raise ConfigError("ks must be >= 0")


@dataclass
class _Inner(Result):
    values: torch.Tensor
    label: str = ""


@dataclass
class _Outer(Result):
    grid: torch.Tensor
    flags: torch.Tensor
    config: _ToyConfig
    inner: _Inner
    parts: list = field(default_factory=list)
    pair: tuple[int, int] = (0, 0)
    meta: dict = field(default_factory=dict)
    ratio: float = float("nan")


def _outer() -> _Outer:
    return _Outer(grid=torch.randn(3, 4), flags=torch.tensor([True, False, True]),
                  config=_ToyConfig(ks=(3, 5)), inner=_Inner(torch.arange(5), "a"),
                  parts=[_Inner(torch.ones(2), "p0"), _Inner(torch.zeros(3), "p1")],
                  pair=(2, 7), meta={"note": "x", "nested": [1, 2]})


def test_round_trip_keeps_types(tmp_path):
    res = _outer()
    res.save(tmp_path / "r")
    back = _Outer.load(tmp_path / "r")
    assert torch.equal(back.grid, res.grid) and back.flags.dtype == torch.bool
    assert torch.equal(back.flags, res.flags)
    assert back.config == res.config and isinstance(back.config, _ToyConfig)
    assert isinstance(back.inner, _Inner) and torch.equal(back.inner.values, res.inner.values)
    assert [p.label for p in back.parts] == ["p0", "p1"]
    assert back.pair == (2, 7) and back.meta == res.meta
    assert back.ratio != back.ratio  # NaN survives
    assert isinstance(load_result(tmp_path / "r"), _Outer)
    doc = json.loads((tmp_path / "r" / "result.json").read_text())
    assert doc["kind"] == "_Outer" and doc["schema_version"] == 1


def test_wrong_kind_damage_and_newer_versions_are_clear_errors(tmp_path):
    _outer().save(tmp_path / "r")
    with pytest.raises(ResultError, match="not a _Inner"):
        _Inner.load(tmp_path / "r")
    with pytest.raises(ResultError, match="does not exist"):
        _Outer.load(tmp_path / "missing")
    (tmp_path / "f").write_text("x")
    with pytest.raises(ResultError, match="is a file"):
        _Outer.load(tmp_path / "f")
    doc = json.loads((tmp_path / "r" / "result.json").read_text())
    doc["schema_version"] = 99
    (tmp_path / "r" / "result.json").write_text(json.dumps(doc))
    with pytest.raises(ResultError, match="newer rhlens"):
        _Outer.load(tmp_path / "r")
    (tmp_path / "r" / "result.json").write_text('{"kind": ')
    with pytest.raises(ResultError, match="damaged"):
        _Outer.load(tmp_path / "r")
    _outer().save(tmp_path / "s")
    (tmp_path / "s" / "tensors.safetensors").write_bytes(b"garbage")
    with pytest.raises(ResultError, match="damaged"):
        _Outer.load(tmp_path / "s")


def test_config_from_dict_validates_and_refuses_unknown_settings():
    cfg = _ToyConfig(ks=(4,))
    assert Config.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match="no setting"):
        _ToyConfig.from_dict({"type": "_ToyConfig", "ks": [1], "bogus": 2})
    with pytest.raises(ConfigError, match="ks must be"):
        _ToyConfig.from_dict({"ks": [-1]})


def test_unsaveable_values_fail_at_save_time(tmp_path):
    res = _outer()
    res.meta["bad"] = object()
    with pytest.raises(ResultError, match="cannot save"):
        res.save(tmp_path / "r")


Head = tuple[int, int]


@dataclass
class _Nested(Result):
    heads: list[Head]
    rows: tuple[tuple[int, int, float], ...]
    interval: tuple[float, float] | None = None
    by_name: dict[str, list[Head]] = field(default_factory=dict)


def test_tuples_inside_lists_and_unions_come_back_as_tuples(tmp_path):
    """JSON has only lists: a field annotated with tuples (at any depth, also inside an
    Optional or a dict) must load as tuples, or the loaded result differs from the saved one
    (and fails the runtime type check of its own constructor)."""
    res = _Nested(heads=[(1, 2), (0, 3)], rows=((1, 2, 0.5),), interval=(0.1, 0.9),
                  by_name={"a": [(4, 5)]})
    back = _Nested.load(res.save(tmp_path / "n"))
    assert back == res
    assert isinstance(back.heads[0], tuple) and isinstance(back.rows[0], tuple)
    assert isinstance(back.interval, tuple) and isinstance(back.by_name["a"][0], tuple)
    none = _Nested(heads=[], rows=())
    assert _Nested.load(none.save(tmp_path / "m")) == none


def test_load_result_imports_the_kind_it_finds(tmp_path):
    """``rhlens.load_result`` reads a saved result in a fresh interpreter that has imported
    nothing of its kind's module (here the score families')."""
    import subprocess
    import sys

    from rhlens.families import FamilyScores

    FamilyScores(per_probe=torch.rand(2, 3, 4), success=torch.tensor([True, False]),
                 model_name="toy", probes=[{"key": "a"}, {"key": "b"}],
                 family="mass").save(tmp_path / "fam")
    code = ("import sys, rhlens; r = rhlens.load_result(sys.argv[1]); "
            "assert 'rhlens.families' in sys.modules; print(type(r).__name__, r.family)")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "fam")], capture_output=True,
                         text=True, check=True).stdout.split()
    assert out == ["FamilyScores", "mass"]
