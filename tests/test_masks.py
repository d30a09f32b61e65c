"""Which heads a mask knocks out: mask specs, top-K, random-K from the model's grid."""

from __future__ import annotations

import itertools

import pytest
import torch

from rhlens.ablation import (
    Mask,
    mean_reference_prompts,
    parse_mask,
    random_k_heads,
    random_k_mask,
    top_k_mask,
)
from rhlens.errors import ConfigError
from rhlens.probe import Probe
from rhlens.scores import RetrievalScores

GRID = (6, 4)


def _scores(grid=GRID) -> RetrievalScores:
    """A score table with ties: three heads at 0.9, two at 0.4, one at 0.2, the rest 0."""
    mean = torch.zeros(grid)
    for (la, h), s in {(4, 1): 0.9, (1, 3): 0.9, (1, 0): 0.9, (5, 2): 0.4, (0, 3): 0.4,
                       (2, 2): 0.2}.items():
        mean[la, h] = s
    return RetrievalScores(per_probe=mean[None].repeat(2, 1, 1), success=torch.ones(2, dtype=torch.bool),
                           model_name="toy-grid")


def _naive_top(scores: RetrievalScores, k: int) -> list[tuple[int, int]]:
    cells = [(-float(scores.mean[la, h]), la, h)
             for la, h in itertools.product(range(scores.n_layers), range(scores.n_heads))]
    return sorted((la, h) for _, la, h in sorted(cells)[:k])


def test_specs_become_masks():
    s = _scores()
    assert parse_mask("none", grid=GRID) == Mask((), label="none")
    assert parse_mask("heads:1.2,0.3", grid=GRID).heads == ((0, 3), (1, 2))
    top = parse_mask("top:4", grid=GRID, scores=s, mode="zero", phase="all")
    assert (top.label, top.mode, top.phase) == ("top-4", "zero", "all")
    assert sorted(top.heads) == _naive_top(s, 4) == [(0, 3), (1, 0), (1, 3), (4, 1)]
    rnd = parse_mask("random:3:7", grid=GRID, scores=s)
    assert rnd.label == "random-3-s7" and rnd == random_k_mask(s, 3, seed=7, grid=GRID)


@pytest.mark.parametrize(("spec", "message"), [
    ("heads:1", "heads are written layer.head"),
    ("heads:1.2.3", "heads are written layer.head"),
    ("heads:a.b", "heads are written layer.head"),
    ("heads:6.0", "outside the model's 6 layers x 4 heads"),
    ("top:25", "K must be between 1 and the model's 24 heads"),
    ("top:0", "K must be between 1"),
    ("top:-2", "K must be between 1"),
    ("top:", "expected top:K with whole numbers"),
    ("top:2:1", "expected top:K with whole numbers"),
    ("random:2.5", "expected random:K or random:K:SEED"),
    ("random:25", "K must be between 1 and the model's 24 heads"),
    ("random:20", "cannot draw 20 random heads"),  # 24 heads minus 6 retrieval/top ones
    ("bottom:3", "a mask is none, top:K"),
    ("none:3", "a mask is none, top:K"),
])
def test_bad_specs_are_refused(spec, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.").replace("(", r"\(")):
        parse_mask(spec, grid=GRID, scores=_scores())


def test_top_needs_scores_and_scores_must_fit_the_model():
    with pytest.raises(ConfigError, match="top-K needs retrieval scores"):
        parse_mask("top:3", grid=GRID)
    with pytest.raises(ConfigError, match="scores of another model"):
        parse_mask("top:3", grid=(30, 9), scores=_scores())
    with pytest.raises(ConfigError, match="scores of another model"):
        parse_mask("random:3", grid=(30, 9), scores=_scores())


def test_random_heads_never_hide_a_retrieval_head_and_come_from_the_grid():
    s = _scores()
    banned = {(la, h) for la, h in itertools.product(range(6), range(4)) if s.mean[la, h] > 0.1}
    for seed in range(20):
        heads = random_k_heads(s, 5, seed=seed)
        assert len(set(heads)) == 5 and not set(heads) & banned
        assert all(0 <= la < 6 and 0 <= h < 4 for la, h in heads)
    assert random_k_heads(s, 5, seed=3) == random_k_heads(s, 5, seed=3)
    assert {tuple(random_k_heads(s, 5, seed=i)) for i in range(5)} != {tuple(random_k_heads(s, 5))}


def test_random_heads_without_scores_draw_from_the_whole_grid():
    seen = set()
    for seed in range(30):
        seen |= set(random_k_heads(None, 100, seed=seed, grid=(30, 9)))
    assert len(seen) == 270  # every head of the model's grid, not a hard-coded 32 x 32
    with pytest.raises(ConfigError, match="need the model's grid"):
        random_k_heads(None, 3)


def test_top_k_mask_matches_a_naive_sort_with_ties_broken_by_position():
    s = _scores()
    for k in (1, 2, 3, 5, 6, 10):
        assert sorted(top_k_mask(s, k).heads) == _naive_top(s, k)


def test_mean_reference_prompts_are_the_first_probes():
    probes = [Probe(prompt_ids=(1, 2, i + 3), needle_span=(2, 3), real_needle="x", depth=i)
              for i in range(6)]
    assert mean_reference_prompts(probes) == [(1, 2, 3), (1, 2, 4), (1, 2, 5), (1, 2, 6)]
    assert mean_reference_prompts(probes, n=10) == [tuple(p.prompt_ids) for p in probes]
    with pytest.raises(ConfigError, match="needs probes"):
        mean_reference_prompts([])
    with pytest.raises(ConfigError, match="at least one"):
        mean_reference_prompts(probes, n=0)
