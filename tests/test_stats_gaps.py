"""stats.paired_gaps (the one home of the KV sweeps' paired bootstrap) against a naive loop."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rhlens.errors import ConfigError
from rhlens.stats import interval, paired_gaps


def _naive(scores: np.ndarray, policy, full, streaming, random, n_boot, seed=0):
    """Resample the rows n_boot times (the draw bootstrap_means documents), one mean at a time."""
    n = scores.shape[0]
    idx = torch.randint(0, n, (n_boot, n), generator=torch.Generator().manual_seed(seed)).numpy()
    boot = np.array([[sum(scores[i, c] for i in row) / n for c in range(scores.shape[1])] for row in idx])

    def ci(x):
        return [round(float(np.percentile(x, 2.5)), 3), round(float(np.percentile(x, 97.5)), 3)]

    m = scores.mean(0)
    out = {"score": m[policy], "full": m[full], "vs_full": m[policy] / m[full],
           "vs_full_ci": ci(boot[:, policy] / boot[:, full]),
           "streaming": m[streaming], "gap_streaming": m[policy] - m[streaming],
           "gap_streaming_ci": ci(boot[:, policy] - boot[:, streaming]),
           "random_mean": m[random].mean(), "gap_random": m[policy] - m[random].mean(),
           "gap_random_ci": ci(boot[:, policy] - boot[:, random].mean(1)), "random_seeds": len(random)}
    return out


def test_paired_gaps_match_a_naive_bootstrap():
    rng = np.random.default_rng(3)
    scores = rng.choice([0.0, 100.0, 37.5], size=(19, 6))
    scores[:, 0] += 20  # the full cache, best
    got = paired_gaps(torch.tensor(scores), 1, full=0, streaming=2, random=[3, 4, 5], n_boot=300)
    want = _naive(scores, 1, 0, 2, [3, 4, 5], 300)
    assert got.keys() == want.keys()
    for key, value in want.items():
        assert got[key] == pytest.approx(value, abs=1e-9), key


def test_paired_gaps_without_streaming_or_random():
    got = paired_gaps(torch.tensor([[2.0, 1.0], [4.0, 3.0]]), 1, n_boot=50)
    assert set(got) == {"score", "full", "vs_full", "vs_full_ci"} and got["vs_full"] == pytest.approx(4 / 6)
    assert interval(torch.arange(101.0)) == [2.5, 97.5]
    with pytest.raises(ConfigError, match="n_boot"):
        paired_gaps(torch.ones(3, 2), 0, n_boot=0)
