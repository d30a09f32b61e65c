"""NIAH score against the KV budget: retrieval heads kept whole vs StreamingLLM, random and other heads.

For every budget (a share of the full cache's bytes at the probes' context length) the sweep
answers every probe under:

* each ranking's policy (``"retrieval"``: a detection run's scores; any other ``[layer, head]``
  grid, e.g. :func:`rhlens.families.needle_mass_scores`): the best-ranked KV heads kept whole, as many as
  the budget buys, the rest keeping sink + window tokens;
* ``streaming``: StreamingLLM, every KV head keeping sink + the window the budget buys;
* ``random-s<seed>``: as many KV heads as the ranked policies keep, drawn at random;

and once under the full cache. Every policy runs as a decode-time mask
(:mod:`rhlens.compress.mask`), so all of a probe's policies share one prefill and are decoded
together, one batch row per policy. Policies that attend to the same keys (e.g. every policy
at a budget that keeps every head) are answered once. Each answer is appended to the run's
log as it is made; a rerun with the same ``out`` resumes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from jaxtyping import Float
from torch import Tensor

from rhlens.compress.mask import PolicyMask
from rhlens.compress.policy import (
    CacheLayout,
    CompressConfig,
    HeadPolicy,
    budget_policy,
    full_policy,
    random_policy,
    streaming_policy,
)
from rhlens.distributed import Sweep, decode_step_tokens, engine_plan
from rhlens.engine import KernelPolicy, StepState, generate_many, model_tokenizer
from rhlens.errors import ConfigError
from rhlens.families import needle_mass_scores
from rhlens.masks import seed_list
from rhlens.niah import NIAHConfig, NIAHResult, answer_record, finished_records
from rhlens.probes.probe import Probe
from rhlens.retrieval import DetectConfig, check_probes
from rhlens.store.display import Displayed
from rhlens.store.identity import run_header
from rhlens.store.layout import COMPRESS_LOG
from rhlens.store.results import Config, Result
from rhlens.validate import check_resumed, niah_record_problem

__all__ = ["CompressSweepResult", "compress_sweep", "needle_attention_mass", "sweep_policies"]

RESERVED = ("full", "streaming", "random")


# ---------------------------------------------------------------------------------------
# The result
# ---------------------------------------------------------------------------------------
@dataclass
class CompressSweepResult(Displayed, Result):
    """NIAH answers of every probe under every cache policy of a budget sweep.

    Attributes:
        budgets: the budgets asked for (shares of the full KV bytes), ascending.
        context: the context length (tokens, the longest probe's prompt) the bytes are counted at.
        policies: label -> the policy with its bytes and actual share
            (:meth:`~rhlens.compress.policy.HeadPolicy.describe`); labels are ``full``,
            ``<ranking>@<budget>``, ``streaming@<budget>``, ``random-s<seed>@<budget>``.
        niah: the answers (``niah.masks`` holds the same policies; a record's ``mask`` is the
            policy's label).
        rankings: the names of the rankings, in order.
        seeds: the random policies' seeds.
        config: the :class:`CompressConfig`.
    """

    budgets: list[float]
    context: int
    policies: dict[str, dict[str, Any]]
    niah: NIAHResult
    rankings: list[str]
    seeds: list[int]
    config: Config | None = None

    def __post_init__(self) -> None:
        missing = [label for label in self.policies if label not in self.niah.masks]
        if missing:
            raise ConfigError(f"the NIAH result lacks the policies {', '.join(missing[:4])}")

    @property
    def model_name(self) -> str:
        return self.niah.model_name

    def score(self, label: str) -> float:
        """Mean NIAH score (ROUGE-1 recall x 100) under a policy."""
        return self.niah.score(label)

    def share(self, label: str) -> float:
        """The policy's KV bytes over the full cache's at :attr:`context` tokens."""
        return float(self.policies[label]["share"])

    @property
    def has_streaming(self) -> bool:
        return any(p.get("kind") == "streaming" for p in self.policies.values())

    def curve(self) -> dict[str, Any]:
        """Scores against budget: ``budget``, ``full``, one list per ranking, ``streaming``
        (when run), ``random_mean`` / ``random_std`` / ``random`` (per seed), and the actual
        shares (``share``: the ranked and random policies', ``streaming_share``)."""
        b = self.budgets
        out: dict[str, Any] = {"budget": list(b), "full": self.score("full"),
                               "rankings": list(self.rankings)}
        for name in self.rankings:
            out[name] = [self.score(f"{name}@{x:g}") for x in b]
        out["share"] = [self.share(f"{self.rankings[0]}@{x:g}") if self.rankings else
                        self.share(f"random-s{self.seeds[0]}@{x:g}") for x in b]
        if self.has_streaming:
            out["streaming"] = [self.score(f"streaming@{x:g}") for x in b]
            out["streaming_share"] = [self.share(f"streaming@{x:g}") for x in b]
        if self.seeds:
            rnd = [[self.score(f"random-s{s}@{x:g}") for s in self.seeds] for x in b]
            out["random"] = rnd
            out["random_mean"] = [float(np.mean(r)) for r in rnd]
            out["random_std"] = [float(np.std(r)) for r in rnd]
        return out

    def table(self) -> list[dict[str, Any]]:
        """One row per budget: the actual share, each policy's score, full heads kept."""
        c = self.curve()
        rows = []
        for i, b in enumerate(self.budgets):
            first = f"{self.rankings[0]}@{b:g}" if self.rankings else f"random-s{self.seeds[0]}@{b:g}"
            row = {"budget": b, "share": c["share"][i], "full_kv_heads": self.policies[first]["n_full"],
                   "of_kv_heads": self.policies[first]["n_selectable"], "full": c["full"]}
            for name in self.rankings:
                row[name] = c[name][i]
            if self.has_streaming:
                row["streaming"] = c["streaming"][i]
                row["streaming_share"] = c["streaming_share"][i]
                row["streaming_window"] = self.policies[f"streaming@{b:g}"]["window"]
            if self.seeds:
                row["random_mean"], row["random_std"] = c["random_mean"][i], c["random_std"][i]
            rows.append(row)
        return rows


# ---------------------------------------------------------------------------------------
# The policies of a sweep
# ---------------------------------------------------------------------------------------
def _budget_list(budgets: Sequence[float]) -> list[float]:
    if isinstance(budgets, (str, bytes)) or not isinstance(budgets, Sequence) or not budgets:
        raise ConfigError(f"budgets must be a non-empty list of shares in (0, 1], got {budgets!r}")
    out = sorted({float(b) for b in budgets})
    if any(not 0 < b <= 1 for b in out):
        raise ConfigError(f"every budget is a share of the KV bytes in (0, 1], got {list(budgets)!r}")
    return out


def sweep_policies(layout: CacheLayout, context: int, rankings: Mapping[str, Any],
                   budgets: Sequence[float], seeds: int | Sequence[int] = 3, *,
                   config: CompressConfig | None = None, streaming: bool = True,
                   windows: Mapping[float, int] | None = None,
                   ranking_windows: Mapping[str, int] | None = None) -> list[HeadPolicy]:
    """Every policy of a sweep, full first; each checked (a budget below the floor, a ranking
    that does not fit the model) before any compute.

    ``windows`` (budget -> window) gives a budget's ranked and random policies their own window
    of the other KV heads; ``ranking_windows`` (ranking -> window) a ranking's policies (e.g.
    one ranking under several names, one window each, all decoded on one prefill); otherwise
    ``config.window``."""
    config = config or CompressConfig()
    windows = {float(b): int(w) for b, w in (windows or {}).items()}
    ranking_windows = dict(ranking_windows or {})
    stray = sorted(set(ranking_windows) - set(rankings))
    if stray:
        raise ConfigError(f"ranking_windows names no ranking: {', '.join(stray)}")
    budget_list = _budget_list(budgets)
    seeds_ = seed_list(seeds) if not (isinstance(seeds, int) and seeds == 0) else []
    if not isinstance(rankings, Mapping):
        raise ConfigError("rankings must map a name to RetrievalScores or a [layer, head] grid")
    for name in rankings:
        if not isinstance(name, str) or not name or name in RESERVED or "@" in name or "|" in name:
            raise ConfigError(f"a ranking's name must be a plain word other than {RESERVED}, got {name!r}")
    if not rankings and not seeds_:
        raise ConfigError("a sweep needs a ranking or random seeds")
    policies = [full_policy(layout, config.sink, config.window)]
    stray = sorted(set(windows) - set(budget_list))
    if stray:
        raise ConfigError(f"windows names budgets not swept: {stray}")
    for b in budget_list:
        cfg = replace(config, window=windows[b]) if b in windows else config
        policies += [budget_policy(r, layout, context, b,
                                   replace(cfg, window=ranking_windows[name]) if name in ranking_windows
                                   else cfg, name=name) for name, r in rankings.items()]
        if streaming:
            policies.append(streaming_policy(layout, context, b, config.sink))
        policies += [random_policy(layout, context, b, s, cfg) for s in seeds_]
    return policies


# ---------------------------------------------------------------------------------------
# The sweep
# ---------------------------------------------------------------------------------------
def compress_sweep(model, probes: Sequence[Probe], rankings: Mapping[str, Any], *,
                   budgets: Sequence[float] = (0.1, 0.2, 0.3, 0.5), seeds: int | Sequence[int] = 3,
                   streaming: bool = True, config: CompressConfig | None = None,
                   niah: NIAHConfig | None = None, batch_size: int | None = None,
                   kernel_policy: KernelPolicy | None = None, tokenizer=None,
                   out: str | Path | None = None, progress: bool = True,
                   windows: Mapping[float, int] | None = None,
                   ranking_windows: Mapping[str, int] | None = None) -> CompressSweepResult:
    """NIAH score of ``probes`` against the KV budget for every policy (see the module).

    Args:
        rankings: name -> :class:`~rhlens.scores.RetrievalScores` or a ``[layer, head]`` (or
            ``[layer, kv_head]``) grid, e.g. ``{"retrieval": scores, "needle-mass": grid}``.
        budgets: shares of the full KV bytes at the longest probe's context length.
        seeds: random policies per budget (a count, or the seeds; 0: none).
        streaming: also run StreamingLLM at every budget.
        config: sink, window and pooling of the ranked and random policies.
        niah: answer length, success threshold (:class:`~rhlens.niah.NIAHConfig`).
        batch_size: a probe's policies decoded together (default: all of them, up to 32;
            each row holds its own copy of the prompt's KV cache).
        kernel_policy: the decode step's kernels (``None``: ``niah.generation.policy``, by
            default the device's, under which every row is answered exactly as it would be
            alone; ``KernelPolicy(rows="batch")`` shares one product per weight matrix between
            a batch's rows, faster on a CPU, and a row may then round as it would not alone).
        out: ``out/compress.jsonl`` gets every answer as it is made; a rerun resumes.
        windows, ranking_windows: a window per budget or per ranking (:func:`sweep_policies`).
    """
    config = config or CompressConfig()
    niah = niah or NIAHConfig()
    if not isinstance(config, CompressConfig) or not isinstance(niah, NIAHConfig):
        raise ConfigError("config must be a CompressConfig and niah a NIAHConfig")
    tokenizer = model_tokenizer(model, tokenizer)
    probes = list(probes)
    check_probes(probes, getattr(model.cfg, "n_ctx", None), niah.generation.max_new_tokens)
    layout = CacheLayout.of(model)
    context = max(p.n_tokens for p in probes)
    policies = sweep_policies(layout, context, rankings, budgets, seeds, config=config,
                              streaming=streaming, windows=windows, ranking_windows=ranking_windows)
    drawn = sorted({p.seed for p in policies if p.kind == "random"})
    # Policies that attend to the same keys answer alike: each distinct one runs once.
    specs: dict[tuple, int] = {}
    spec_of = {p.label: specs.setdefault(p.signature(layout), len(specs)) for p in policies}
    distinct = []
    for p in policies:
        if spec_of[p.label] == len(distinct):  # the first policy of each kind of keys
            distinct.append(p)
    labels_of: dict[int, list[str]] = {}
    for p in policies:
        labels_of.setdefault(spec_of[p.label], []).append(p.label)
    rows = min(len(distinct), 32) if batch_size is None else batch_size
    if isinstance(rows, bool) or not isinstance(rows, int) or rows < 1:
        raise ConfigError(f"batch_size must be an integer >= 1, got {batch_size!r}")

    name = getattr(model, "rhlens_name", None) or "model"
    described = {p.label: p.describe(layout, context) for p in policies}
    gen_config = replace(niah.generation, batch_size=rows,
                         policy=niah.generation.policy if kernel_policy is None else kernel_policy)
    # the kernels and the batch shape are part of the run: under rows="batch" a row's
    # rounding depends on its batch
    header = None if out is None else run_header(
        model, probes, niah, compress=config.to_dict(), context=context, policies=described,
        batch_size=rows, kernel_policy=gen_config.kernel_policy(model))
    device = next(model.parameters()).device
    sweep = Sweep(out, header, COMPRESS_LOG, total=len(probes) * len(policies), desc="compress",
                  weights={f"{p.label}|{q.key}": q.n_tokens for q in probes for p in policies},
                  progress=progress, device=device)
    check_resumed(sweep.done, niah_record_problem, f"{out}/{COMPRESS_LOG}", "NIAH record")
    order = sorted(probes, key=lambda p: (p.length, p.needle_id, -p.depth))
    work = [(p, i) for p in order for i in range(len(distinct))
            if any(f"{label}|{p.key}" not in sweep.done for label in labels_of[i])]
    # a probe's policies are rows of one batch on one prefill: one unit
    costs, links = engine_plan([p.prompt_ids for p, _ in work], max_new_tokens=gen_config.max_new_tokens,
                               batch_size=rows, chunk=gen_config.chunk_for(device),
                               world=sweep.world, step_tokens=decode_step_tokens(device))
    mask = PolicyMask(model, distinct, layout)
    state = StepState()
    keys = [f"{labels_of[i][0]}|{p.key}" for p, i in work]
    written = [f"{label}|{p.key}" for p, i in work for label in labels_of[i]]
    for unit in sweep.run(keys, costs, links, records=written):
        items = [work[u] for u in unit]
        mask.items = {j: i for j, (_, i) in enumerate(items)}
        # the bar moves at every decode step by the step's share of the unit's answers
        share = sum(p.n_tokens * len(labels_of[i]) for p, i in items) / gen_config.max_new_tokens
        state.on_step = lambda share=share: sweep.advance(share)
        gens = generate_many(model, tokenizer, [p.prompt_ids for p, _ in items], config=gen_config,
                             hooks=mask.hooks(), on_start=mask.on_start, state=state)
        try:
            for (probe, i), gen in zip(items, gens):
                todo = [label for label in labels_of[i] if f"{label}|{probe.key}" not in sweep.done]
                for n, label in enumerate(todo):  # one answer, counted once in the stats
                    sweep.add(answer_record(probe, gen.response, label, niah.success_threshold),
                              generation=gen if n == 0 else None)
        finally:
            gens.close()
    done = sweep.finish()
    labels = [p.label for p in policies]
    result = NIAHResult(records=finished_records(done, labels, probes), masks=described,
                        model_name=name, config=niah)
    return CompressSweepResult(budgets=_budget_list(budgets), context=context, policies=described,
                               niah=result, rankings=list(rankings), seeds=drawn, config=config)


# ---------------------------------------------------------------------------------------
# Another ranking: attention on the needle (its home is rhlens.families)
# ---------------------------------------------------------------------------------------
def needle_attention_mass(model, probes: Sequence[Probe], *, niah: NIAHConfig | None = None,
                          tokenizer=None, batch_size: int = 8) -> Float[Tensor, "layer head"]:
    """Each head's attention on the needle's answer span while the model answers, averaged
    over the answer's steps and the probes answered correctly: the ``mass`` score family.

    A thin alias of :func:`rhlens.families.needle_mass_scores` (the one home of this score)
    that takes the sweep's :class:`~rhlens.niah.NIAHConfig` (answer length, stopping, success
    threshold, prefill chunk).

    Raises:
        ConfigError: no probe was answered correctly.
    """
    niah = niah or NIAHConfig()
    if not isinstance(niah, NIAHConfig):
        raise ConfigError(f"niah must be a NIAHConfig, got {type(niah).__name__}")
    config = DetectConfig(success_threshold=niah.success_threshold,
                          generation=replace(niah.generation, batch_size=batch_size))
    return needle_mass_scores(model, probes, config=config, tokenizer=tokenizer)
