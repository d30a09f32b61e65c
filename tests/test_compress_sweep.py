"""The KV budget sweep: batched policies answer as alone, results save and load, runs resume; the CLI."""

from __future__ import annotations

import pytest
import torch

import rhlens.compress.sweep as sweep_module
from rhlens.cli import main
from rhlens.compress import CompressConfig, policy_hooks
from rhlens.compress.sweep import (
    CompressSweepResult,
    compress_sweep,
    needle_attention_mass,
    sweep_policies,
)
from rhlens.engine import GenerationConfig, generate
from rhlens.errors import ConfigError
from rhlens.niah import NIAHConfig
from rhlens.probe import Probe
from rhlens.results import load_result
from rhlens.runs import read_run, save_compress_run
from rhlens.scores import RetrievalScores

from toy import make_toy_probe

CONFIG = CompressConfig(sink=2, window=8)
NIAH = NIAHConfig(max_new_tokens=8)


@pytest.fixture(scope="module")
def toy_probes(toy_model):
    _, tok = toy_model
    out = []
    for seed in range(3):
        ids, span, answer = make_toy_probe(tok, 90, seed=10 + seed)
        out.append(Probe(ids, span, answer, length=100, depth=float(seed), needle_id="toy"))
    return out


def _copy_head_grid() -> torch.Tensor:
    grid = torch.zeros(2, 4)
    grid[1, 2] = 1.0  # the toy model's copy head
    grid[0, 3] = 0.5
    return grid


def _counting(monkeypatch) -> list[int]:
    """Count the prompts the engine answers inside the sweep."""
    answered: list[int] = []
    real = sweep_module.generate_many

    def counting(*args, **kwargs):
        for gen in real(*args, **kwargs):
            answered.append(1)
            yield gen

    monkeypatch.setattr(sweep_module, "generate_many", counting)
    return answered


def test_every_batched_policy_answers_as_it_does_alone(toy_model, toy_probes, tmp_path):
    model, tok = toy_model
    res = compress_sweep(model, toy_probes, {"retrieval": _copy_head_grid()}, budgets=(0.3, 0.6),
                         seeds=2, config=CONFIG, niah=NIAH, tokenizer=tok, out=tmp_path)
    from rhlens.compress.policy import CacheLayout, HeadPolicy

    layout = CacheLayout.of(model)
    gen_config = GenerationConfig(max_new_tokens=NIAH.max_new_tokens)
    for label, described in res.policies.items():
        policy = HeadPolicy.from_dict({k: v for k, v in described.items() if k in (
            "type", "full", "sink", "window", "label", "kind", "budget", "seed")})
        hooks = policy_hooks(model, policy, layout)
        for probe in toy_probes:
            alone = generate(model, tok, probe.prompt_ids, config=gen_config, hooks=hooks)
            (rec,) = [r for r in res.niah.for_mask(label) if r["key"] == probe.key]
            assert rec["response"] == alone.response, (label, probe.key)
    # the copy head kept whole answers; StreamingLLM at 0.3 of the bytes does not reach the needle
    assert res.score("retrieval@0.3") == res.score("full") == 100.0
    assert res.score("streaming@0.3") < 100.0
    c = res.curve()
    assert c["budget"] == [0.3, 0.6] and len(c["random"]) == 2 and len(c["random"][0]) == 2
    assert all(s <= b for s, b in zip(c["share"], c["budget"]))
    assert all(s <= b for s, b in zip(c["streaming_share"], c["budget"]))


def test_sweep_result_saves_loads_and_the_report_shows_it(toy_model, toy_probes, tmp_path):
    model, tok = toy_model
    res = compress_sweep(model, toy_probes, {"retrieval": _copy_head_grid()}, budgets=(0.4,),
                         seeds=1, config=CONFIG, niah=NIAH, tokenizer=tok)
    written = save_compress_run(tmp_path, res)
    assert written["figure"].is_file()
    back = CompressSweepResult.load(tmp_path / "compress")
    assert isinstance(load_result(tmp_path / "compress"), CompressSweepResult)
    assert back.table() == res.table() and back.policies == res.policies
    assert back.config == CONFIG and back.niah.records == res.niah.records
    assert read_run(tmp_path).compress is not None
    from rhlens.report import build_report

    md = build_report([tmp_path]).to_markdown(tmp_path / "report.md").read_text()
    assert "KV cache compression" in md and "| 0.4 |" in md


