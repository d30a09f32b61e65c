"""A run's identity: everything that shapes its results, so that a resume never mixes two runs.

:func:`run_header` gathers it: the model (name, the weights' content hash, dtype), the
probes (haystack and needles by content hash, template, chat-template flag, placement, and
a hash of every probe's tokens under its key), the settings, and anything else the caller
names (masks, a task). What changes the cost but not the results (batch size, prefix reuse,
the engine's kernel choices other than ``expand_kv``, the device) and the grid itself (which
probes: a grid may be extended or cut, a probe may not change under its key) are *recorded*
beside it and never block a resume. :class:`rhlens.io.ProbeLog` writes the header to
``run.json`` and refuses to reopen the folder with any difference, naming it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from rhlens.store.files import json_normal
from rhlens.version import __version__

__all__ = ["RunHeader", "diff_identity", "merge_identity", "model_identity", "run_header",
           "split_settings"]

# Settings that change how fast a run goes, never what it finds.
RECORDED_ONLY = frozenset({"batch_size", "reuse_prefix", "lean_decode", "device", "progress"})
# Parts compared only on the keys both sides have (a grid may grow or shrink between runs).
KEYED_PARTS = ("probes.needles.", "probes.prompts.")
# Inside a kernel policy, the choices that DO change results (bf16 argmaxes move with them).
RESULT_SHAPING_KERNEL_KEYS = frozenset({"expand_kv"})
_KERNEL_POLICY_KEYS = ("kernels", "kernel_policy", "policy")


@dataclass(frozen=True)
class RunHeader:
    """What ``run.json`` holds: ``identity`` (must match to resume) and ``recorded`` (not)."""

    identity: dict[str, Any]
    recorded: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return json_normal({"identity": self.identity, "recorded": self.recorded,
                       "rhlens_version": __version__})


def split_settings(settings: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(shaping, recorded)``: a config's fields that change results, and those that don't."""
    settings = json_normal(settings) if settings is not None else {}
    shaping, recorded = {}, {}
    for key, value in settings.items():
        if key in RECORDED_ONLY:
            recorded[key] = value
        elif key in _KERNEL_POLICY_KEYS and isinstance(value, dict):
            inner = {k: v for k, v in value.items() if k in RESULT_SHAPING_KERNEL_KEYS}
            if inner:
                shaping[key] = inner
            recorded[key] = value
        else:
            shaping[key] = value
    return shaping, recorded


def model_identity(model: Any) -> dict[str, Any]:
    """``{"name", "weights_sha256", "dtype"}`` of a loaded model (or of a dict given as is).

    A model from :func:`rhlens.load_model` carries its weights' hash; another model gets
    ``weights_sha256: None`` and is known by name, dtype and shape only.
    """
    if isinstance(model, Mapping):
        return dict(model)
    known = getattr(model, "rhlens_identity", None)
    try:
        dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    except (AttributeError, StopIteration, TypeError):
        dtype = None
    if known:
        return {**known, "dtype": dtype or known.get("dtype")}
    cfg = getattr(model, "cfg", None)
    name = getattr(model, "rhlens_name", None) or str(getattr(cfg, "model_name", "model"))
    return {"name": name, "weights_sha256": None, "dtype": dtype,
            "shape": [getattr(cfg, "n_layers", None), getattr(cfg, "n_heads", None)]}


def run_header(model: Any = None, probes: Sequence[Any] | None = None, config: Any = None,
               **extra: Any) -> RunHeader:
    """The header of a run over ``probes`` with ``model`` and ``config``.

    Args:
        model: a loaded model, or its identity as :func:`rhlens.models.describe_model` gives.
        probes: :class:`~rhlens.probe.Probe` objects (a ``ProbeSet`` too); ``None`` for runs
            that are not over probes (then name their items in ``extra``).
        config: the run's settings (a dataclass or a dict), split by :func:`split_settings`.
        extra: more of the identity, e.g. ``masks=[m.to_dict() for m in masks]``; a kernel
            policy (``kernel_policy=``, ``kernels=`` or ``policy=``, a dict) is split like a
            config's: ``expand_kv`` into the identity, the whole policy recorded.
    """
    identity: dict[str, Any] = {}
    recorded: dict[str, Any] = {}
    if model is not None:
        identity["model"] = model_identity(model)
        device = _device(model)
        if device:
            recorded["device"] = device
    if probes is not None:
        probes = list(probes)
        identity["probes"] = probes_identity(probes)
        recorded["grid"] = probes_grid(probes)
    if config is not None:
        identity["config"], recorded["config"] = split_settings(config)
    for key, value in json_normal(extra).items():
        if key in _KERNEL_POLICY_KEYS and isinstance(value, dict):  # e.g. the resolved policy
            identity[key] = {k: v for k, v in value.items() if k in RESULT_SHAPING_KERNEL_KEYS}
            recorded[key] = value
        else:
            identity[key] = value
    return RunHeader(json_normal(identity), json_normal(recorded))


