"""rhlens.stats against naive, independent computations."""

from __future__ import annotations

import random

import pytest
import torch

from rhlens.errors import ConfigError
from rhlens.stats import (
    bootstrap_means,
    heads_above,
    jaccard,
    pearson,
    percentile_interval,
    rank_heads,
    rouge1_recall,
    spearman,
    top_k_heads,
)


def _naive_rank(grid: torch.Tensor) -> list[tuple[int, int]]:
    cells = [(float(grid[la, h]), la, h) for la in range(grid.shape[0]) for h in range(grid.shape[1])]
    return [(la, h) for _, la, h in sorted(cells, key=lambda c: (-c[0], c[1], c[2]))]


def test_top_k_on_a_tie_heavy_grid_is_layer_head_order():
    g = torch.Generator().manual_seed(0)
    grid = torch.zeros(30, 9)
    # a few distinct scores, many exact ties (like a real model: most heads score 0)
    for _ in range(25):
        la, h = torch.randint(0, 30, (1,), generator=g).item(), torch.randint(0, 9, (1,), generator=g).item()
        grid[la, h] = float(torch.randint(1, 4, (1,), generator=g).item()) / 10
    assert rank_heads(grid) == _naive_rank(grid)
    for k in (0, 1, 5, 20, 40, 270):
        assert top_k_heads(grid, k) == _naive_rank(grid)[:k]
    assert heads_above(grid, 0.1) == [h for h in _naive_rank(grid) if grid[h] > 0.1]


def test_rank_heads_puts_nan_last():
    grid = torch.tensor([[float("nan"), 0.5], [0.5, 0.0]])
    assert rank_heads(grid) == [(0, 1), (1, 0), (1, 1), (0, 0)]


@pytest.mark.parametrize("k", [-1, 7])
def test_top_k_refuses_bad_k(k):
    with pytest.raises(ConfigError):
        top_k_heads(torch.zeros(2, 3), k)


def test_bootstrap_means_equals_a_gathering_loop():
    values = torch.randn(13, 4, 5, dtype=torch.float64)
    got = bootstrap_means(values, n_boot=50, seed=3)
    g = torch.Generator().manual_seed(3)
    idx = torch.randint(0, 13, (50, 13), generator=g)
    want = torch.stack([values[i].mean(0) for i in idx])
    assert torch.allclose(got, want, atol=1e-12)
    lo, hi = percentile_interval(got, 0.9)
    assert torch.all(lo <= hi)


def test_correlations_against_hand_values():
    x = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert pearson(x, 2 * x + 1) == pytest.approx(1.0)
    assert pearson(x, torch.ones(4)) != pearson(x, torch.ones(4))  # NaN: undefined
    # ties: ranks [1.5, 1.5, 3, 4] vs [1, 2, 3, 4]
    assert spearman(torch.tensor([0.0, 0.0, 1.0, 2.0]), x) == pytest.approx(0.9486832980505138)
    assert jaccard([(0, 1), (1, 2)], [(1, 2), (3, 3)]) == pytest.approx(1 / 3)


def test_rouge_equals_rouge_score_on_ascii_text():
    from rouge_score import rouge_scorer

    ref_scorer = rouge_scorer.RougeScorer(["rouge1"], use_stemmer=True)
    rng = random.Random(0)
    words = ["The", "running", "dogs", "ran", "quickly,", "cardamom", "Vell.", "a", "AND", "it's",
             "island", "islands", "17", "x-ray", "smoked_blue", "(amber)", "falcons", "seventeen!"]
    for _ in range(200):
        ref = " ".join(rng.choice(words) for _ in range(rng.randint(1, 8)))
        hyp = " ".join(rng.choice(words) for _ in range(rng.randint(0, 10)))
        assert rouge1_recall(ref, hyp) == pytest.approx(ref_scorer.score(ref, hyp)["rouge1"].recall)


@pytest.mark.parametrize("ref,hyp,want", [
    ("北京烤鸭", "北京烤鸭", 1.0),
    ("北京烤鸭", "答案是北京的烤鸭。", 1.0),
    ("北京烤鸭", "上海", 0.0),
    ("北京烤鸭", "北京", 0.5),
    ("Η κόκκινη αλεπού", "η ΚΌΚΚΙΝΗ αλεπού πηδά", 1.0),
    ("ο Σωκράτης", "Σωκράτης", 0.5),
    ("café crème brûlée", "a crème brûlée", 2 / 3),
    ("東京タワー", "東京", 0.4),
])
def test_rouge_scores_any_script(ref, hyp, want):
    assert rouge1_recall(ref, hyp) == pytest.approx(want)
