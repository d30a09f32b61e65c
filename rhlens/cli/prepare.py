"""What a subcommand does before the model loads: everything that can fail on a typo, fails here.

In order: take the output folder (it must be writable and not in use by another process),
check the device, read the model's grid and context from its config (no weights), load
the tokenizer, build and check the probes, load the scores and check them against the
grid, and check that a run already in the folder is the same run. Only then do the
weights load.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from rhlens.cli.args import needles, probe_config, say
from rhlens.errors import ConfigError, RhlensError

__all__ = ["check_records", "check_resume", "is_main", "load", "model_facts", "probes", "record_split",
           "scores", "take_output", "tokenizer"]


def take_output(args: argparse.Namespace) -> Path:
    """``--out``, created, checked writable and locked for this process (under torchrun:
    for the launch, :func:`rhlens.distributed.lock_launch`)."""
    from rhlens.distributed import lock_launch

    return lock_launch(args.out)


def is_main() -> bool:
    """Whether this process writes the outputs (rank 0 under torchrun, else always)."""
    from rhlens.distributed import is_main as main

    return main()


def model_facts(args: argparse.Namespace):
    """The device checked and the model's :class:`~rhlens.models.ModelShape`, weights unread.

    Under torchrun the default device (or ``cuda``) is this rank's GPU, ``cuda:LOCAL_RANK``.
    """
    from rhlens.distributed import rank_device
    from rhlens.models import check_device, model_shape

    if getattr(args, "device_map", None):
        if args.device is not None:
            raise ConfigError("--device and --device-map: give one of them")
    else:
        if getattr(args, "max_memory", None) is not None:
            raise ConfigError("--max-memory budgets the devices of --device-map: give --device-map too")
        args.device = rank_device(check_device(args.device))
    return model_shape(args.model, offline=args.offline)


def tokenizer(args: argparse.Namespace):
    from rhlens.models import load_tokenizer

    return load_tokenizer(args.model, offline=args.offline)


def probes(args: argparse.Namespace, tok, shape, *, max_new_tokens: int | None = None):
    """The probe grid the flags describe, checked against the model's context."""
    from rhlens.probes import build_probes
    from rhlens.retrieval import check_probes

    haystack = args.haystack
    if getattr(args, "split", None) and haystack is None:
        from rhlens.needlesets import split_haystack

        haystack = split_haystack(args.split)
    built = build_probes(tok, config=probe_config(args), needles=needles(args),
                         haystack=haystack, max_length=shape.n_ctx)
    if max_new_tokens is not None:
        check_probes(built.probes, shape.n_ctx, max_new_tokens, name="--max-new-tokens")
    return built


def scores(path: str | None, shape):
    """Retrieval scores from ``--scores``, checked against the model's grid."""
    if path is None:
        return None
    from rhlens.retrieval.scores import RetrievalScores

    try:
        loaded = RetrievalScores.from_any(path)
    except RhlensError as exc:
        raise ConfigError(f"--scores: {exc}" if str(path) in str(exc) else
                          f"--scores {path}: {exc}") from None
    except FileNotFoundError as exc:
        raise ConfigError(f"--scores {path}: {exc.strerror or exc}") from None
    except Exception as exc:
        # json, safetensors and the paper format's own errors: a damaged or foreign file
        if (not isinstance(exc, (ValueError, TypeError, KeyError, OSError, RuntimeError)) and
                type(exc).__name__ != "SafetensorError"):
            raise
        raise ConfigError(f"--scores {path} cannot be read ({type(exc).__name__}: "
                          f"{str(exc).splitlines()[0] if str(exc) else ''}); is it a detection "
                          "run, saved scores or a paper-format JSON file?") from None
    if (loaded.n_layers, loaded.n_heads) != shape.grid:
        raise ConfigError(f"--scores {path} covers {loaded.n_layers} layers x {loaded.n_heads} "
                          f"heads, the model {shape.n_layers} x {shape.n_heads}: scores of "
                          "another model?")
    return loaded


def check_resume(args: argparse.Namespace, out: Path, log_name: str, probe_set=None,
                 config: Any = None, **extra: Any) -> None:
    """Refuse, before loading weights, to resume a run made with another model, probes or
    settings.

    Only those parts are compared here (the ones the library's header computes the same
    way), and ``extra`` parts of the header named as the library names them; the library
    compares the whole identity (masks, items) when it opens the log.
    """
    from rhlens.models import describe_model
    from rhlens.store.identity import run_header
    from rhlens.store.logs import check_resume as check

    model = describe_model(args.model, dtype=args.dtype, offline=args.offline)
    unknown = ("model.weights_sha256",) if model.get("weights_sha256") is None else ()
    only = ("model", *(("probes",) if probe_set is not None else ()),
            *(("config",) if config is not None else ()), *extra)
    check(out, run_header(model, probe_set, config, **extra), log_name, only=only, ignore=unknown)
    check_records(args, out, log_name, config)


