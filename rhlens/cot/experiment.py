"""Chain of thought versus direct answers under retrieval-head masking (Wu et al., 2024, Sec. 5).

For every item of a task, prompting mode and mask, the model answers greedily through the
shared engine; the answer is extracted and graded by the task. Accuracies come with
bootstrap confidence intervals over items, and each mask's drop from the unmasked run with
a paired bootstrap (the same resampled items on both sides), both through
:func:`rhlens.stats.bootstrap_means`.

Work is item-major: the masks of one item (all acting only while answering) share the
prompt's KV cache, so M masks cost one prefill and M decodes per item.

With ``out=RUN`` each answer is appended to ``RUN/cot_<task>.jsonl`` as it is made (the
run's settings in ``RUN/cot_<task>.run.json``) and a rerun resumes from it; the run
directory's layout (the saved result in ``RUN/cot/<task>/``) is :mod:`rhlens.store.layout`'.
:meth:`CoTResult.load` also reads the ``cot_<task>.json`` files of earlier versions.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from rhlens.ablation import ablation_hooks
from rhlens.cot.items import Task, as_task
from rhlens.cot.tasks import get_task
from rhlens.distributed import Sweep, engine_plan
from rhlens.engine import GenerationConfig, chat_prompt, generate_many, model_tokenizer
from rhlens.errors import ConfigError
from rhlens.masks import as_masks
from rhlens.stats import bootstrap_means, percentile_interval
from rhlens.store.display import Displayed
from rhlens.store.identity import run_header
from rhlens.store.results import RESULT_FILE, Config, Result, ResultError, read_json
from rhlens.validate import check_resumed, cot_record_problem

__all__ = ["CoTConfig", "CoTResult", "as_masks", "cot_ablation"]

Prompting = Literal["cot", "direct"]


@dataclass(frozen=True)
class CoTConfig(Config):
    """Settings of a CoT-vs-direct run.

    Attributes:
        prompting: which prompt forms to run.
        max_new_tokens_cot / max_new_tokens_direct: answer budgets (reasoning needs room).
        chat_template: wrap prompts in the tokenizer's chat template.
        n_boot / level / seed: bootstrap resamples, interval level and seed.
    """

    prompting: tuple[Prompting, ...] = ("cot", "direct")
    max_new_tokens_cot: int = 160
    max_new_tokens_direct: int = 24
    chat_template: bool = True
    n_boot: int = 1000
    level: float = 0.95
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "prompting", tuple(self.prompting))
        if not self.prompting or any(p not in ("cot", "direct") for p in self.prompting):
            raise ConfigError(f"prompting must be a non-empty subset of (cot, direct), "
                              f"got {self.prompting}")
        if min(self.max_new_tokens_cot, self.max_new_tokens_direct) < 1:
            raise ConfigError("max_new_tokens must be >= 1")
        if not 0 < self.level < 1:
            raise ConfigError("level must be in (0, 1)")
        if isinstance(self.n_boot, bool) or not isinstance(self.n_boot, int) or self.n_boot < 1:
            raise ConfigError(f"n_boot must be a positive whole number, got {self.n_boot!r}")

    def budget(self, mode: str) -> int:
        return self.max_new_tokens_cot if mode == "cot" else self.max_new_tokens_direct


def _group(label: str) -> str:
    """``random-20-s1`` -> ``random-20``: seeds of one random mask pool together."""
    return re.sub(r"-s\d+$", "", label)


@dataclass
class CoTResult(Displayed, Result):
    """Every answer of a CoT run, with accuracies, intervals and drops.

    ``records``: one dict per (mask, mode, item) with ``task``, ``mask``, ``group`` (random
    seeds pooled), ``mode``, ``id``, ``gold``, ``output``, ``extracted``, ``correct``.
    ``task_kind`` is the task's kind (``"context"`` / ``"knowledge"``; ``CoTResult.kind`` is
    the result kind of the save/load protocol).
    """

    task: str
    task_kind: str
    model_name: str
    records: list[dict[str, Any]]
    masks: dict[str, dict[str, Any]]
    config: CoTConfig | dict[str, Any] = field(default_factory=CoTConfig)  # a dict becomes one

    def __post_init__(self) -> None:
        if isinstance(self.config, dict):  # as results were built by hand before
            self.config = CoTConfig.from_dict(self.config)
        if not isinstance(self.config, CoTConfig):
            raise ConfigError(f"config must be a CoTConfig, got {type(self.config).__name__}")

    # -- numbers --
    def _per_item(self, group: str, mode: str) -> tuple[list[Any], Tensor]:
        """Item ids (sorted) and each item's correctness, averaged over the seeds of ``group``."""
        cells: dict[Any, list[float]] = {}
        for r in self.records:
            if r["group"] == group and r["mode"] == mode:
                cells.setdefault(r["id"], []).append(float(r["correct"]))
        if not cells:
            raise ConfigError(f"no answers for mask {group!r} in mode {mode!r}")
        ids = sorted(cells)
        return ids, torch.tensor([sum(cells[i]) / len(cells[i]) for i in ids], dtype=torch.float64)

    def _interval(self, values: Tensor) -> tuple[float, float]:
        boot = bootstrap_means(values, self.config.n_boot, self.config.seed)
        lo, hi = percentile_interval(boot, self.config.level)
        return float(lo), float(hi)

    def accuracy(self, group: str = "none", mode: str = "cot") -> float:
        """Share of items answered correctly (random-mask seeds averaged per item)."""
        return float(self._per_item(group, mode)[1].mean())

    def interval(self, group: str = "none", mode: str = "cot") -> tuple[float, float]:
        """Bootstrap interval of the accuracy, resampling items."""
        return self._interval(self._per_item(group, mode)[1])

    def drop(self, group: str, mode: str = "cot", baseline: str = "none") -> tuple[float, float, float]:
        """Accuracy lost under a mask: (drop, low, high), a paired bootstrap over items."""
        base_ids, base = self._per_item(baseline, mode)
        ids, masked = self._per_item(group, mode)
        if ids != base_ids:
            raise ConfigError("the baseline and the mask were run on different items")
        diff = base - masked
        return (float(diff.mean()), *self._interval(diff))

    @property
    def groups(self) -> list[str]:
        return list(dict.fromkeys(r["group"] for r in self.records))

    @property
    def modes(self) -> list[str]:
        return list(dict.fromkeys(r["mode"] for r in self.records))

    def table(self) -> list[dict[str, Any]]:
        """One row per (mask group, mode): accuracy with its interval, drop with its interval."""
        out = []
        for mode in self.modes:
            for g in self.groups:
                lo, hi = self.interval(g, mode)
                row = {"task": self.task, "kind": self.task_kind, "mask": g, "mode": mode,
                       "n": sum(r["group"] == g and r["mode"] == mode for r in self.records),
                       "accuracy": self.accuracy(g, mode), "low": lo, "high": hi}
                if g != "none" and "none" in self.groups:
                    d, dlo, dhi = self.drop(g, mode)
                    row.update(drop=d, drop_low=dlo, drop_high=dhi)
                out.append(row)
        return out

    def to_dataframe(self):
        import pandas as pd

        return pd.DataFrame(self.table())

    # -- files --
    @classmethod
    def load(cls, directory: str | Path) -> CoTResult:
        """A saved result (its directory, or the ``result.json`` in it); also the
        ``cot_<task>.json`` an older rhlens wrote (the file, or a directory holding one)."""
        path = Path(directory)
        legacy = _legacy_file(path)
        if legacy is None:
            return super().load(path.parent if path.is_file() else path)
        data = read_json(legacy, "a CoT result")
        if not isinstance(data, dict) or data.get("kind") != cls.kind:
            raise ResultError(f"{legacy} holds no {cls.kind}")
        doc = cls.upgrade({"kind": cls.kind, "schema_version": 0, "meta": data}, 0, legacy.parent)
        return cls._from_doc(doc, legacy.parent)

    @classmethod
    def upgrade(cls, doc: dict[str, Any], version: int, directory: Path) -> dict[str, Any]:
        """Schema 0: the single ``cot_<task>.json`` of earlier versions (config as a dict)."""
        if version != 0:
            return super().upgrade(doc, version, directory)
        old = doc["meta"]
        try:
            fields = {"task": old["task"], "task_kind": old["task_kind"],
                      "model_name": old["model_name"], "records": old["records"],
                      "masks": old["masks"],
                      "config": {"__config__": {"type": "CoTConfig", **old.get("config", {})}}}
        except KeyError as exc:
            raise ResultError(f"{directory} holds an old CoT result without {exc}") from exc
        return {"kind": cls.kind, "schema_version": cls.schema_version, "fields": fields}


