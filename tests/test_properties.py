"""Tests of rhlens.properties (the paper's retrieval-head properties) and their figures.

Synthetic score sets have answers known by construction; the official per-probe scores
released with the paper check the paper's own claims, and are skipped when absent.
"""

from __future__ import annotations

import math
from functools import cache

import matplotlib
import pytest
import torch

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.figure import Figure

from rhlens.errors import ConfigError
from rhlens.official import find_official_dir, load_official
from rhlens.plotting import (
    plot_dynamic,
    plot_head_heatmap,
    plot_intrinsic,
    plot_sparsity,
    plot_stability,
    plot_universal,
)
from rhlens.properties import (
    DynamicResult,
    IntrinsicResult,
    SparsityResult,
    StabilityResult,
    UniversalTable,
    dynamic,
    intrinsic,
    jaccard,
    pearson,
    sparse,
    spearman,
    stability,
    top_k_heads,
    universal,
)
from rhlens.scores import RetrievalScores

# ---- synthetic data -------------------------------------------------------------------------
N_LAYERS, N_HEADS, N_PROBES = 4, 5, 20


def planted(name: str = "planted") -> RetrievalScores:
    """20 successful probes + 1 failed one on a 4x5 grid with three planted heads.

    - L2H3 scores 0.8 on every successful probe (an always-on retrieval head);
    - L1H1 scores 1.0 on the even probes, 0 on the odd ones (mean 0.5: context-dependent);
    - L0H4 scores 0.05 on every probe (always active, but not a retrieval head);
    - the failed probe has L2H3 at 0, which must not count against it.
    """
    per_probe = torch.zeros(N_PROBES + 1, N_LAYERS, N_HEADS)
    per_probe[:N_PROBES, 2, 3] = 0.8
    per_probe[0:N_PROBES:2, 1, 1] = 1.0
    per_probe[:, 0, 4] = 0.05
    per_probe[N_PROBES, 3, 0] = 0.9  # a head that only fires on the failed probe
    success = torch.ones(N_PROBES + 1, dtype=torch.bool)
    success[N_PROBES] = False
    return RetrievalScores(per_probe=per_probe, success=success, model_name=name)


def constant(grid: torch.Tensor, name: str, n_probes: int = 3) -> RetrievalScores:
    """Scores whose mean is exactly ``grid`` (same value on every probe)."""
    per_probe = grid.float().unsqueeze(0).repeat(n_probes, 1, 1)
    return RetrievalScores(per_probe=per_probe, success=torch.ones(n_probes, dtype=torch.bool),
                           model_name=name)


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


# ---- helpers --------------------------------------------------------------------------------
def test_pearson_known_value():
    x = torch.tensor([1.0, 2.0, 3.0, 4.0])
    y = torch.tensor([2.0, 1.0, 4.0, 3.0])
    assert pearson(x, y) == pytest.approx(0.6)
    assert pearson(x, 3 * x + 1) == pytest.approx(1.0)
    assert pearson(x, -x) == pytest.approx(-1.0)
    assert math.isnan(pearson(x, torch.ones(4)))


def test_spearman_averages_tied_ranks():
    x = torch.tensor([1.0, 2.0, 2.0, 3.0])  # ranks 1, 2.5, 2.5, 4
    y = torch.tensor([1.0, 3.0, 2.0, 4.0])
    assert spearman(x, y) == pytest.approx(math.sqrt(0.9))
    z = torch.linspace(0.1, 2.0, 30)
    assert spearman(z, z**3) == pytest.approx(1.0)  # monotone: rank correlation is perfect
    assert pearson(z, z**3) < 0.99


def test_jaccard_and_top_k_tie_break():
    assert jaccard([(0, 1), (1, 2)], [(1, 2), (3, 3)]) == pytest.approx(1 / 3)
    assert jaccard([], []) == 1.0
    grid = torch.tensor([[0.5, 0.2], [0.5, 0.0]])
    assert top_k_heads(grid, 3) == [(0, 0), (1, 0), (0, 1)]  # ties: (layer, head) order
    with pytest.raises(ConfigError, match="larger than the number of heads"):
        top_k_heads(grid, 5)


