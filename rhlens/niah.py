"""Needle-in-a-haystack sweeps under head masks, the K curve, and hallucination classes.

Reproduces the paper's causal experiment (Wu et al., 2024, Sec. 4, Fig. 7): masking the
top-K retrieval heads breaks NIAH while masking K random heads does not, and the broken
answers are often fluent inventions rather than refusals.

Work is ordered probe-major: for each probe, every mask that leaves the prefill alone
(``phase="decode"``) reuses the same prompt KV cache, so a sweep over M masks costs about
one prefill per probe plus M decodes, not M prefills.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from rhlens.ablation import ablation_hooks
from rhlens.distributed import Sweep, engine_plan, shard_of
from rhlens.engine import GenerationConfig, StepState, generate_many, model_tokenizer
from rhlens.engine.holder import holds_generation
from rhlens.errors import ConfigError
from rhlens.masks import Mask, seed_list, sweep_masks
from rhlens.probes.probe import Probe
from rhlens.retrieval import check_probes
from rhlens.retrieval.scores import RetrievalScores
from rhlens.stats import rouge1_recall, rouge_tokens
from rhlens.store.display import Displayed
from rhlens.store.identity import run_header
from rhlens.store.layout import NIAH_LOG, RunDir
from rhlens.store.results import Config, Result, ResultError
from rhlens.store.runs import load_single_file
from rhlens.validate import check_resumed, niah_record_problem

__all__ = [
    "AnswerClass",
    "MaskSweepResult",
    "NIAHConfig",
    "NIAHResult",
    "answer_record",
    "classify_answer",
    "mask_sweep",
    "niah_sweep",
    "sweep_masks",
]

AnswerClass = Literal["correct", "partial", "hallucination", "refusal", "degenerate"]

_REFUSAL = re.compile(
    r"\b(i (do not|don't|cannot|can't) (know|find|answer|determine)|not (mentioned|stated|"
    r"provided|specified|given)|no information|unknown|does not (say|mention|specify))\b", re.I)


def classify_answer(response: str, reference: str, *, threshold: float = 0.5) -> AnswerClass:
    """Sort an answer into the paper's outcomes of masking.

    * ``correct``: ROUGE-1 recall of the reference above ``threshold``;
    * ``partial``: some of the answer's words, not enough (recall in [0.25, threshold]);
    * ``refusal``: empty, or says the text does not tell;
    * ``degenerate``: not language (mostly symbols, or one word repeated);
    * ``hallucination``: a fluent, confident answer not taken from the needle.
    """
    recall = rouge1_recall(reference, response)
    if recall > threshold:
        return "correct"
    text = response.strip()
    if not text or _REFUSAL.search(text):
        return "refusal"
    words = [t for t in rouge_tokens(text) if any(c.isalpha() for c in t)]  # any script
    letters = sum(c.isalpha() for c in text)
    if letters < 0.5 * len(text) or not words:
        return "degenerate"
    if len(words) >= 4 and Counter(words).most_common(1)[0][1] > 0.5 * len(words):
        return "degenerate"
    if recall >= 0.25:
        return "partial"
    return "hallucination"


@holds_generation("max_new_tokens", "stop_at_newline", "prefill_chunk")
@dataclass(frozen=True)
class NIAHConfig(Config):
    """Settings of a NIAH sweep.

    Attributes:
        success_threshold: ROUGE-1 recall above which an answer counts as correct.
        generation: how the model answers (:class:`~rhlens.engine.GenerationConfig`; the
            paper's harness, the default: 50 new tokens, stop at a newline).
    """

    success_threshold: float = 0.5
    generation: GenerationConfig = field(default_factory=GenerationConfig)

    def __post_init__(self) -> None:
        if not 0 <= self.success_threshold < 1:
            raise ConfigError("success_threshold is a ROUGE recall in [0, 1)")


@dataclass
class NIAHResult(Displayed, Result):
    """Answers of every probe under every mask.

    ``records`` has one dict per (mask, probe): ``mask``, ``key``, ``length``, ``depth``,
    ``needle_id``, ``response``, ``rouge_recall``, ``score`` (recall x 100, the paper's NIAH
    score) and ``answer_class``. ``config`` is the sweep's :class:`NIAHConfig` (a dict of its
    settings, the older form, is turned into one).
    """

    records: list[dict[str, Any]]
    masks: dict[str, dict[str, Any]]
    model_name: str
    config: Config | dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.config, dict):
            self.config = NIAHConfig.from_settings(self.config)

    @property
    def labels(self) -> list[str]:
        return list(self.masks)

    def for_mask(self, label: str) -> list[dict[str, Any]]:
        if label not in self.masks:
            raise ConfigError(f"no mask {label!r}; masks: {', '.join(self.masks)}")
        return [r for r in self.records if r["mask"] == label]

    def score(self, label: str) -> float:
        """Mean NIAH score (ROUGE-1 recall x 100) under a mask."""
        rows = self.for_mask(label)
        return float(np.mean([r["score"] for r in rows])) if rows else float("nan")

    def table(self) -> dict[str, float]:
        return {label: self.score(label) for label in self.masks}

    def class_counts(self, label: str) -> dict[str, int]:
        return dict(Counter(r["answer_class"] for r in self.for_mask(label)))

    def examples(self, label: str, baseline: str = "none", n: int = 3,
                 classes: Sequence[str] = ("hallucination",)) -> list[dict[str, Any]]:
        """Masked answers of the given classes next to the same probe's baseline answer."""
        base = {r["key"]: r for r in self.for_mask(baseline)}
        out = []
        for r in self.for_mask(label):
            # Only answers the mask broke: the same probe was answered right without it.
            if (r["answer_class"] in classes and r["key"] in base
                    and base[r["key"]]["answer_class"] == "correct"):
                out.append({"key": r["key"], "question": r.get("question", ""),
                            "expected": r.get("expected", ""),
                            "unmasked": base[r["key"]]["response"], "masked": r["response"],
                            "class": r["answer_class"]})
            if len(out) >= n:
                break
        return out

    def to_dataframe(self):
        import pandas as pd

        return pd.DataFrame(self.records)

    @classmethod
    def load(cls, directory: str | Path) -> NIAHResult:
        """A saved result; also the ``niah_result.json`` an older rhlens wrote (schema 0)."""
        return (load_single_file(cls, directory, RunDir(directory).legacy_niah.name) or
            super().load(directory))

    @classmethod
    def upgrade(cls, doc: dict[str, Any], version: int, directory: Path) -> dict[str, Any]:
        """Schema 0: one ``niah_result.json`` (model_name, masks, config dict, records)."""
        if version != 0:
            return super().upgrade(doc, version, directory)
        data = doc["meta"]
        missing = [k for k in ("records", "masks", "model_name") if k not in data]
        if missing:
            raise ResultError(f"{directory}/niah_result.json lacks {', '.join(missing)}")
        return {"kind": cls.kind, "schema_version": cls.schema_version, "fields": {
            "records": data["records"], "masks": data["masks"],
            "model_name": data["model_name"], "config": data.get("config") or None}}