def _legacy_file(path: Path) -> Path | None:
    """The older ``cot_<task>.json`` that ``path`` names or holds; ``None`` for a result
    directory (or its ``result.json``), or anything else (the protocol's load explains)."""
    if path.is_file():
        return None if path.name == RESULT_FILE else path
    if not path.is_dir() or (path / RESULT_FILE).exists():
        return None
    old = [f for f in sorted(path.glob("cot_*.json")) if not f.name.endswith(".run.json")]
    if len(old) > 1:
        raise ResultError(f"{path} holds {len(old)} CoT results ({', '.join(f.name for f in old)}); "
                          "load one of the files")
    return old[0] if old else None


# ---------------------------------------------------------------------------------- masks
# -------------------------------------------------------------------------------- the run
def _fingerprint(task: Task) -> str:
    """What a resumed log must match: every item's prompts and gold answer."""
    h = hashlib.sha256()
    for it in task:
        h.update(json.dumps([it.id, it.cot_prompt, it.direct_prompt, it.answer]).encode())
    return h.hexdigest()[:16]


def cot_ablation(model, task: Task | str | Path | Iterable[Any], *, masks: Any = None,
                 k: int | None = None, seeds: int | Sequence[int] = 0, mask_mode: str = "uniform",
                 grade: Callable[[str, str], bool] | None = None, config: CoTConfig | None = None,
                 tokenizer=None, means=None, out: str | Path | None = None,
                 progress: bool = True) -> CoTResult:
    """Accuracy of CoT and direct answers under each mask (the paper's Figure 10).

    Args:
        task: a :class:`~rhlens.cot.items.Task`, a name or file for :func:`get_task`, or
            your own items: ``(prompt, answer)`` pairs, :class:`~rhlens.cot.items.Question`
            or ``TaskItem`` objects (see :func:`~rhlens.cot.items.as_task` for how their
            answers are graded; ``grade(output, gold) -> bool`` replaces that rule).
        masks, k, seeds, mask_mode: what to knock out (:func:`as_masks`): ``Mask`` objects,
            ``(layer, head)`` pairs, or ``RetrievalScores`` with ``k`` (top-K, and random-K
            per seed); the unmasked baseline is always run.
        config: :class:`CoTConfig`.
        means: per-head means for ``mode="mean"`` masks.
        out: a run directory; each answer is appended to ``out/cot_<task>.jsonl`` as it is
            made, and a rerun with the same ``out`` skips what is there.

    Inside a ``torchrun`` launch the answers are split across the ranks
    (:class:`rhlens.distributed.Sweep`); every rank returns all of them.
    """
    config = config or CoTConfig()
    n_ctx = getattr(getattr(model, "cfg", None), "n_ctx", None)
    for mode in config.prompting:  # before any buffer is sized by the budget
        if isinstance(n_ctx, int) and n_ctx > 0 and config.budget(mode) >= n_ctx:
            raise ConfigError(f"max_new_tokens_{mode}={config.budget(mode)} (of the CoTConfig) does "
                              f"not fit the model's maximum context of {n_ctx} tokens, which must "
                              f"also hold the prompt; use max_new_tokens_{mode} below {n_ctx}")
    task = get_task(task) if isinstance(task, (str, Path)) else as_task(task, grade=grade)
    tokenizer = model_tokenizer(model, tokenizer)
    masks = as_masks(masks, k=k, seeds=seeds, mode=mask_mode)
    hooks = {m.label: ablation_hooks(model, m.heads, mode=m.mode, phase=m.phase, means=means)
             for m in masks}  # validates every mask against the model before any compute
    name = getattr(model, "rhlens_name", None) or "model"
    header = None if out is None else run_header(
        model, None, config, task=task.name, items=[it.id for it in task],
        prompts=_fingerprint(task), masks=[m.to_dict() for m in masks],
        kernel_policy=GenerationConfig().kernel_policy(model))
    sweep = Sweep(out, header, f"cot_{task.name}.jsonl",
                  total=len(task) * len(masks) * len(config.prompting), desc=f"cot {task.name}",
                  progress=progress, device=next(model.parameters()).device)
    check_resumed(sweep.done, cot_record_problem, f"{out}/cot_{task.name}.jsonl", "CoT record")
    for mode in config.prompting:
        work = [(it, m) for it in task for m in masks
                if f"{m.label}|{mode}|{it.id}" not in sweep.done]
        prompts = {it.id: chat_prompt(tokenizer, it.prompt(mode), chat_template=config.chat_template)
                   for it, _ in work}
        generation = GenerationConfig(max_new_tokens=config.budget(mode), stop_at_newline=False)
        costs, links = engine_plan([prompts[it.id] for it, _ in work],
                                   max_new_tokens=config.budget(mode),
                                   chunk=generation.chunk_for(next(model.parameters()).device))
        for unit in sweep.run([f"{m.label}|{mode}|{it.id}" for it, m in work], costs, links):
            items = [work[i] for i in unit]
            gens = generate_many(model, tokenizer, [prompts[it.id] for it, _ in items],
                                 config=generation,
                                 item_hooks=lambda i, items=items: hooks[items[i][1].label])
            for (item, mask), gen in zip(items, gens):
                extracted = task.extract(gen.response, item)
                sweep.add({"key": f"{mask.label}|{mode}|{item.id}", "task": task.name,
                           "mask": mask.label, "group": _group(mask.label), "mode": mode,
                           "id": item.id, "gold": item.answer, "output": gen.response,
                           "extracted": extracted, "correct": bool(task.scorer(extracted, item)),
                           "stop": gen.stop_reason}, generation=gen)
    done = sweep.finish()
    records = [done[f"{m.label}|{mode}|{it.id}"] for mode in config.prompting for m in masks
               for it in task]
    return CoTResult(task=task.name, task_kind=task.kind, model_name=name, records=records,
                     masks={m.label: m.to_dict() for m in masks}, config=config)
