"""score_families runs on the one resumable loop (distributed.Sweep): a run cut short answers
only what its log lacks, and ends with the records an uninterrupted run has."""

from __future__ import annotations

import json

import pytest

from rhlens.engine import GenerationConfig
from rhlens.errors import ConfigError
from rhlens.families import FamiliesConfig, score_families
from rhlens.probe import Probe
from rhlens.retrieval import DetectConfig

from toy import make_toy_probe


def _probes(tok, n: int = 4) -> list[Probe]:
    out = []
    for seed in range(n):
        ids, span, answer = make_toy_probe(tok, 40 + 7 * seed, seed=seed)
        out.append(Probe(ids, span, answer, length=len(ids), depth=float(seed), needle_id="toy"))
    return out


def _counting(monkeypatch) -> list[int]:
    """Patch the engine as the families module calls it: count the prompts it answers."""
    import rhlens.families.compute as compute

    seen: list[int] = []
    real = compute.generate_many

    def counted(model, tok, prompts, **kw):
        seen.extend(range(len(prompts)))
        return real(model, tok, prompts, **kw)

    monkeypatch.setattr(compute, "generate_many", counted)
    return seen


CONFIG = FamiliesConfig(families=("copy", "mass"),
                        detect=DetectConfig(generation=GenerationConfig(max_new_tokens=6, batch_size=2)))


def _records(path) -> dict[str, dict]:
    return {r["key"]: {k: v for k, v in r.items() if k != "seconds"}
            for r in map(json.loads, path.read_text().splitlines())}


def test_families_resume_after_a_kill(toy_model, tmp_path, monkeypatch):
    model, tok = toy_model
    probes = _probes(tok)
    answered = _counting(monkeypatch)
    first = score_families(model, probes, config=CONFIG, tokenizer=tok, out=tmp_path)
    assert len(answered) == len(probes)
    log = tmp_path / "families.jsonl"
    whole = _records(log)
    assert sorted(whole) == sorted(p.key for p in probes)
    # nothing is answered again
    again = score_families(model, probes, config=CONFIG, tokenizer=tok, out=tmp_path)
    assert len(answered) == len(probes)
    assert (again["copy"].per_probe == first["copy"].per_probe).all()
    # killed after the first two probes: only the other two are answered again
    lines = log.read_text().splitlines()
    log.write_text("\n".join(lines[:2]) + "\n")
    resumed = score_families(model, probes, config=CONFIG, tokenizer=tok, out=tmp_path)
    assert len(answered) == len(probes) + 2
    assert _records(log) == whole
    for family in ("copy", "mass"):
        assert (resumed[family].per_probe == first[family].per_probe).all()
    # a run in the folder with other settings is refused, naming the setting
    other = FamiliesConfig(families=("copy", "mass"),
                           detect=DetectConfig(generation=GenerationConfig(max_new_tokens=5)))
    with pytest.raises(ConfigError, match="max_new_tokens"):
        score_families(model, probes, config=other, tokenizer=tok, out=tmp_path)
