"""trace_heads and the head view: the data agrees with the engine's copy rule; the HTML carries it."""

from __future__ import annotations

import json
import re

import pytest
import torch

from rhlens.engine import StepState, generate
from rhlens.errors import ConfigError
from rhlens.probe import Probe
from rhlens.results import load_result
from rhlens.retrieval import TopKeyRecorder, copy_mask, probe_retrieval_scores
from rhlens.trace import HeadTrace, parse_heads, trace_heads
from rhlens.views import head_view

from toy import make_toy_probe

COPY_HEAD = (1, 2)  # the toy model's copy head


def _toy_probe(tok, n_filler=40, seed=3) -> Probe:
    ids, span, answer = make_toy_probe(tok, n_filler, seed)
    return Probe(ids, span, answer, length=len(ids), needle_id=f"toy{seed}", question="ASK")


@pytest.fixture(scope="module")
def toy_trace(toy_model):
    model, tok = toy_model
    probe = _toy_probe(tok)
    heads = [COPY_HEAD, (0, 0), (1, 0)]
    return probe, trace_heads(model, probe, heads, tokenizer=tok, context=5)


def test_trace_is_the_engines_recording(toy_model, toy_trace):
    """Top keys equal the recorder's while the engine answers; copies equal copy_mask;
    per-probe scores equal probe_retrieval_scores at the traced heads."""
    model, tok = toy_model
    probe, trace = toy_trace
    state = StepState()
    rec = TopKeyRecorder(int(model.cfg.n_layers), int(model.cfg.n_heads), 50, state)
    gen = generate(model, tok, probe.prompt_ids, hooks=rec.hooks(), state=state)
    assert trace.answer == [tok.decode([t]) for t in gen.response_ids]
    engine = rec.positions[:gen.n_steps]
    for i, (la, h) in enumerate(trace.heads):
        assert torch.equal(trace.top_position[:, i], engine[:, la, h])
    want = copy_mask(engine, torch.tensor(gen.response_ids), torch.tensor(probe.prompt_ids),
                     tuple(probe.needle_span))
    assert torch.equal(trace.copied, torch.stack([want[:, la, h] for la, h in trace.heads], 1))
    full = probe_retrieval_scores(model, probe, gen.response_ids)
    assert torch.allclose(trace.probe_scores, torch.stack([full[la, h] for la, h in trace.heads]))
    # The copy head copies every needle token; the others copy none of them.
    assert trace.probe_scores[0] == 1.0 and trace.probe_scores[1:].max() < 0.5
    assert trace.recall == 1.0


def test_trace_weights_and_window(toy_trace):
    probe, trace = toy_trace
    start, end = probe.needle_span
    assert trace.window == [max(0, start - 5), min(probe.n_tokens, end + 5)]
    assert trace.window_attention.shape == (trace.n_steps, 3, trace.window[1] - trace.window[0])
    # The top key's weight is the row's maximum; within the window it is the window's maximum.
    assert (trace.top_weight > 0).all() and (trace.top_weight <= 1 + 1e-6).all()
    assert (trace.needle_mass <= trace.window_attention.sum(-1) + 1e-5).all()
    copy = trace.steps(*COPY_HEAD)
    copied = [r for r in copy if r["copied"]]
    assert copied and all(r["in_needle"] and r["top_token"] == r["generated"] for r in copied)
    df = trace.to_dataframe()
    assert len(df) == 3 * trace.n_steps and set(df["copied"]) <= {True, False}


def test_trace_saves_and_loads(toy_trace, tmp_path):
    _, trace = toy_trace
    back = load_result(trace.save(tmp_path / "trace"))
    assert isinstance(back, HeadTrace)
    assert back.heads == trace.heads and torch.equal(back.copied, trace.copied)
    assert back.tokens == trace.tokens


def test_head_view_html_carries_the_trace(toy_trace):
    probe, trace = toy_trace
    page = head_view(trace).to_html()
    data = json.loads(re.search(r'<script type="application/json" class="rhv-data">(.*?)</script>',
                                page, re.S).group(1))
    assert data["needle"] == list(probe.needle_span) and data["heads"] == trace.heads
    assert data["copied"] == trace.copied.tolist()
    assert trace._repr_html_().startswith('<div class="rhv"')
    # Two views on one page do not share an id (the script finds its own root).
    ids = re.findall(r'id="(rhv-[0-9a-f]+)"', head_view(trace).fragment() + head_view(trace).fragment())
    assert len(set(ids)) == 2


def test_parse_heads_and_refusals(toy_model):
    assert parse_heads("18.6, L3H1,3.1") == [(18, 6), (3, 1)]
    with pytest.raises(ConfigError, match="needs retrieval scores"):
        parse_heads("top:2")
    with pytest.raises(ConfigError, match="cannot read head"):
        parse_heads("18-6")
    model, tok = toy_model
    with pytest.raises(ConfigError, match="outside the model"):
        trace_heads(model, _toy_probe(tok), [(2, 0)], tokenizer=tok)


