"""KV memory and decode step time of the packed head-selective cache against the full cache (issue 17).

One process, one device. A randomly initialised model of a real shape (default: Llama-3-8B,
bf16; ``bench_detect.random_model``) reads one prompt of ``--tokens`` random ids, then decodes
``--steps`` tokens, for each cache:

* ``full``: the packed cache with every KV head kept whole (the same code path as the
  compressed ones, so the comparison is of the cache, not of two implementations);
* ``keep-<f>``: a share ``f`` of the KV heads kept whole (drawn at random, seed 0, as
  ``rhlens.compress.random_policy`` draws), the others keeping ``--sink`` + ``--window`` tokens;
* ``engine-full`` (unless ``--no-engine``): the engine's own lean step over its plain KV cache,
  the step a mask policy runs on (every key kept in memory).

Measured, not computed: ``kv_bytes`` is ``torch.cuda.memory_allocated`` after the prefill minus
before it (the cache is the only thing that outlives the prefill; it includes the reserve for
the decoded tokens), ``prefill_peak_bytes`` is ``torch.cuda.max_memory_allocated`` during the
prefill minus the memory held before it (activations + cache), ``step_ms`` the median of
``--steps`` decode steps each timed alone (synchronised), ``step_ms_mean`` their mean when run
back to back. ``kv_bytes_computed`` (the buffers' sizes) is printed next to them as a check.

    python benchmarks/bench_compress.py --out compress_gpu.json            # ~2 min on an H100/H200
    python benchmarks/bench_compress.py --shape tiny --device cpu --dtype fp32 --tokens 2048
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from bench_detect import SHAPES, machine, random_model  # noqa: E402

from rhlens.compress import CacheLayout, HeadPolicy, full_policy  # noqa: E402
from rhlens.compress.packed import PackedAttention, cache_bytes, packed_cache  # noqa: E402
from rhlens.engine import KernelPolicy, StepState, hf_model, phase, prefill  # noqa: E402
from rhlens.engine.lean import LeanDecoder, decode_step  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _allocated(device: torch.device) -> int:
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else 0


def random_kv_heads(layout: CacheLayout, share: float, seed: int = 0) -> tuple[tuple[int, int], ...]:
    from rhlens.ablation import random_heads

    k = round(share * len(layout.selectable))
    return tuple(random_heads(layout.n_layers, layout.n_kv, k, seed=seed))


@torch.no_grad()
def run_one(model, ids: list[int], name: str, make_cache, step_fn, steps: int, warmup: int,
            device: torch.device) -> dict:
    """Prefill ``ids[:-1]`` into ``make_cache()``, then time decode steps with ``step_fn``."""
    _sync(device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    before = _allocated(device)
    cache = make_cache()
    t = time.perf_counter()
    prefill(model, ids[:-1], cache, chunk=None)
    _sync(device)
    prefill_s = time.perf_counter() - t
    kv = _allocated(device) - before
    peak = (torch.cuda.max_memory_allocated(device) - before) if device.type == "cuda" else 0
    step = step_fn()
    state = StepState()
    x = torch.tensor([[ids[-1]]], device=device)
    pos = len(ids) - 1
    times, first = [], []
    with phase("decode", state):
        for i in range(warmup + steps):
            state.step, state.n_seen = i, pos + 1
            _sync(device)
            t = time.perf_counter()
            logits = step(x, cache, pos)
            _sync(device)
            if i >= warmup:
                times.append(time.perf_counter() - t)
            x = logits[:, -1].argmax(-1).view(1, 1)
            first.append(int(x))
            pos += 1
        # back to back: launches queue, one sync at the end
        n_more = min(steps, 16)
        t = time.perf_counter()
        for i in range(n_more):
            state.step, state.n_seen = warmup + steps + i, pos + 1
            logits = step(x, cache, pos)
            x = logits[:, -1].argmax(-1).view(1, 1)
            pos += 1
        _sync(device)
        mean_s = (time.perf_counter() - t) / n_more
    out = {"name": name, "kv_bytes": kv, "prefill_peak_bytes": peak, "prefill_s": round(prefill_s, 3),
           "step_ms": round(1e3 * statistics.median(times), 3), "step_ms_mean": round(1e3 * mean_s, 3),
           "tokens": first[:8]}
    if hasattr(cache.layers[0], "nbytes"):
        out["kv_bytes_computed"] = cache_bytes(cache)
    del cache
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="llama3-8b")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tokens", type=int, default=131072, help="prompt length")
    ap.add_argument("--shares", default="0.25,0.5", help="shares of KV heads kept whole")
    ap.add_argument("--sink", type=int, default=64)
    ap.add_argument("--window", type=int, default=256)
    ap.add_argument("--steps", type=int, default=32, help="decode steps timed")
    ap.add_argument("--warmup", type=int, default=4)
    ap.add_argument("--no-engine", action="store_true", help="skip the engine's plain-cache run")
    ap.add_argument("--out", default=None, help="write the JSON here too")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    t0 = time.perf_counter()
    reserve = args.warmup + args.steps + 16 + 1
    model, _ = random_model(args.shape, DTYPES[args.dtype], args.device, args.tokens + reserve)
    hf = hf_model(model)
    layout = CacheLayout.of(model)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, int(hf.config.vocab_size), (args.tokens,), generator=gen).tolist()
    kernel = KernelPolicy(rows="batch").resolve(device, model)

    def packed(policy: HeadPolicy):
        return (lambda: packed_cache(model, policy, reserve=reserve, layout=layout),
                lambda: LeanDecoder(model, kernel, attention=PackedAttention))

    runs = []
    full = full_policy(layout, args.sink, args.window)
    runs.append(run_one(model, ids, "full", *packed(full), args.steps, args.warmup, device))
    for share in (float(s) for s in args.shares.split(",")):
        policy = HeadPolicy(random_kv_heads(layout, share), args.sink, args.window)
        res = run_one(model, ids, f"keep-{share:g}", *packed(policy), args.steps, args.warmup, device)
        res["full_kv_heads"] = len(policy.full)
        res["share_of_bytes_computed"] = policy.share(layout, args.tokens)
        runs.append(res)
    if not args.no_engine:
        def plain():
            from rhlens.engine.kv import buffer_cache

            shape = (1, layout.n_kv, args.tokens + reserve, layout.head_dim)
            ks = [torch.empty(shape, dtype=DTYPES[args.dtype], device=device) for _ in range(layout.n_layers)]
            vs = [torch.empty(shape, dtype=DTYPES[args.dtype], device=device) for _ in range(layout.n_layers)]
            return buffer_cache(hf, ks, vs, 0)

        runs.append(run_one(model, ids, "engine-full", plain,
                            lambda: decode_step(model, True, KernelPolicy()), args.steps,
                            args.warmup, device))
    base = runs[0]
    for r in runs:
        r["kv_GiB"] = round(r["kv_bytes"] / 2**30, 3)
        r["prefill_peak_GiB"] = round(r["prefill_peak_bytes"] / 2**30, 3)
        r["kv_vs_full"] = round(base["kv_bytes"] / r["kv_bytes"], 3) if r["kv_bytes"] else None
        r["step_vs_full"] = round(r["step_ms"] / base["step_ms"], 3)
    report = {"benchmark": "bench_compress", "machine": machine(), "shape": args.shape,
              "dtype": args.dtype, "tokens": args.tokens, "sink": args.sink, "window": args.window,
              "steps": args.steps, "layout": {"layers": layout.n_layers, "kv_heads": layout.n_kv,
                                              "head_dim": layout.head_dim},
              "runs": runs, "wall_s": round(time.perf_counter() - t0, 1)}
    text = json.dumps(report, indent=1)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