# ---- sparse ---------------------------------------------------------------------------------
def test_sparse_counts_planted_heads():
    res = sparse(planted(), thresholds=(0.1, 0.5))
    assert res.counts.tolist() == [2, 1]  # L2H3 (0.8), L1H1 (0.5 is not > 0.5)
    assert res.fraction(0.1) == pytest.approx(2 / 20)
    assert res.fraction(0.5) == pytest.approx(1 / 20)
    assert res.per_layer[0].tolist() == [0, 1, 1, 0]
    assert int(res.hist_counts.sum()) == N_LAYERS * N_HEADS
    assert res.hist_edges.shape[0] == res.hist_counts.shape[0] + 1
    assert res.n_probes == N_PROBES  # the failed probe is left out
    df = res.to_dataframe()
    assert df["n_above"].tolist() == [2, 1]
    assert res.per_layer_dataframe().shape == (N_LAYERS, 3)


def test_sparse_ignores_failed_probes():
    # L3H0 scores 0.9 only on the failed probe: it must not be a retrieval head
    res = sparse(planted(), thresholds=(0.01,))
    assert float(res.mean[3, 0]) == 0.0
    assert res.counts.tolist() == [3]


@pytest.mark.parametrize("bad", [(), (float("nan"),), (-0.1,), (0.1, float("inf"))])
def test_sparse_rejects_bad_thresholds(bad):
    with pytest.raises(ConfigError, match="threshold"):
        sparse(planted(), thresholds=bad)


def test_empty_and_all_failed_scores_are_refused():
    no = torch.zeros(3, dtype=torch.bool)
    empty = RetrievalScores(per_probe=torch.zeros(0, 2, 2), success=no[:0], model_name="empty")
    failed = RetrievalScores(per_probe=torch.ones(3, 2, 2), success=no, model_name="failed")
    for scores in (empty, failed):
        for analysis in (sparse, dynamic, stability):
            with pytest.raises(ConfigError, match="no successful probe"):
                analysis(scores)
        with pytest.raises(ConfigError, match="no successful probe"):
            universal([scores])


def test_sparse_save_load_roundtrip(tmp_path):
    res = sparse(planted())
    back = SparsityResult.load(res.save(tmp_path / "sparse"))
    assert back.thresholds == res.thresholds
    assert torch.equal(back.counts, res.counts)
    assert torch.equal(back.per_layer, res.per_layer)
    assert torch.allclose(back.mean, res.mean)


# ---- universal ------------------------------------------------------------------------------
def test_universal_table():
    other = planted("other")
    other.per_probe[:, 0, 0] = 0.3
    table = universal([planted(), other], threshold=0.1)
    assert [r.model for r in table.rows] == ["planted", "other"]
    assert [r.n_retrieval for r in table.rows] == [2, 3]
    assert table.rows[1].percent_retrieval == pytest.approx(15.0)
    assert table.rows[0].top[0][:2] == (2, 3)
    assert table.rows[0].top[0][2] == pytest.approx(0.8)
    assert len(table.rows[0].top) == 5
    df = table.to_dataframe()
    assert df.shape[0] == 2
    assert df["percent_retrieval"].tolist() == pytest.approx([10.0, 15.0])
    md = table.to_markdown().splitlines()
    assert len(md) == 4 and md[1].startswith("| ---")
    assert "L2H3 (0.80)" in md[2]


def test_universal_validation_and_roundtrip(tmp_path):
    with pytest.raises(ConfigError, match="at least one"):
        universal([])
    with pytest.raises(ConfigError, match="threshold"):
        universal([planted()], threshold=float("nan"))
    table = universal([planted()])
    back = UniversalTable.load(table.save(tmp_path / "u"))
    assert back == table