def niah_sweep(model, probes: Sequence[Probe], *, masks: Sequence[Mask] = (Mask.none(),),
               config: NIAHConfig | None = None, tokenizer=None, means=None,
               out: str | Path | None = None, progress: bool = True) -> NIAHResult:
    """Answer every probe under every mask; NIAH score = ROUGE-1 recall x 100.

    ``out``: each finished (mask, probe) is appended to ``out/niah.jsonl``; a rerun with the
    same ``out`` skips what is there. Inside a ``torchrun`` launch the answers are split
    across the ranks (:class:`rhlens.distributed.Sweep`); every rank returns all of them.
    """
    config = config or NIAHConfig()
    if not isinstance(config, NIAHConfig):
        raise ConfigError(f"config must be a NIAHConfig, got {type(config).__name__}")
    tokenizer = model_tokenizer(model, tokenizer)
    part = shard_of(probes)
    probes = list(probes)
    check_probes(probes, getattr(model.cfg, "n_ctx", None), config.generation.max_new_tokens)
    masks = list(masks)
    if not masks or not all(isinstance(m, Mask) for m in masks):
        raise ConfigError("masks must be a non-empty sequence of Mask objects "
                          "(Mask.none() for the unmasked baseline)")
    labels = [m.label for m in masks]
    if len(set(labels)) != len(labels):
        raise ConfigError(f"mask labels must be unique, got {labels}")
    hooks = {m.label: ablation_hooks(model, m.heads, mode=m.mode, phase=m.phase, means=means)
             for m in masks}  # validates every mask before any compute
    name = getattr(model, "rhlens_name", None) or "model"
    header = None if out is None else run_header(
        model, probes, config, masks=[m.to_dict() for m in masks],
        kernel_policy=config.generation.kernel_policy(model))
    total = len(probes) * len(masks)
    sweep = Sweep(out, header, NIAH_LOG, total=total, desc="niah", progress=progress, shard=part,
                  weights={f"{m.label}|{p.key}": p.n_tokens for p in probes for m in masks},
                  device=next(model.parameters()).device)
    check_resumed(sweep.done, niah_record_problem, f"{out}/{NIAH_LOG}", "NIAH record")
    order = sorted(probes, key=lambda p: (p.length, p.needle_id, -p.depth))
    work = [(p, m) for p in order for m in masks if f"{m.label}|{p.key}" not in sweep.done]
    keys = [m.label if (m.phase == "all" and m.heads) else None for _, m in work]
    generation = config.generation
    costs, links = engine_plan([p.prompt_ids for p, _ in work], max_new_tokens=generation.max_new_tokens,
                               chunk=generation.chunk_for(next(model.parameters()).device),
                               prefill_keys=keys)
    for unit in sweep.run([f"{m.label}|{p.key}" for p, m in work], costs, links):
        items = [work[i] for i in unit]
        state = StepState()  # the bar moves with every prefill chunk and decode step
        state.spread(sum(p.n_tokens for p, _ in items), config.generation.max_new_tokens, sweep.advance)
        gens = generate_many(model, tokenizer, [p.prompt_ids for p, _ in items],
                             config=config.generation, state=state,
                             item_hooks=lambda i, items=items: hooks[items[i][1].label],
                             prefill_keys=[keys[i] for i in unit])
        for (probe, mask), gen in zip(items, gens):
            sweep.add(answer_record(probe, gen.response, mask.label, config.success_threshold),
                      generation=gen)
    found = sweep.finish()
    return NIAHResult(records=finished_records(found, labels, probes),
                      masks={m.label: m.to_dict() for m in masks}, model_name=name, config=config)