def _device(model: Any) -> str | None:
    try:
        return str(next(model.parameters()).device)
    except (AttributeError, StopIteration, TypeError):
        return None


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        out.update(_flat(v, key) if isinstance(v, dict) and v else {key: v})
    return out


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 48 else text[:45] + "..."


def _shown(old: Any, new: Any) -> str:
    """``old -> new``, each cut to where they differ (two long values sharing a prefix would
    otherwise show the same text on both sides)."""
    a, b = repr(old), repr(new)
    if len(a) <= 48 and len(b) <= 48:
        return f"{a} -> {b}"
    same = 0
    while same < min(len(a), len(b)) and a[same] == b[same]:
        same += 1
    start = max(0, same - 12)

    def cut(text: str) -> str:
        part = ("..." if start else "") + text[start:start + 45]
        return part + ("..." if len(text) > start + 45 else "")
    return f"{cut(a)} -> {cut(b)}"


def diff_identity(old: Mapping[str, Any], new: Mapping[str, Any], *, limit: int = 4,
                  only: Sequence[str] | None = None, ignore: Sequence[str] = ()) -> list[str]:
    """The differences between two identities, as ``"key: old -> new"`` lines.

    Keyed parts (a probe's prompt hash, a needle's content hash) are compared only where both
    sides have the key; a prompt hash is named only when nothing more telling differs. ``only``
    restricts the comparison to those top-level parts; ``ignore`` skips dotted keys (say,
    ``model.weights_sha256`` when it is not known yet).
    """
    a, b = _flat(dict(old)), _flat(dict(new))
    if only is not None:
        a = {k: v for k, v in a.items() if k.split(".")[0] in only}
        b = {k: v for k, v in b.items() if k.split(".")[0] in only}
    for key in ignore:
        a.pop(key, None)
        b.pop(key, None)
    keys = [k for k in dict.fromkeys([*a, *b]) if a.get(k) != b.get(k)
            and not (k.startswith(KEYED_PARTS) and (k not in a or k not in b))]
    telling = [k for k in keys if not k.startswith("probes.prompts.")]
    keys = telling or keys
    lines = [f"{k}: {_shown(a.get(k), b.get(k))}" for k in keys[:limit]]
    if len(keys) > limit:
        lines.append(f"and {len(keys) - limit} more")
    return lines


def merge_identity(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, Any]:
    """``old`` with the keyed parts of ``new`` added (what a run folder has seen so far)."""
    merged = json.loads(json.dumps(old))
    old_probes, new_probes = merged.get("probes"), new.get("probes")
    if not isinstance(old_probes, dict) or not isinstance(new_probes, dict):
        return merged  # probes named another way (a KV budget sweep lists their keys)
    for part in ("needles", "prompts"):
        target = old_probes.get(part)
        source = new_probes.get(part)
        if isinstance(target, dict) and isinstance(source, dict):
            for key, value in source.items():
                target.setdefault(key, value)
    return merged


def sha256_text(text: str) -> str:
    """SHA-256 of a string's UTF-8 bytes: the content hashes a run's identity is made of."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()



def probes_identity(probes: Sequence[Any]) -> dict[str, Any]:
    """What the probes (:class:`~rhlens.probes.Probe` objects) are made of, for a run's identity.

    The haystack (source and content hash), the template and chat-template flag, and the
    placement rule must be the same for every record of a run; ``needles`` (id -> content
    hash) and ``prompts`` (probe key -> hash of its tokens and answer span, which catches
    anything else) are *keyed*: a resume compares them only on the needles and probes both
    runs have, so a grid may be extended or cut (see :func:`probes_grid`) but a probe never
    changes under its key.
    """
    def distinct(key: str) -> Any:
        values = sorted({json.dumps(p.meta.get(key), sort_keys=True) for p in probes})
        values = [json.loads(v) for v in values]
        return values[0] if len(values) == 1 else values

    haystack = distinct("haystack")
    if isinstance(haystack, str) and haystack.startswith("dir:"):
        haystack = "dir"  # the folder may move; its content hash is what matters
    return {
        "haystack": haystack, "haystack_seed": distinct("seed"),
        "haystack_sha256": distinct("haystack_sha256"),
        "chat_template": distinct("chat_template"), "template_sha256": distinct("template_sha256"),
        "placement": distinct("placement"),
        "needles": {p.needle_id: p.meta.get("needle_sha256") for p in probes},
        "prompts": {p.key: sha256_text(json.dumps([list(p.prompt_ids), list(p.needle_span),
                                                   p.real_needle]))[:16] for p in probes},
    }


def probes_grid(probes: Sequence[Any]) -> dict[str, Any]:
    """The grid the probes cover: recorded with a run, but no part of its identity."""
    return {"lengths": sorted({p.length for p in probes}), "depths": sorted({p.depth for p in probes}),
            "needles": sorted({p.needle_id for p in probes}), "n_probes": len(probes)}