# ---- intrinsic ------------------------------------------------------------------------------
def test_intrinsic_identical_and_affine():
    grid = torch.rand(N_LAYERS, N_HEADS, generator=torch.Generator().manual_seed(1))
    res = intrinsic(constant(grid, "a"), constant(0.5 * grid + 0.1, "b"), k=5)
    assert res.pearson == pytest.approx(1.0, abs=1e-6)
    assert res.spearman == pytest.approx(1.0, abs=1e-6)
    assert res.overlap == 5 and res.jaccard == 1.0
    assert res.pairs().shape == (N_LAYERS * N_HEADS, 2)


def test_intrinsic_known_correlation_and_overlap():
    grid = torch.arange(20, dtype=torch.float32).reshape(N_LAYERS, N_HEADS) / 20
    moved = grid.clone()
    moved[3, 4] = 0.0  # the best head of A is dead in B
    res = intrinsic(constant(grid, "a"), constant(moved, "b"), k=3)
    assert res.top_a == [(3, 4), (3, 3), (3, 2)]
    assert res.top_b == [(3, 3), (3, 2), (3, 1)]
    assert res.overlap == 2
    assert res.jaccard == pytest.approx(2 / 4)
    assert res.shared == [(3, 3), (3, 2)]
    expected = pearson(grid.flatten(), moved.flatten())
    assert res.pearson == pytest.approx(expected)
    assert 0.0 < res.pearson < 0.9
    anti = intrinsic(constant(grid, "a"), constant(1 - grid, "c"), k=3)
    assert anti.pearson == pytest.approx(-1.0, abs=1e-6)
    assert anti.overlap == 0


def test_intrinsic_refuses_mismatched_shapes():
    a = constant(torch.rand(4, 5), "small")
    b = constant(torch.rand(3, 5), "big")
    with pytest.raises(ConfigError, match=r"'small' has 4x5.*'big' has 3x5"):
        intrinsic(a, b)


def test_intrinsic_k_validation_and_roundtrip(tmp_path):
    a, b = planted("a"), planted("b")
    with pytest.raises(ConfigError, match="larger than the number of heads"):
        intrinsic(a, b, k=21)
    with pytest.raises(ConfigError, match="positive integer"):
        intrinsic(a, b, k=0)
    res = intrinsic(a, b, k=4)
    back = IntrinsicResult.load(res.save(tmp_path / "i"))
    assert back.summary() == res.summary()
    assert back.top_a == res.top_a
    assert res.to_dataframe().shape[0] == N_LAYERS * N_HEADS


# ---- dynamic --------------------------------------------------------------------------------
def test_dynamic_finds_planted_heads():
    res = dynamic(planted())
    assert res.always_active == [(2, 3), (0, 4)]  # best mean first; failed probe ignored
    assert res.context_dependent == [(1, 1)]
    assert float(res.active_fraction[1, 1]) == pytest.approx(0.5)
    assert float(res.active_fraction[3, 0]) == 0.0
    assert res.n_probes == N_PROBES
    df = res.to_dataframe()
    assert df.iloc[0][["layer", "head"]].tolist() == [2, 3]
    assert int(df["always_active"].sum()) == 2


def test_dynamic_threshold_and_roundtrip(tmp_path):
    res = dynamic(planted(), active_threshold=0.1)
    assert res.always_active == [(2, 3)]  # L0H4's 0.05 no longer counts as active
    with pytest.raises(ConfigError, match="active_threshold"):
        dynamic(planted(), active_threshold=-1.0)
    back = DynamicResult.load(res.save(tmp_path / "d"))
    assert back.always_active == res.always_active
    assert back.context_dependent == res.context_dependent
    assert torch.equal(back.active_fraction, res.active_fraction)