def answer_record(probe: Probe, response: str, label: str, threshold: float = 0.5) -> dict[str, Any]:
    """The log record of ``probe`` answered with ``response`` under the mask (or cache
    policy) ``label``: its NIAH score (ROUGE-1 recall x 100) and answer class."""
    recall = rouge1_recall(probe.real_needle, response)
    return {"key": f"{label}|{probe.key}", "mask": label, "probe": probe.key,
            "length": probe.length, "depth": probe.depth, "needle_id": probe.needle_id,
            "question": probe.question, "expected": probe.real_needle,
            "response": response, "rouge_recall": recall, "score": 100 * recall,
            "answer_class": classify_answer(response, probe.real_needle, threshold=threshold)}


def finished_records(done: dict[str, dict[str, Any]], labels: Sequence[str],
                     probes: Sequence[Probe]) -> list[dict[str, Any]]:
    """A sweep's records, label-major, each keyed by its probe's own key (for per-probe joins)."""
    records = [dict(done[f"{label}|{p.key}"]) for label in labels for p in probes]
    for r in records:
        r.setdefault("probe", r["key"].split("|", 1)[1])
    for r in records:
        r["key"] = r["probe"]
    return records


# ---------------------------------------------------------------------------------------
# The K curve (Figure 7)
# ---------------------------------------------------------------------------------------
@dataclass
class MaskSweepResult(Displayed, Result):
    """Mean NIAH score against K for top-K and random-K masks (the paper's Figure 7)."""

    ks: list[int]
    niah: NIAHResult
    seeds: list[int]

    def __post_init__(self) -> None:
        if not self.seeds:
            raise ConfigError("a mask sweep has at least one random seed per K")
        missing = [f"top-{k}" for k in self.ks if k and f"top-{k}" not in self.niah.masks]
        missing += [f"random-{k}-s{s}" for k in self.ks if k for s in self.seeds
                    if f"random-{k}-s{s}" not in self.niah.masks]
        if "none" not in self.niah.masks:
            missing.insert(0, "none")
        if missing:
            raise ConfigError(f"the NIAH result lacks the sweep's masks {', '.join(missing[:4])}")

    def curve(self) -> dict[str, Any]:
        base = self.niah.score("none")
        top = [base if k == 0 else self.niah.score(f"top-{k}") for k in self.ks]
        rnd = [[base] * len(self.seeds) if k == 0 else
               [self.niah.score(f"random-{k}-s{s}") for s in self.seeds] for k in self.ks]
        return {"k": list(self.ks), "top": top,
                "random_mean": [float(np.mean(r)) for r in rnd],
                "random_std": [float(np.std(r)) for r in rnd],
                "random": rnd}

    def k_below(self, level: float = 50.0) -> int | None:
        """Smallest K whose top-K mask brings the NIAH score below ``level``."""
        for k, s in zip(self.ks, self.curve()["top"]):
            if s < level:
                return k
        return None

    def heatmap_labels(self) -> list[str]:
        """The masks worth a NIAH map: none, and the largest K's top and first random mask."""
        kmax = max(self.ks)
        return ["none"] + ([f"top-{kmax}", f"random-{kmax}-s{self.seeds[0]}"] if kmax else [])

    @classmethod
    def load(cls, directory: str | Path) -> MaskSweepResult:
        """A saved sweep; also the ``mask_sweep.json`` + ``niah_result.json`` an older
        rhlens wrote into one directory (schema 0)."""
        return (load_single_file(cls, directory, RunDir(directory).legacy_sweep.name) or
            super().load(directory))

    @classmethod
    def upgrade(cls, doc: dict[str, Any], version: int, directory: Path) -> dict[str, Any]:
        """Schema 0: ``mask_sweep.json`` (ks, seeds) beside the sweep's ``niah_result.json``."""
        if version != 0:
            return super().upgrade(doc, version, directory)
        data = doc["meta"]
        if "ks" not in data or "seeds" not in data:
            raise ResultError(f"{directory}/mask_sweep.json lacks ks or seeds")
        # The NIAH part lay beside the sweep, not below it: read it here, as a value.
        return {"kind": cls.kind, "schema_version": cls.schema_version,
                "fields": {"ks": data["ks"], "seeds": data["seeds"],
                           "niah": NIAHResult.load(directory)}}