def check_records(args: argparse.Namespace, out: Path, log_name: str, config: Any = None) -> None:
    """Every record of the log ``log_name`` in ``out`` (and of its shards), checked as a whole
    before the weights load: the first malformed one is named with its file, line and field
    (:mod:`rhlens.validate`). Logs of other names are left to the library."""
    from rhlens.store.logs import shard_files

    check = _record_check(args, log_name, config)
    if check is None:
        return
    from rhlens.validate import check_log_records

    problem, what = check
    for path in [Path(out) / log_name, *shard_files(out, log_name)]:
        if path.exists():
            check_log_records(path, problem, what)


def _record_check(args: argparse.Namespace, log_name: str, config: Any):
    """``(problem, what)`` for the records of ``log_name``, or ``None``."""
    from rhlens import validate as v
    from rhlens.store.layout import (
        COMPRESS_LOG,
        FAMILIES_LOG,
        NIAH_LOG,
        PATCHING_LOG,
        PROBES_LOG,
    )

    if log_name == PROBES_LOG:
        grid = model_shape_grid(args)
        return (lambda rec: v.detect_record_problem(rec, grid)), "detection record"
    if log_name in (NIAH_LOG, COMPRESS_LOG):
        return v.niah_record_problem, "NIAH record"
    if log_name.startswith("cot_") and log_name.endswith(".jsonl"):
        return v.cot_record_problem, "CoT record"
    if log_name == FAMILIES_LOG:
        grid = model_shape_grid(args)
        families = tuple(getattr(config, "probe_families", ()) or ())
        return (lambda rec: v.families_record_problem(rec, grid, families)), "score-families record"
    if log_name == PATCHING_LOG:
        from rhlens.models import model_shape
        from rhlens.patching.config import kv_indexed

        shape = model_shape(args.model, offline=args.offline)
        width = shape.n_kv_heads or shape.n_heads
        grid = (shape.n_layers, width if config is not None and kv_indexed(config.atoms)
                else shape.n_heads)
        return (lambda rec: v.patching_record_problem(rec, grid)), "patching record"
    return None


def model_shape_grid(args: argparse.Namespace) -> tuple[int, int]:
    """The model's (layers, heads), from its config (no weights)."""
    from rhlens.models import model_shape

    return model_shape(args.model, offline=args.offline).grid


def load(args: argparse.Namespace) -> tuple[Any, Any]:
    """The model and tokenizer, saying what is happening."""
    from rhlens.models import load_model

    say(f"loading {args.model or 'the default model (SmolLM2-135M-Instruct)'} ...")
    t = time.perf_counter()
    device_map = getattr(args, "device_map", None)
    model, tok = load_model(args.model, device=None if device_map else args.device,
                            dtype=args.dtype, offline=args.offline, device_map=device_map,
                            max_memory=_max_memory(getattr(args, "max_memory", None)))
    where = args.device
    placed = getattr(model.original_model, "hf_device_map", None)
    if device_map and placed:
        where = ", ".join(sorted({str(d) for d in placed.values()}))
        where = f"{where} (--device-map {device_map})"
    say(f"  loaded in {time.perf_counter() - t:.1f} s: {model.cfg.n_layers} layers x "
        f"{model.cfg.n_heads} heads on {where}")
    return model, tok


def _max_memory(value: Any) -> dict | None:
    """``--max-memory``: a dict as given, or one size for every GPU this process uses."""
    if value is None or isinstance(value, dict):
        return value
    import torch

    from rhlens.distributed import rank_max_memory

    gpus = rank_max_memory() or {g: 0 for g in range(torch.cuda.device_count())}
    if not gpus:
        raise ConfigError("--max-memory SIZE budgets every GPU, and none is visible: give "
                          "DEV=SIZE items (e.g. cpu=20GiB)")
    return {g: value for g in gpus}


def record_split(args: argparse.Namespace, out: str | Path, probe_set, used_for: str) -> None:
    """With ``--split``: say in the run's ``run.json`` (``"heldout"``) and ``split.json`` which
    split its probes are, what they were used for, and their needles and haystack."""
    split = getattr(args, "split", None)
    if not split or probe_set is None:
        return
    from rhlens.needlesets import record_split as record

    probes = list(getattr(probe_set, "probes", probe_set))
    record(out, {"split": split, "used_for": used_for,
                 "needles": sorted({p.needle_id for p in probes}),
                 "haystack": getattr(probe_set, "haystack", None), "n_probes": len(probes)})
