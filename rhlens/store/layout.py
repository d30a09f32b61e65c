"""The run-folder layout: the name of every file rhlens writes, in one place.

A run directory (``--out`` of a command, or any folder a notebook saves into) holds::

    run.json, probes.jsonl        detect: its settings and one record per finished probe
    scores/                       RetrievalScores (all probes of the log)
    head_scores.json              the same in the paper's format (successful probes only)
    summary.json                  the headline numbers
    properties/sparse|dynamic|stability/   the properties a report shows, as saved results
    heatmap.png, score_distribution.png, niah.png
    niah.run.json, niah.jsonl     niah / mask-sweep: settings and one record per answer
    niah/  or  mask_sweep/        NIAHResult, or MaskSweepResult; niah_heatmaps.png, k_curve.png
    compress.run.json, compress.jsonl, compress/, compress.png   compress: the KV budget sweep
    cot_<task>.run.json, cot_<task>.jsonl, cot/<task>/, cot_bars.png      CoT
    families.run.json, families.jsonl                              score families
    patching.run.json, patching.jsonl, patching/, patching_vs_retrieval/, patching_heatmap.png
    .rhlens.lock, shards/<launch>/r<rank>/<log>                    the lock; shard logs

and a saved result (any of the directories above) holds ``result.json`` and, when it has
tensors, ``tensors.safetensors`` (``meta.json`` before the one protocol).

Files of older rhlens versions are still found: ``meta.json`` bundles, ``niah_result.json``
+ ``mask_sweep.json``, ``cot_<task>.json``, ``patching_vs_retrieval.json``.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["COMPRESS_LOG", "FAMILIES_LOG", "LEGACY_RESULT_FILE", "LOCK_FILE", "NIAH_LOG",
           "PATCHING_LOG", "PROBES_LOG", "PROPERTY_NAMES", "RESULT_FILE", "RUN_JSON", "SHARDS",
           "TENSOR_FILE", "RunDir", "cot_log_name", "run_json_of"]

RESULT_FILE = "result.json"  # a saved result's document
TENSOR_FILE = "tensors.safetensors"  # a saved result's tensors
LEGACY_RESULT_FILE = "meta.json"  # a result saved before the one protocol (schema 0)
LOCK_FILE = ".rhlens.lock"  # held while a process writes the folder
SHARDS = "shards"  # the folder of a run's shard logs: shards/<launch>/r<rank>/<log>
RUN_JSON = "run.json"  # the identity of a detection run (other logs: <log>.run.json)
PROBES_LOG = "probes.jsonl"  # the log of a detection run
NIAH_LOG = "niah.jsonl"  # the log of a NIAH sweep (its settings: niah.run.json)
COMPRESS_LOG = "compress.jsonl"  # the log of a KV budget sweep (its settings: compress.run.json)
FAMILIES_LOG = "families.jsonl"  # the log of score families (its settings: families.run.json)
PATCHING_LOG = "patching.jsonl"  # the log of head patching (its settings: patching.run.json)
PROPERTY_NAMES = ("sparse", "dynamic", "stability")


def cot_log_name(task: str) -> str:
    """``cot_<task>.jsonl``: the log of one CoT task."""
    return f"cot_{task}.jsonl"


def run_json_of(log: str) -> str:
    """The settings file beside the log ``log``: ``run.json`` for the detection log,
    ``<stem>.run.json`` for any other."""
    return RUN_JSON if log == PROBES_LOG else log.replace(".jsonl", ".run.json")


class RunDir:
    """The paths of one run directory (nothing is created by naming them)."""

    __slots__ = ("path",)

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    # detect
    run_json = property(lambda self: self.path / RUN_JSON)
    probes = property(lambda self: self.path / PROBES_LOG)
    scores = property(lambda self: self.path / "scores")
    head_scores = property(lambda self: self.path / "head_scores.json")
    summary = property(lambda self: self.path / "summary.json")
    properties = property(lambda self: self.path / "properties")
    heatmap = property(lambda self: self.path / "heatmap.png")
    distribution = property(lambda self: self.path / "score_distribution.png")
    niah_figure = property(lambda self: self.path / "niah.png")
    # niah / mask-sweep
    niah_log = property(lambda self: self.path / NIAH_LOG)
    niah = property(lambda self: self.path / "niah")
    mask_sweep = property(lambda self: self.path / "mask_sweep")
    niah_heatmaps = property(lambda self: self.path / "niah_heatmaps.png")
    k_curve = property(lambda self: self.path / "k_curve.png")
    legacy_niah = property(lambda self: self.path / "niah_result.json")
    legacy_sweep = property(lambda self: self.path / "mask_sweep.json")
    # compress
    compress_log = property(lambda self: self.path / COMPRESS_LOG)
    compress = property(lambda self: self.path / "compress")
    compress_figure = property(lambda self: self.path / "compress.png")
    # cot
    cot = property(lambda self: self.path / "cot")
    cot_figure = property(lambda self: self.path / "cot_bars.png")
    # patching
    patching = property(lambda self: self.path / "patching")
    patching_vs_retrieval = property(lambda self: self.path / "patching_vs_retrieval")
    patching_figure = property(lambda self: self.path / "patching_heatmap.png")
    patching_vs_retrieval_figure = property(lambda self: self.path / "patching_vs_retrieval.png")
    legacy_patching_vs_retrieval = property(
        lambda self: self.path / "patching_vs_retrieval.json")

    def property_dir(self, name: str) -> Path:
        """``properties/<name>`` (sparse, dynamic or stability)."""
        return self.properties / name

    def cot_result(self, task: str) -> Path:
        """``cot/<task>``: the saved CoTResult of one task."""
        return self.cot / task

    def cot_log(self, task: str) -> Path:
        """``cot_<task>.jsonl``: the answers of one task, as they are made."""
        return self.path / cot_log_name(task)
