"""Chain of thought versus direct answers under retrieval-head masking (Wu et al., 2024, Sec. 5).

For every item of a task, prompting mode and mask, the model answers greedily through the
shared engine; the answer is extracted and graded by the task. Accuracies come with
bootstrap confidence intervals over items, and each mask's drop from the unmasked run with
a paired bootstrap (the same resampled items on both sides).

Work is item-major: the masks of one item (all acting only while answering) share the
prompt's KV cache, so M masks cost one prefill and M decodes per item.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from rhlens.ablation import Mask, ablation_hooks
from rhlens.cot.tasks import Task, get_task
from rhlens.engine import GenerationConfig, chat_prompt, generate_many
from rhlens.errors import ConfigError
from rhlens.identity import run_header
from rhlens.io import ProbeLog, Records, write_json

__all__ = ["CoTConfig", "CoTResult", "cot_ablation"]

Prompting = Literal["cot", "direct"]


@dataclass(frozen=True)
class CoTConfig:
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

    def budget(self, mode: str) -> int:
        return self.max_new_tokens_cot if mode == "cot" else self.max_new_tokens_direct


def _group(label: str) -> str:
    """``random-20-s1`` -> ``random-20``: seeds of one random mask pool together."""
    return re.sub(r"-s\d+$", "", label)


@dataclass
class CoTResult:
    """Every answer of a CoT run, with accuracies, intervals and drops.

    ``records``: one dict per (mask, mode, item) with ``task``, ``mask``, ``group`` (random
    seeds pooled), ``mode``, ``id``, ``gold``, ``output``, ``extracted``, ``correct``.
    """

    task: str
    kind: str
    model_name: str
    records: list[dict[str, Any]]
    masks: dict[str, dict[str, Any]]
    config: dict[str, Any] = field(default_factory=dict)

    def _rows(self, group: str, mode: str) -> list[dict[str, Any]]:
        rows = [r for r in self.records if r["group"] == group and r["mode"] == mode]
        if not rows:
            raise ConfigError(f"no answers for mask {group!r} in mode {mode!r}")
        return rows

    def _matrix(self, group: str, mode: str) -> np.ndarray:
        """[item, seed] correctness (one column unless random seeds were pooled)."""
        rows = self._rows(group, mode)
        ids = sorted({r["id"] for r in rows})
        masks = sorted({r["mask"] for r in rows})
        m = np.full((len(ids), len(masks)), np.nan)
        for r in rows:
            m[ids.index(r["id"]), masks.index(r["mask"])] = float(r["correct"])
        return m

    def accuracy(self, group: str = "none", mode: str = "cot") -> float:
        return float(np.nanmean(self._matrix(group, mode)))

    def _boot(self, values: np.ndarray) -> tuple[float, float]:
        rng = np.random.default_rng(self.config.get("seed", 0))
        n = values.shape[0]
        idx = rng.integers(0, n, size=(self.config.get("n_boot", 1000), n))
        stats = np.nanmean(values[idx].reshape(idx.shape[0], -1), axis=1)
        a = (1 - self.config.get("level", 0.95)) / 2
        return float(np.quantile(stats, a)), float(np.quantile(stats, 1 - a))

    def interval(self, group: str = "none", mode: str = "cot") -> tuple[float, float]:
        """Bootstrap interval of the accuracy, resampling items."""
        return self._boot(self._matrix(group, mode))

    def drop(self, group: str, mode: str = "cot", baseline: str = "none") -> tuple[float, float, float]:
        """Accuracy lost under a mask: (drop, low, high), a paired bootstrap over items."""
        base = np.nanmean(self._matrix(baseline, mode), axis=1)
        masked = np.nanmean(self._matrix(group, mode), axis=1)
        if base.shape != masked.shape:
            raise ConfigError("the baseline and the mask were run on different items")
        diff = (base - masked)[:, None]
        lo, hi = self._boot(diff)
        return float(diff.mean()), lo, hi

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
                row = {"task": self.task, "kind": self.kind, "mask": g, "mode": mode,
                       "n": int(np.isfinite(self._matrix(g, mode)).sum()),
                       "accuracy": self.accuracy(g, mode), "low": lo, "high": hi}
                if g != "none" and "none" in self.groups:
                    d, dlo, dhi = self.drop(g, mode)
                    row.update(drop=d, drop_low=dlo, drop_high=dhi)
                out.append(row)
        return out

    def to_dataframe(self):
        import pandas as pd

        return pd.DataFrame(self.table())

    def save(self, directory: str | Path) -> Path:
        directory = Path(directory)
        write_json(directory / f"cot_{self.task}.json",
                   {"kind": "CoTResult", "task": self.task, "task_kind": self.kind,
                    "model_name": self.model_name, "masks": self.masks, "config": self.config,
                    "table": self.table(), "records": self.records})
        return directory

    @classmethod
    def load(cls, path: str | Path) -> CoTResult:
        path = Path(path)
        if path.is_dir():
            files = sorted(f for f in path.glob("cot_*.json") if not f.name.endswith(".run.json"))
            if len(files) != 1:
                raise ConfigError(f"{path} holds {len(files)} CoT results; pass the file")
            path = files[0]
        data = json.loads(path.read_text())
        if data.get("kind") != "CoTResult":
            raise ConfigError(f"{path} is not a saved CoTResult")
        return cls(task=data["task"], kind=data["task_kind"], model_name=data["model_name"],
                   records=data["records"], masks=data["masks"], config=data.get("config", {}))


def cot_ablation(model, task: Task | str, *, masks: Sequence[Mask] = (Mask.none(),),
                 config: CoTConfig | None = None, tokenizer=None, means=None,
                 out: str | Path | None = None, progress: bool = False) -> CoTResult:
    """Accuracy of CoT and direct answers under each mask (the paper's Figure 10).

    Args:
        task: a :class:`~rhlens.cot.tasks.Task` or a name/path for :func:`get_task`.
        masks: e.g. ``sweep_masks(scores, ks=[20], seeds=3)``: none, top-K, random-K per seed.
        out: each answer is appended to ``out/cot_<task>.jsonl`` as it is made; a rerun with
            the same ``out`` skips what is there.
    """
    config = config or CoTConfig()
    task = get_task(task) if isinstance(task, (str, Path)) else task
    tokenizer = tokenizer or getattr(model, "tokenizer", None)
    masks = list(masks)
    labels = [m.label for m in masks]
    if len(set(labels)) != len(labels):
        raise ConfigError(f"mask labels must be unique, got {labels}")
    if any(m.phase == "all" and m.heads for m in masks):
        raise ConfigError("CoT masks act while answering (phase='decode'), as in the paper")
    hooks = {m.label: ablation_hooks(model, m.heads, mode=m.mode, phase=m.phase, means=means)
             for m in masks}
    name = getattr(model, "rhlens_name", None) or "model"
    log = None
    if out is not None:
        log = ProbeLog(out, run_header(model, None, config, task=task.name, items=[it.id for it in task],
                                       masks=[m.to_dict() for m in masks]), name=f"cot_{task.name}.jsonl")
    sink = Records(log, progress=progress, total=len(task) * len(masks) * len(config.prompting),
                   desc=f"cot {task.name}")
    done = sink.done
    for mode in config.prompting:
        work = [(it, m) for it in task for m in masks if f"{m.label}|{mode}|{it.id}" not in done]
        prompts = {it.id: chat_prompt(tokenizer, it.prompt(mode), chat_template=config.chat_template)
                   for it, _ in work}
        gens = generate_many(
            model, tokenizer, [prompts[it.id] for it, _ in work],
            config=GenerationConfig(max_new_tokens=config.budget(mode), stop_at_newline=False),
            item_hooks=lambda i, work=work: hooks[work[i][1].label])
        for (item, mask), gen in zip(work, gens):
            extracted = task.extract(gen.response, item)
            rec = {"key": f"{mask.label}|{mode}|{item.id}", "task": task.name, "mask": mask.label,
                   "group": _group(mask.label), "mode": mode, "id": item.id, "gold": item.answer,
                   "output": gen.response, "extracted": extracted,
                   "correct": bool(task.scorer(extracted, item)), "stop": gen.stop_reason}
            sink.add(rec)
    sink.close()
    records = [done[f"{m.label}|{mode}|{it.id}"] for mode in config.prompting for m in masks
               for it in task]
    return CoTResult(task=task.name, kind=task.kind, model_name=name, records=records,
                     masks={m.label: m.to_dict() for m in masks}, config=asdict(config))