# ---- stability ------------------------------------------------------------------------------
def test_stability_bootstrap_matches_retrieval_scores_bootstrap():
    noisy = planted()
    g = torch.Generator().manual_seed(3)
    noisy.per_probe += 0.05 * torch.rand(noisy.per_probe.shape, generator=g)
    res = stability(noisy, k=3, n_boot=200, seed=7, steps=[5, 20], repeats=3)
    boot = noisy.bootstrap(200, seed=7)  # the same draws, materialised
    ordered = boot.sort(0).values
    # 95% interval: linear interpolation at 0.025 * 199 and 0.975 * 199
    lo = ordered[4] * 0.025 + ordered[5] * 0.975
    hi = ordered[194] * 0.975 + ordered[195] * 0.025
    assert torch.allclose(res.ci_low, lo, atol=1e-5)
    assert torch.allclose(res.ci_high, hi, atol=1e-5)
    assert bool((res.ci_low <= res.mean + 1e-6).all() and (res.mean <= res.ci_high + 1e-6).all())
    assert res.n_retrieval_ci[0] <= res.n_retrieval <= res.n_retrieval_ci[1]


def test_stability_curve_on_planted_heads():
    # top-1 is L2H3 (0.8 everywhere) but L1H1 (1.0 on half the probes) beats it on small
    # subsets: about half of the 1-probe subsets get the top-1 wrong
    res = stability(planted(), k=1, n_boot=100, steps=[1, 2, 4, 20], repeats=60, seed=0)
    assert res.top == [(2, 3)]
    assert res.steps.tolist() == [1, 2, 4, 20]
    assert 0.25 < float(res.jaccard_mean[0]) < 0.75
    assert float(res.jaccard_mean[-1]) == 1.0 and float(res.jaccard_std[-1]) == 0.0
    assert res.probes_needed is not None and res.probes_needed > 2
    assert res.n_retrieval == 2
    assert res.to_dataframe().shape == (4, 3)
    assert res.heads_dataframe().iloc[0][["layer", "head"]].tolist() == [2, 3]


