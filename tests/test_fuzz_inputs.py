"""Property-based tests (Hypothesis) over rhlens' parsers and validation (issue 28).

Generated heads, spans, token ids, mask specs, needles files and scores files either work
or raise an rhlens error with a one-line reason: never another exception. Example counts
are modest (2-core CI) and printed by ``pytest --hypothesis-show-statistics``.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, event, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from rhlens.errors import RhlensError  # noqa: E402

FUZZ = settings(max_examples=150, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
GRID = (6, 4)

# Anything a user might pass where a head, a number or a span is expected.
scalars = st.one_of(st.integers(-3, 40), st.booleans(), st.floats(allow_nan=True), st.text(max_size=4),
                    st.none(), st.integers(0, 9).map(np.int64), st.integers(0, 9).map(np.int32),
                    st.floats(0, 9).map(np.float32), st.integers(0, 9).map(torch.tensor))
pairs = st.one_of(st.lists(scalars, max_size=4), st.tuples(scalars, scalars), scalars,
                  st.text(max_size=6))


def _one_line(exc: Exception) -> None:
    assert isinstance(exc, RhlensError), repr(exc)
    assert str(exc) and "\n" not in str(exc).strip()


def _exact_int(x) -> bool:
    return (isinstance(x, (int, np.integer)) and not isinstance(x, bool)) or \
        (isinstance(x, torch.Tensor) and x.ndim == 0 and not x.is_floating_point()
         and x.dtype != torch.bool)


@FUZZ
@given(item=pairs)
def test_a_head_is_exactly_two_whole_numbers_or_refused(item):
    from rhlens.validate import check_head

    try:
        layer, head = check_head(item, GRID)
    except Exception as exc:
        _one_line(exc)
        return
    assert type(layer) is int and type(head) is int
    assert 0 <= layer < GRID[0] and 0 <= head < GRID[1]
    parts = list(item)
    assert len(parts) == 2 and all(_exact_int(x) for x in parts)  # nothing was coerced


@FUZZ
@given(heads=st.lists(pairs, max_size=5))
def test_a_mask_of_any_heads_works_or_says_why(heads):
    from rhlens.ablation import Mask

    try:
        mask = Mask(tuple(heads))
    except Exception as exc:
        _one_line(exc)
        return
    assert all(type(a) is int and type(b) is int for a, b in mask.heads)


mask_text = st.one_of(
    st.text(max_size=12),
    st.builds(lambda k, a, b: f"{k}:{a}{b}", st.sampled_from(["top", "random", "heads", "none", "x"]),
              st.text("0123456789-.:,²٣ ", max_size=8), st.text("0123456789.,", max_size=4)))


@FUZZ
@given(spec=mask_text, with_scores=st.booleans())
def test_a_mask_spec_parses_or_says_why(spec, with_scores):
    from rhlens.ablation import parse_mask
    from rhlens.scores import RetrievalScores

    scores = RetrievalScores(per_probe=torch.arange(24.0).reshape(1, *GRID) / 24,
                             success=torch.ones(1, dtype=torch.bool), model_name="m") \
        if with_scores else None
    try:
        mask = parse_mask(spec, grid=GRID, scores=scores)
    except Exception as exc:
        _one_line(exc)
        return
    assert all(0 <= a < GRID[0] and 0 <= b < GRID[1] for a, b in mask.heads)


@FUZZ
@given(span=pairs, limit=st.integers(1, 30))
def test_a_span_is_two_ordered_whole_numbers_or_refused(span, limit):
    from rhlens.validate import check_span

    try:
        start, end = check_span(span, limit)
    except Exception as exc:
        _one_line(exc)
        return
    assert type(start) is int and 0 <= start < end <= limit


@FUZZ
@given(ids=st.one_of(st.lists(scalars, max_size=6), scalars,
                     st.lists(st.integers(-5, 60), max_size=6).map(torch.tensor),
                     st.lists(st.floats(-1, 60), min_size=1, max_size=6).map(torch.tensor)))
def test_token_ids_lie_in_the_vocabulary_or_are_refused(ids):
    from rhlens.validate import check_token_ids

    try:
        check_token_ids(ids, 50)
    except Exception as exc:
        _one_line(exc)
        return
    values = ids.tolist() if isinstance(ids, torch.Tensor) else (ids if isinstance(ids, list) else [ids])
    values = values if isinstance(values, list) else [values]
    assert all(0 <= int(v) < 50 for v in values)


json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-5, 5), st.floats(allow_nan=True),
              st.text(max_size=8)),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=5), inner,
                                                                          max_size=3)),
    max_leaves=8)
needle_lines = st.one_of(
    st.fixed_dictionaries({"needle": st.text(max_size=20), "question": st.text(max_size=10),
                           "real_needle": st.text(max_size=6)},
                          optional={"id": json_values}),
    st.fixed_dictionaries({"needle": st.just("The code is 4471."), "question": st.just("Code?"),
                           "real_needle": st.just("4471")},
                          optional={"id": st.one_of(st.text(max_size=3), st.integers(0, 3))}),
    json_values)


@FUZZ
@given(lines=st.lists(needle_lines, max_size=4), bom=st.booleans(),
       junk=st.one_of(st.just(b""), st.binary(max_size=6)))
def test_a_needles_file_loads_or_says_why(lines, bom, junk, tmp_path_factory):
    from rhlens.probes import load_needles

    path = tmp_path_factory.mktemp("needles") / "n.jsonl"
    body = "".join(json.dumps(x) + "\n" for x in lines).encode()
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + body + junk)
    try:
        needles = load_needles(path)
    except Exception as exc:
        _one_line(exc)
        return
    assert len({n.id for n in needles}) == len(needles)
    assert all(n.real_needle.strip() in n.needle for n in needles)


cell_values = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-2, 2),
                        st.booleans(), st.text(max_size=3), st.none())
paper_files = st.one_of(
    st.dictionaries(st.one_of(st.text(max_size=5), st.builds("{}-{}".format, st.integers(-1, 3),
                                                             st.integers(-1, 3))),
                    st.one_of(st.lists(cell_values, max_size=3), cell_values), max_size=6),
    st.builds(lambda n, bad: {f"{la}-{h}": [0.5] * n if (la, h) != bad[0] else bad[1]
                              for la in range(2) for h in range(2)},
              st.integers(1, 3), st.tuples(st.tuples(st.integers(0, 2), st.integers(0, 2)),
                                           st.lists(cell_values, max_size=3))),
    json_values)


@FUZZ
@given(data=paper_files)
def test_a_scores_file_loads_with_finite_scores_or_says_why(data, tmp_path_factory):
    from rhlens.ablation import top_k_mask
    from rhlens.scores import RetrievalScores

    path = tmp_path_factory.mktemp("scores") / "s.json"
    path.write_text(json.dumps(data))
    try:
        scores = RetrievalScores.from_paper_json(path)
        mask = top_k_mask(scores, 1)
    except Exception as exc:
        _one_line(exc)
        return
    assert bool(torch.isfinite(scores.per_probe).all())
    assert len(mask.heads) == 1


@FUZZ
@given(rec=st.one_of(st.dictionaries(st.text(max_size=5), json_values, max_size=4), st.fixed_dictionaries(
    {"key": st.text(max_size=3), "success": st.one_of(st.booleans(), st.integers(0, 1)),
     "rouge_recall": st.floats(allow_nan=True), "response": st.text(max_size=3),
     "scores": st.lists(st.lists(cell_values, max_size=4), max_size=4)})))
def test_a_detection_record_is_checked_as_a_whole(rec):
    from rhlens.retrieval import DetectConfig, scores_from_records

    try:
        scores = scores_from_records([rec], "m", None, DetectConfig())
    except Exception as exc:
        _one_line(exc)
        return
    assert bool(torch.isfinite(scores.per_probe).all())


@FUZZ
@given(text=st.text(max_size=30))
def test_rouge_of_any_text_with_itself_is_one_when_it_has_tokens(text):
    from rhlens.stats import rouge1_recall, rouge_tokens

    r = rouge1_recall(text, text)
    assert r == (1.0 if rouge_tokens(text) else 0.0)
    assert not math.isnan(r)


@settings(max_examples=300, deadline=None, derandomize=True)
@given(ref=st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=40),
       hyp=st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=40))
def test_rouge_equals_rouge_score_on_ascii(ref, hyp):
    from rouge_score import rouge_scorer

    from rhlens.stats import rouge1_recall

    want = rouge_scorer.RougeScorer(["rouge1"], use_stemmer=True).score(ref, hyp)["rouge1"].recall
    assert rouge1_recall(ref, hyp) == pytest.approx(want)


# ---- issue 28, what remained: the logs of cot, patch, compress and scores; token rows; counts ----
grid_rows = st.one_of(st.lists(st.lists(cell_values, max_size=4), max_size=4),
                      st.builds(lambda v, at: [[(v if (la, h) == at else 0.5) for h in range(GRID[1])]
                                               for la in range(GRID[0])],
                                cell_values, st.tuples(st.integers(0, 6), st.integers(0, 4))),
                      json_values)


GOOD_COT = {"key": "none|cot|a-0", "task": "a", "mask": "none", "group": "none", "mode": "cot",
            "id": "a-0", "gold": "5", "output": "= 5", "extracted": "5", "correct": True}
GOOD_PATCH = {"key": "0-ab", "index": 0, "clean": 1.5, "corrupted": -0.5, "seconds": 0.1, "pair": {},
              "patched": [[0.25] * GRID[1]] + [[None] * GRID[1] for _ in range(GRID[0] - 1)]}
GOOD_FAMILY = {"key": "p", "success": True, "rouge_recall": 1.0, "response": "x",
               "copy": [[0.0] * GRID[1] for _ in range(GRID[0])], "mass": [[0.5] * GRID[1]] * GRID[0]}


valid_grids = st.lists(st.floats(-1, 1), min_size=GRID[1], max_size=GRID[1]).map(lambda row: [row] * GRID[0])


def one_change(good: dict, values):
    """``good``, or ``good`` with one field replaced by a drawn value, or dropped."""
    return st.one_of(st.just(good),
                     st.builds(lambda k, v: {**good, k: v}, st.sampled_from(sorted(good)), values),
                     st.sampled_from(sorted(good)).map(lambda k: {x: v for x, v in good.items() if x != k}))


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


@FUZZ
@given(rec=st.one_of(json_values, st.fixed_dictionaries(
    {"key": st.text(max_size=3), "mask": st.text(max_size=3), "group": st.text(max_size=3),
     "mode": st.one_of(st.sampled_from(["cot", "direct"]), st.text(max_size=3)),
     "id": st.one_of(st.text(max_size=3), st.integers(-2, 3), st.booleans(), st.none()),
     "output": st.one_of(st.text(max_size=3), st.none()), "correct": st.one_of(st.booleans(), cell_values)},
    optional={"extracted": json_values}), one_change(GOOD_COT, st.one_of(cell_values, json_values)),
    st.just(GOOD_COT)))
def test_a_cot_record_is_checked_as_a_whole(rec):
    from rhlens.validate import cot_record_problem

    wrong = cot_record_problem(rec)
    if wrong is not None:
        assert isinstance(wrong, str) and "\n" not in wrong
        event("refused")
        return
    event("accepted")
    # what CoTResult reads from a record works on it
    assert rec["mode"] in ("cot", "direct") and isinstance(rec["correct"], bool)
    assert float(rec["correct"]) in (0.0, 1.0) and isinstance(rec["group"], str) and rec["group"]
    assert isinstance(rec["id"], str) or (type(rec["id"]) is int)


@FUZZ
@given(rec=st.one_of(json_values, st.fixed_dictionaries(
    {"key": st.text(max_size=3), "index": cell_values, "clean": cell_values, "corrupted": cell_values,
     "seconds": cell_values, "pair": st.one_of(st.just({}), json_values), "patched": grid_rows}),
    one_change(GOOD_PATCH, st.one_of(cell_values, grid_rows, valid_grids)), st.just(GOOD_PATCH)))
def test_a_patching_record_is_checked_as_a_whole(rec):
    from rhlens.validate import patching_record_problem

    wrong = patching_record_problem(rec, GRID)
    if wrong is not None:
        assert isinstance(wrong, str) and "\n" not in wrong
        event("refused")
        return
    event("accepted")
    # the patched grid becomes a [layer, head] tensor (null: NaN, not patched), as the result reads it
    patched = torch.tensor([[math.nan if x is None else float(x) for x in row] for row in rec["patched"]])
    assert tuple(patched.shape) == GRID
    assert all(x is None or _finite(x) for x in (rec["clean"], rec["corrupted"]))
    assert type(rec["index"]) is int and rec["index"] >= 0 and isinstance(rec["pair"], dict)


@FUZZ
@given(rec=st.one_of(json_values, st.fixed_dictionaries(
    {"key": st.text(max_size=3), "success": st.one_of(st.booleans(), cell_values),
     "rouge_recall": cell_values, "response": st.one_of(st.text(max_size=3), st.none())},
    optional={"copy": grid_rows, "mass": grid_rows}),
    one_change(GOOD_FAMILY, st.one_of(cell_values, grid_rows, valid_grids)), st.just(GOOD_FAMILY)))
def test_a_families_record_is_checked_as_a_whole(rec):
    from rhlens.validate import families_record_problem

    wrong = families_record_problem(rec, GRID, ("copy", "mass"))
    if wrong is not None:
        assert isinstance(wrong, str) and "\n" not in wrong
        event("refused")
        return
    event("accepted")
    for family in ("copy", "mass"):  # as score_families reads them: a finite [layer, head] tensor
        t = torch.tensor(rec[family], dtype=torch.float32)
        assert tuple(t.shape) == GRID and bool(t.isfinite().all())
    assert isinstance(rec["success"], bool) and _finite(rec["rouge_recall"])


log_lines = st.one_of(st.builds(json.dumps, json_values).map(str.encode), st.binary(max_size=8),
                      st.builds(json.dumps, st.fixed_dictionaries({"key": st.text(max_size=2)})).map(
                          str.encode))


@FUZZ
@given(lines=st.lists(log_lines, max_size=5), tail=st.booleans())
def test_a_log_is_checked_line_by_line_or_names_the_line(lines, tail, tmp_path_factory):
    from rhlens.validate import check_log_records

    def problem(rec):
        return None if isinstance(rec, dict) and isinstance(rec.get("key"), str) else "no key"

    path = tmp_path_factory.mktemp("log") / "x.jsonl"
    path.write_bytes(b"\n".join(lines) + (b"\n" if tail else b""))
    try:
        count = check_log_records(path, problem, "record")
    except Exception as exc:
        _one_line(exc)
        assert "x.jsonl, line " in str(exc)
        event("refused")
        return
    event("accepted")
    good = 0
    for line in [ln for ln in path.read_bytes().split(b"\n")]:
        try:
            rec = json.loads(line.decode("utf-8"))
        except ValueError:
            continue  # a blank line, or the torn tail a crash leaves
        good += problem(rec) is None
    assert count == good


token_inputs = st.one_of(
    st.lists(st.lists(scalars, max_size=4), max_size=3), st.lists(scalars, max_size=4), scalars,
    st.lists(st.lists(st.integers(-3, 60), min_size=1, max_size=4), min_size=1, max_size=3),
    st.lists(st.integers(-3, 60), max_size=5).map(torch.tensor),
    st.lists(st.integers(0, 60), max_size=5).map(lambda x: np.array(x, dtype=np.int32)),
    st.lists(st.floats(-1, 60), min_size=1, max_size=4).map(np.array),
    st.lists(st.booleans(), min_size=1, max_size=4).map(torch.tensor),
    st.integers(0, 3).map(lambda n: torch.zeros((1,) * n, dtype=torch.long)))


@FUZZ
@given(tokens=token_inputs)
def test_token_rows_are_whole_ids_in_the_vocabulary_or_refused(tokens):
    from rhlens.validate import check_token_rows

    try:
        rows = check_token_rows(tokens, 50, "corrupted_tokens")
    except Exception as exc:
        _one_line(exc)
        assert "corrupted_tokens" in str(exc)
        event("refused")
        return
    event("accepted")
    assert rows.dtype == torch.int64 and rows.ndim == 2 and rows.numel() > 0
    flat = np.asarray(tokens.tolist() if isinstance(tokens, torch.Tensor) else tokens, dtype=object).ravel()
    assert all(_exact_int(x) or type(x) is int for x in flat)  # nothing was coerced
    assert [int(x) for x in flat] == rows.flatten().tolist()
    assert int(rows.min()) >= 0 and int(rows.max()) < 50


@FUZZ
@given(seeds=st.one_of(st.integers(-2, 10**12), st.booleans(), st.lists(st.integers(-1, 5), max_size=4),
                       st.integers(0, 3).map(lambda e: range(10 ** (e + 2)))))
def test_seeds_are_a_bounded_count_or_refused(seeds):
    from rhlens.masks import seed_list
    from rhlens.validate import MAX_DRAWS

    try:
        out = seed_list(seeds)
    except Exception as exc:
        _one_line(exc)
        event("refused")
        return
    event("accepted")
    assert 1 <= len(out) <= MAX_DRAWS and len(set(out)) == len(out)


@FUZZ
@given(text=st.one_of(st.text(max_size=8), st.integers(-5, 10**15).map(str)))
def test_a_draws_flag_parses_to_a_bounded_count_or_says_why(text):
    import argparse

    from rhlens.cli.args import draws
    from rhlens.validate import MAX_DRAWS

    try:
        value = draws()(text)
    except argparse.ArgumentTypeError as exc:  # argparse prints it as one line naming the flag
        assert str(exc) and "\n" not in str(exc)
        event("refused")
        return
    event("accepted")
    assert type(value) is int and 1 <= value <= MAX_DRAWS