def mask_sweep(model, probes: Sequence[Probe], scores: RetrievalScores, *,
               ks: Sequence[int] = (0, 2, 5, 10, 20), seeds: int | Sequence[int] = 3,
               mode: str = "uniform", phase: str = "decode", config: NIAHConfig | None = None,
               tokenizer=None, means=None, out: str | Path | None = None,
               progress: bool = True) -> MaskSweepResult:
    """NIAH score against K for the top-K retrieval heads and K random heads.

    Every argument is checked before any compute: the scores must fit the model, ``ks``
    hold at least one K > 0 and none above the number of heads, ``seeds`` be >= 1.
    """
    if scores.n_layers != int(model.cfg.n_layers) or scores.n_heads != int(model.cfg.n_heads):
        raise ConfigError(
            f"the scores are for a {scores.n_layers}x{scores.n_heads} model, this model is "
            f"{model.cfg.n_layers}x{model.cfg.n_heads}; use scores detected on this model")
    seeds = seed_list(seeds)
    masks = sweep_masks(scores, ks, seeds, mode=mode, phase=phase)
    result = niah_sweep(model, probes, masks=masks, config=config, tokenizer=tokenizer,
                        means=means, out=out, progress=progress)
    return MaskSweepResult(ks=sorted({0, *ks}), niah=result, seeds=seeds)