def test_sweep_resumes_from_its_log(toy_model, toy_probes, tmp_path, monkeypatch):
    model, tok = toy_model
    answered = _counting(monkeypatch)
    kw = dict(budgets=(0.3,), seeds=1, config=CONFIG, niah=NIAH, tokenizer=tok, out=tmp_path)
    first = compress_sweep(model, toy_probes, {"retrieval": _copy_head_grid()}, **kw)
    n_first = len(answered)
    # full, retrieval, streaming, random: policies that keep the same keys are answered once
    kinds = {"full" if p["n_full"] == p["n_selectable"] else
             (tuple(map(tuple, p["full"])), p["sink"], p["window"]) for p in first.policies.values()}
    assert len(first.niah.records) == 4 * 3 and n_first == len(kinds) * 3
    again = compress_sweep(model, toy_probes, {"retrieval": _copy_head_grid()}, **kw)
    assert len(answered) == n_first  # nothing recomputed
    assert again.table() == first.table()
    # a run cut short: the last two answers lost, and only they are answered again
    log = tmp_path / "compress.jsonl"
    lines = log.read_text().splitlines()
    log.write_text("\n".join(lines[:-2]) + "\n")
    resumed = compress_sweep(model, toy_probes, {"retrieval": _copy_head_grid()}, **kw)
    assert len(answered) == n_first + 2
    assert resumed.niah.records == first.niah.records
    with pytest.raises(ConfigError, match="other settings"):
        compress_sweep(model, toy_probes, {"retrieval": _copy_head_grid()},
                       **{**kw, "config": CompressConfig(sink=2, window=9)})


def test_sweep_policies_refuse_bad_input_before_compute():
    from rhlens.compress.policy import CacheLayout

    layout = CacheLayout(n_heads=4, n_kv=4, head_dim=16, itemsize=4, sliding=(None, None))
    grid = _copy_head_grid()
    with pytest.raises(ConfigError, match=r"below the floor"):
        sweep_policies(layout, 100, {"retrieval": grid}, (0.05,), config=CONFIG)
    with pytest.raises(ConfigError, match="plain word"):
        sweep_policies(layout, 100, {"full": grid}, (0.5,), config=CONFIG)
    with pytest.raises((ConfigError, TypeError), match=r"budgets|share"):
        sweep_policies(layout, 100, {"retrieval": grid}, (), config=CONFIG)
    with pytest.raises(ConfigError, match=r"\[2, 4\]"):
        sweep_policies(layout, 100, {"retrieval": torch.zeros(3, 4)}, (0.5,), config=CONFIG)
    pols = sweep_policies(layout, 100, {"retrieval": grid}, (0.5, 0.3), 2, config=CONFIG)
    assert [p.label for p in pols] == ["full", "retrieval@0.3", "streaming@0.3", "random-s0@0.3",
                                       "random-s1@0.3", "retrieval@0.5", "streaming@0.5",
                                       "random-s0@0.5", "random-s1@0.5"]


def test_needle_attention_mass_matches_a_full_forward(toy_model, toy_probes):
    """Independent check: the pattern of one full forward over prompt + answer, read at the rows
    that predict each answer token, summed over the needle span."""
    model, tok = toy_model
    probe = toy_probes[0]
    mass = needle_attention_mass(model, [probe], niah=NIAH, tokenizer=tok)
    gen = generate(model, tok, probe.prompt_ids, config=GenerationConfig(max_new_tokens=8))
    seq = list(probe.prompt_ids) + gen.response_ids[:-1]
    _, cache = model.run_with_cache(torch.tensor([seq]), names_filter=lambda n: n.endswith("hook_pattern"))
    n = len(probe.prompt_ids)
    a, b = probe.needle_span
    expected = torch.stack([cache[f"blocks.{la}.attn.hook_pattern"][0, :, n - 1:n - 1 + gen.n_steps, a:b]
                            .sum(-1).mean(-1) for la in range(2)])
    assert torch.allclose(mass, expected, atol=1e-5)
    assert mass.argmax() == 1 * 4 + 2  # the copy head looks at the needle most


def test_cli_compress_runs_and_resumes(default_model, tmp_path, monkeypatch, capsys):
    per = torch.zeros(2, 30, 9)
    per[:, 18, 6] = per[:, 17, 4] = 0.8
    RetrievalScores(per, torch.ones(2, dtype=torch.bool), "smollm2", n_kv_heads=3).save(tmp_path / "scores")
    import rhlens.models

    loads: list[int] = []

    def load(*a, **k):
        loads.append(1)
        return default_model

    monkeypatch.setattr(rhlens.models, "load_model", load)
    argv = ["compress", "--scores", str(tmp_path / "scores"), "--budgets", "0.5", "--seeds", "1",
            "--lengths", "400", "--depths", "50", "--n-needles", "1", "--max-new-tokens", "6",
            "--window", "60", "--out", str(tmp_path / "run"), "--quiet"]
    assert main(argv) == 0
    res = read_run(tmp_path / "run").compress
    assert sorted(res.policies) == ["full", "random-s0@0.5", "retrieval@0.5", "streaming@0.5"]
    assert (tmp_path / "run" / "compress.png").is_file()
    answered = _counting(monkeypatch)
    assert main(argv) == 0 and not answered  # resumed: nothing left to answer
    assert len(loads) == 2
    capsys.readouterr()
    # another window on the same --out: refused, naming it, before the model loads
    changed = [("50" if a == "60" else a) for a in argv]
    assert main(changed) == 2
    assert "compress.window: 60 -> 50" in capsys.readouterr().err
    assert len(loads) == 2 and not answered
