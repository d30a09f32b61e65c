"""Analysis configs hold one GenerationConfig (issue 24): old keywords and reads still work
with a DeprecationWarning, old saved forms load, and an unchanged run keeps its identity."""

from __future__ import annotations

import dataclasses
import json

import pytest

from rhlens.engine import GenerationConfig, KernelPolicy
from rhlens.errors import ConfigError
from rhlens.families import FamiliesConfig
from rhlens.niah import NIAHConfig
from rhlens.retrieval import DetectConfig
from rhlens.store.identity import run_header
from rhlens.store.logs import ProbeLog, header_path
from rhlens.store.results import Config

# What rhlens 0.x (before configs held a GenerationConfig) saved for the default configs:
# written out by hand, not computed by the code under test.
OLD_NIAH = {"type": "NIAHConfig", "max_new_tokens": 50, "stop_at_newline": True,
            "success_threshold": 0.5, "prefill_chunk": None}
OLD_DETECT = {"type": "DetectConfig", "mode": "unique", "success_threshold": 0.5,
              "max_new_tokens": 50, "stop_at_newline": True, "prefill_chunk": None,
              "reuse_prefix": True, "batch_size": 8, "policy": None}


def test_configs_hold_a_generation_config():
    assert [f.name for f in dataclasses.fields(NIAHConfig)] == ["success_threshold", "generation"]
    assert [f.name for f in dataclasses.fields(DetectConfig)] == ["mode", "success_threshold", "generation"]
    assert NIAHConfig().generation == GenerationConfig()
    assert DetectConfig().generation == GenerationConfig(batch_size=8)  # detection's default batch
    with pytest.raises(ConfigError, match="generation must be a GenerationConfig"):
        NIAHConfig(generation={"max_new_tokens": 3})


@pytest.mark.parametrize("cls, old", [(NIAHConfig, {"max_new_tokens": 20, "prefill_chunk": 64}),
                                      (DetectConfig, {"max_new_tokens": 9, "batch_size": 2,
                                                      "reuse_prefix": False,
                                                      "policy": KernelPolicy(rows="batch")})])
def test_old_keywords_warn_and_land_in_generation(cls, old):
    hint = rf"{cls.__name__}\(\.\.\.\)\.with_generation\(max_new_tokens="
    with pytest.warns(DeprecationWarning, match=hint):
        made = cls(success_threshold=0.3, **old)
    assert made == cls(success_threshold=0.3,
                       generation=dataclasses.replace(cls().generation, **old))
    for name, value in old.items():
        with pytest.warns(DeprecationWarning, match=f"config.generation.{name}"):
            assert getattr(made, name) == value
    # a setting given both ways: the keyword wins over the GenerationConfig's
    with pytest.warns(DeprecationWarning):
        both = cls(generation=GenerationConfig(max_new_tokens=5, stop_at_newline=False),
                   max_new_tokens=6)
    assert both.generation.max_new_tokens == 6 and both.generation.stop_at_newline is False
    with pytest.warns(DeprecationWarning):  # dataclasses.replace with an old name works too
        assert dataclasses.replace(made, max_new_tokens=11).generation.max_new_tokens == 11
    with pytest.raises(ConfigError, match="max_new_tokens"), pytest.warns(DeprecationWarning):
        cls(max_new_tokens=0)


def test_default_configs_save_as_earlier_versions_did():
    assert NIAHConfig().to_dict() == OLD_NIAH
    assert DetectConfig().to_dict() == OLD_DETECT
    assert FamiliesConfig().to_dict()["detect"] == {"__config__": OLD_DETECT}
    # earlier versions' saved forms load as the configs they describe
    assert Config.from_dict(OLD_NIAH) == NIAHConfig()
    assert Config.from_dict({**OLD_DETECT, "max_new_tokens": 24, "batch_size": 3}) == DetectConfig(
        generation=GenerationConfig(max_new_tokens=24, batch_size=3))


@pytest.mark.parametrize("config", [
    NIAHConfig(generation=GenerationConfig(stop_at_eos=False, max_new_tokens=7, batch_size=4)),
    NIAHConfig(generation=GenerationConfig(policy=KernelPolicy(rows="batch"))),
    DetectConfig(mode="paper", generation=GenerationConfig(policy=KernelPolicy(expand_kv=True))),
    FamiliesConfig(detect=DetectConfig(generation=GenerationConfig(lean_decode=False))),
])
def test_any_config_round_trips_through_json(config):
    back = Config.from_dict(json.loads(json.dumps(config.to_dict())))
    assert back == config and type(back) is type(config)


def test_settings_of_older_files_load_flat_or_nested():
    assert DetectConfig.from_settings({"max_new_tokens": 24, "dropped": 1}) == DetectConfig(
        generation=GenerationConfig(max_new_tokens=24, batch_size=8))
    nested = {"success_threshold": 0.4, "generation": {"max_new_tokens": 12, "stop_at_newline": False,
                                                       "policy": {"rows": "batch"}}}
    assert NIAHConfig.from_settings(nested) == NIAHConfig(
        success_threshold=0.4, generation=GenerationConfig(max_new_tokens=12, stop_at_newline=False,
                                                           policy=KernelPolicy(rows="batch")))
    assert NIAHConfig.from_settings({"unrelated": 1}) is None
    with pytest.raises(ConfigError, match="not both"):
        Config.from_dict({**OLD_NIAH, "generation": {"__config__": {"type": "GenerationConfig"}}})


def _identity_of_old_code(settings: dict) -> dict:
    """The ``config`` part of a run's identity as rhlens wrote it before (batch_size and
    reuse_prefix recorded only): by hand."""
    return {k: v for k, v in settings.items() if k not in ("batch_size", "reuse_prefix")}


@pytest.mark.parametrize("config, old", [(NIAHConfig(), OLD_NIAH), (DetectConfig(), OLD_DETECT)])
def test_an_unchanged_run_keeps_its_identity_and_resumes(tmp_path, config, old):
    assert run_header(None, None, config).identity == {"config": _identity_of_old_code(old)}
    # a folder an earlier version wrote (its run.json by hand) resumes with today's config
    out = tmp_path / "run"
    out.mkdir()
    header_path(out, "probes.jsonl").write_text(json.dumps(
        {"identity": {"config": _identity_of_old_code(old)},
         "recorded": {"config": {"batch_size": old.get("batch_size", 1)}}}))
    log = ProbeLog(out, run_header(None, None, config))
    log.append({"key": "p0"})
    # a generation setting the old config did not have is part of the identity once changed
    changed = dataclasses.replace(config, generation=dataclasses.replace(config.generation,
                                                                         stop_at_eos=False))
    with pytest.raises(ConfigError, match=r"config.stop_at_eos: None -> False"):
        ProbeLog(tmp_path / "run", run_header(None, None, changed))


def test_with_generation_keeps_the_configs_defaults():
    d = DetectConfig(mode="paper").with_generation(max_new_tokens=32)
    assert d == DetectConfig(mode="paper", generation=GenerationConfig(max_new_tokens=32, batch_size=8))
    n = NIAHConfig(success_threshold=0.2).with_generation(prefill_chunk=64, stop_at_newline=False)
    assert n.success_threshold == 0.2 and n.generation == GenerationConfig(prefill_chunk=64,
                                                                           stop_at_newline=False)
    with pytest.raises(ConfigError, match="not generation settings: mode"):
        NIAHConfig().with_generation(mode="paper")
    with pytest.raises(ConfigError, match="max_new_tokens"):
        NIAHConfig().with_generation(max_new_tokens=0)