def test_stability_default_steps_end_at_all_probes(tmp_path):
    res = stability(planted(), k=2, n_boot=50, repeats=2)
    steps = res.steps.tolist()
    assert steps[0] == 1 and steps[-1] == N_PROBES and steps == sorted(set(steps))
    back = StabilityResult.load(res.save(tmp_path / "s"))
    assert back.top == res.top and back.probes_needed == res.probes_needed
    assert back.n_retrieval_ci == res.n_retrieval_ci
    assert torch.equal(back.steps, res.steps)


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"k": 0}, "k must be a positive integer"),
    ({"k": 21}, "larger than the number of heads"),
    ({"n_boot": 0}, "n_boot"),
    ({"repeats": 0}, "repeats"),
    ({"steps": [0, 5]}, "steps"),
    ({"steps": [N_PROBES + 1]}, "steps"),
    ({"level": 1.0}, "level"),
    ({"target": 0.0}, "target"),
])
def test_stability_validation(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        stability(planted(), **{"n_boot": 10, "repeats": 1, **kwargs})


# ---- figures --------------------------------------------------------------------------------
def _check_figure(fig, n_axes, tmp_path):
    assert isinstance(fig, Figure)
    assert len(fig.axes) == n_axes
    fig.savefig(tmp_path / "fig.png", dpi=40)  # draws everything: catches layout errors
    plt.close(fig)


def test_plot_head_heatmap(tmp_path):
    scores = planted()
    fig = plot_head_heatmap(scores, top=3)
    texts = [t.get_text() for t in fig.axes[0].texts]
    assert texts == ["1", "2", "3"]
    _check_figure(fig, 2, tmp_path)  # heatmap + colorbar
    _check_figure(plot_head_heatmap(scores.mean, top=0, title="grid"), 2, tmp_path)
    outer = Figure()
    ax1, _ = outer.subplots(1, 2)
    assert plot_head_heatmap(scores, ax=ax1) is outer
    _check_figure(outer, 3, tmp_path)
    with pytest.raises(ConfigError, match="top"):
        plot_head_heatmap(scores, top=-1)


def test_plot_property_figures(tmp_path):
    scores = planted()
    _check_figure(plot_sparsity(sparse(scores)), 2, tmp_path)
    _check_figure(plot_dynamic(dynamic(scores), top=8), 2, tmp_path)  # bars + colorbar
    res = intrinsic(scores, planted("b"), k=3)
    fig = plot_intrinsic(res)
    assert "Pearson r = 1.00" in fig.axes[0].get_title()
    _check_figure(fig, 1, tmp_path)
    stab = stability(scores, k=3, n_boot=30, repeats=2)
    _check_figure(plot_stability(stab), 2, tmp_path)
    # A hub-style model name used to push the left title off the figure (the demo's report).
    stab.model_name = "HuggingFaceTB/SmolLM2-135M-Instruct"
    fig = plot_stability(stab)
    fig.savefig(tmp_path / "stability.png", dpi=100)  # as the report draws it
    for text in (*(ax.title for ax in fig.axes), fig._suptitle):
        box = text.get_window_extent()
        assert box.x0 >= 0 and box.x1 <= fig.bbox.width, text.get_text()
    assert stab.model_name in fig._suptitle.get_text()
    _check_figure(plot_universal(universal([scores, planted("b")])), 1, tmp_path)


# ---- the paper's released scores ------------------------------------------------------------
@cache
def _official(name: str) -> RetrievalScores:
    return load_official(find_official_dir() / f"{name}.json")


@pytest.fixture
def official():
    folder = find_official_dir()
    if folder is None or not (folder / "llama-2-7b-80k.json").exists():
        pytest.skip("official head scores not found (set RHLENS_OFFICIAL_SCORES)")
    return _official


# number of heads above 0.1 per model, a fingerprint of the released files
OFFICIAL_RETRIEVAL = {"llama-2-7b-80k": 33, "Mistral-7B-v0.2-hf": 43, "Mixtral-8x7B-v0.1": 63,
                      "Qwen1.5-14B": 61, "Qwen1.5-14B-Chat": 68}


def test_official_llama_has_12_always_active_heads(official):
    res = dynamic(official("llama-2-7b-80k"))
    assert len(res.always_active) == 12  # the paper's figure
    assert all(float(res.mean[la, h]) > 0.1 for la, h in res.always_active)


@pytest.mark.parametrize("name", sorted(OFFICIAL_RETRIEVAL))
def test_official_sparsity(official, name):
    res = sparse(official(name))
    assert int(res.counts[0]) == OFFICIAL_RETRIEVAL[name]
    # the paper: 3-6% of heads; Mixtral's file gives 6.15%, just over the upper bound
    upper = 0.065 if name == "Mixtral-8x7B-v0.1" else 0.06
    assert 0.03 <= res.fraction(0.1) <= upper


def test_official_universal_table(official):
    table = universal([official(n) for n in sorted(OFFICIAL_RETRIEVAL)])
    assert {r.model: r.n_retrieval for r in table.rows} == OFFICIAL_RETRIEVAL
    assert {(r.n_layers, r.n_heads) for r in table.rows} == {(32, 32), (40, 40)}


@pytest.mark.parametrize(("a", "b"), [("Mistral-7B-v0.2-hf", "Mixtral-8x7B-v0.1"),
                                      ("Qwen1.5-14B", "Qwen1.5-14B-Chat")])
def test_official_variants_share_retrieval_heads(official, a, b):
    res = intrinsic(official(a), official(b), k=20)
    assert res.pearson > 0.8
    assert res.jaccard > 0.4


def test_official_unrelated_families_do_not(official):
    res = intrinsic(official("llama-2-7b-80k"), official("Mistral-7B-v0.2-hf"), k=20)
    assert abs(res.pearson) < 0.3


def test_official_shapes_mismatch(official):
    with pytest.raises(ConfigError, match=r"32x32.*40x40"):
        intrinsic(official("llama-2-7b-80k"), official("Qwen1.5-14B"))