# ---- results that display themselves ------------------------------------------------------
def _inline_png(page: str) -> bytes:
    import base64

    m = re.search(r"src='data:image/png;base64,([A-Za-z0-9+/=]+)'", page)
    assert m, "no inline figure"
    return base64.b64decode(m.group(1))


def test_results_display_themselves():
    import pandas as pd
    from matplotlib.figure import Figure
    from test_report import _niah, _scores, _sweep

    from rhlens.views.results import compact_table

    scores, sweep = _scores(), _sweep()
    niah = _niah({"none": [], "top-2": [[2, 1], [3, 0]]})
    for result in (scores, niah, sweep):
        page = result._repr_html_()
        assert _inline_png(page).startswith(b"\x89PNG")
        assert "<table" in page
        assert isinstance(result.plot(), Figure)
        assert isinstance(result.to_dataframe(), pd.DataFrame)
    # The scores' table ranks the planted head first; NIAH's counts the hallucinations.
    top = compact_table(scores)
    assert tuple(top.iloc[0][["layer", "head"]]) == (2, 1) and len(top) == 10
    assert top.to_html(index=False, border=0, classes="rhlens-table") in scores._repr_html_()
    rows = compact_table(niah).set_index("mask")
    assert rows.loc["top-2", "hallucination"] == 2 and rows.loc["none", "NIAH score"] == 100.0
    curve = sweep.to_dataframe()
    assert list(curve.columns) == ["k", "top_k", "random_k_mean", "random_k_std"]
    assert curve["top_k"].tolist() == sweep.curve()["top"]


def test_patching_and_cot_display_themselves():
    from rhlens.cot.experiment import CoTResult
    from rhlens.patching import HeadPatchingResult

    effects = torch.zeros(2, 4, 3)
    effects[:, 2, 1] = 0.7
    patch = HeadPatchingResult(effects=effects, patched=effects.clone(), clean=torch.tensor([3.0, 2.5]),
                               corrupted=torch.tensor([-1.0, -0.5]), model_name="toy-model",
                               config={"mode": "exact", "direction": "denoise", "positions": "answer",
                                       "metric": "logit_diff"},
                               pairs=[{"key": "p0"}, {"key": "p1"}], seconds=[1.0, 1.0])
    records = [{"key": f"{mask}|{mode}|{i}", "task": "arithmetic", "mask": mask, "group": mask,
                "mode": mode, "id": i, "gold": "4", "output": "4", "extracted": "4",
                "correct": not (mask != "none" and mode == "cot")}
               for mode in ("cot", "direct") for mask in ("none", "top-2") for i in range(3)]
    cot = CoTResult(task="arithmetic", task_kind="number", model_name="toy-model", records=records,
                    masks={"none": {}, "top-2": {}}, config={"n_boot": 200, "level": 0.9, "seed": 0})
    for result in (patch, cot):
        page = result._repr_html_()
        assert _inline_png(page).startswith(b"\x89PNG") and "<table" in page
    assert "0.7" in patch._repr_html_()
    assert len(cot.to_dataframe()) == 4


def test_top_prints_no_float32_noise():
    from test_report import _scores

    scores = _scores()
    assert float(scores.mean[2, 1]) != 0.8  # float32's 0.800000011920929
    assert scores.top(1) == [(2, 1, 0.8)]


def test_show_command_writes_the_view_of_a_detection_run(toy_model, tmp_path, capsys):
    from rhlens.cli import main
    from rhlens.retrieval import DetectConfig, detect_retrieval_heads

    from toy import TOY_MODEL_DIR

    model, tok = toy_model
    probes = [_toy_probe(tok, n, seed) for n, seed in ((30, 1), (50, 2))]
    run = tmp_path / "run"
    detect_retrieval_heads(model, probes, config=DetectConfig(max_new_tokens=12), tokenizer=tok,
                           out=run, progress=False)
    out = tmp_path / "view.html"
    assert main(["show", str(run), "--model", str(TOY_MODEL_DIR), "--heads", "1.2,0.0",
                 "--probe", probes[1].key, "--context", "4", "--out", str(out)]) == 0
    page = out.read_text()
    data = json.loads(re.search(r'class="rhv-data">(.*?)</script>', page, re.S).group(1))
    assert data["heads"] == [[1, 2], [0, 0]] and data["needle"] == list(probes[1].needle_span)
    assert data["probe_scores"][0] == 1.0 and data["recall"] == 1.0
    assert "L1H2 " in capsys.readouterr().out
    assert main(["show", str(run), "--model", str(TOY_MODEL_DIR), "--heads", "top:1"]) == 2
    assert "rhlens: error" in capsys.readouterr().err
