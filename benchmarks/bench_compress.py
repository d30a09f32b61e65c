"""KV memory and decode step time of the packed head-selective cache against the full cache (issue 17).

One process, one device. A randomly initialised model of a real shape (default: Llama-3-8B,
bf16; ``bench_detect.random_model``) reads one prompt of ``--tokens`` random ids, then decodes
``--steps`` tokens, for each cache:

* ``full``: the packed cache with every KV head kept whole (the same code path as the
  compressed ones, so the comparison is of the cache, not of two implementations);
* ``keep-<f>``: a share ``f`` of the KV heads kept whole (drawn at random, seed 0, as
  ``rhlens.compress.random_policy`` draws), the others keeping ``--sink`` + ``--window`` tokens;
* ``engine-full`` (unless ``--no-engine``): the engine's own steps over its plain KV pool
  (:class:`~rhlens.engine.kv.KVPool`, as ``bench_speed.Bench`` decodes), the steps a mask
  policy runs on (every key kept in memory), for scale.

Each cache is decoded on two steps, from the same prefilled state: the captured step
(``rhlens.compress.packed.PackedDecoder``; the engine's ``CapturedDecoder`` for
``engine-full``), one CUDA graph replayed a step on a GPU, run eagerly elsewhere; and the lean
step (``PackedAttention`` in ``LeanDecoder``; the plain ``LeanDecoder``), kernels launched from
Python. All with one kernel policy, the device's defaults with ``rows="batch"`` (one prompt, no
slab padding), as ``packed_generate`` runs them.

Measured, not computed: ``kv_bytes`` is ``torch.cuda.memory_allocated`` after the prefill minus
before it (the cache is the only thing that outlives the prefill; it includes the reserve for
the decoded tokens, rounded up to ``KernelPolicy.bucket`` for the captured step),
``prefill_peak_bytes`` is ``torch.cuda.max_memory_allocated`` during the prefill minus the
memory held before it (activations + cache). ``step_ms``: the captured step, a decode of
``--steps`` tokens timed whole (synchronised; the first decode, which captures the graph, is
``first_decode_s``), the median of ``--repeats`` decodes over ``--steps``; ``lean_step_ms``:
the lean step, the median of ``--steps`` steps each timed alone (synchronised), and
``lean_step_ms_mean`` their mean when run back to back. ``tokens`` / ``lean_tokens``: the first
8 tokens of each step (a random bf16 model's near-tied logits may flip between the two).
``kv_bytes_computed`` (the buffers' sizes) is printed next to the measured bytes as a check.

    python benchmarks/bench_compress.py --out compress_gpu.json            # an H100/H200
    python benchmarks/bench_compress.py --shape tiny --device cpu --dtype fp32 --tokens 2048
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from bench_detect import SHAPES, machine, random_model  # noqa: E402

from rhlens.compress import CacheLayout, HeadPolicy, full_policy  # noqa: E402
from rhlens.compress.packed import PackedAttention, PackedDecoder, cache_bytes, packed_cache  # noqa: E402
from rhlens.engine import KernelPolicy, StepState, hf_model, phase, prefill  # noqa: E402
from rhlens.engine.captured import CapturedDecoder  # noqa: E402
from rhlens.engine.kv import KVPool  # noqa: E402
from rhlens.engine.lean import LeanDecoder  # noqa: E402

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


def _filled(device: torch.device, fill: Callable[[], object]) -> tuple[object, dict]:
    """``fill()`` (allocate a cache, prefill the prompt into it), measured: what it returns, the
    bytes it leaves allocated, its peak over the memory held before, its seconds."""
    gc.collect()  # the previous cache's decoders (and their graphs' memory) are gone
    _sync(device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    before = _allocated(device)
    t = time.perf_counter()
    got = fill()
    _sync(device)
    prefill_s = time.perf_counter() - t
    peak = (torch.cuda.max_memory_allocated(device) - before) if device.type == "cuda" else 0
    return got, {"kv_bytes": _allocated(device) - before, "prefill_peak_bytes": peak,
                 "prefill_s": round(prefill_s, 3)}


def time_captured(decode: Callable[[], list[int]], reset: Callable[[], None], steps: int, repeats: int,
                  device: torch.device) -> dict:
    """Decodes of ``steps`` tokens on a captured step, each from the prefilled state (``reset``
    before it, untimed), each timed whole: the first (on a GPU it captures the step's graph),
    then the median of ``repeats`` more, per step."""
    def timed() -> tuple[float, list[int]]:
        reset()
        _sync(device)
        t = time.perf_counter()
        got = decode()  # ends with a read-back of the tokens: the device is done
        _sync(device)
        return time.perf_counter() - t, got

    first_s, _ = timed()
    runs = [timed() for _ in range(repeats)]
    return {"step_ms": round(1e3 * statistics.median(t for t, _ in runs) / steps, 3),
            "first_decode_s": round(first_s, 3), "tokens": runs[0][1][:8]}


@torch.no_grad()
def time_lean(step, cache, last: int, pos: int, steps: int, warmup: int, device: torch.device) -> dict:
    """The lean step ``step(x [1, 1], cache, pos) -> logits`` from ``pos`` (the fed token's
    position): ``steps`` steps after ``warmup``, each timed alone (synchronised), then up to 16
    back to back (one sync at the end)."""
    state = StepState()
    x = torch.tensor([[last]], device=device)
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
    return {"lean_step_ms": round(1e3 * statistics.median(times), 3),
            "lean_step_ms_mean": round(1e3 * mean_s, 3), "lean_tokens": first[:8]}


def _on_tokens(got: list[int]) -> Callable[[list[list[int]]], bool]:
    """A decoder's ``on_tokens``: the row's tokens appended to ``got``, never a stop."""
    def on_tokens(new: list[list[int]]) -> bool:
        got.extend(row[0] for row in new)
        return False
    return on_tokens


@torch.no_grad()
def run_packed(model, ids: list[int], name: str, policy: HeadPolicy, kernel: KernelPolicy,
               layout: CacheLayout, reserve: int, args, device: torch.device) -> dict:
    """``ids[:-1]`` prefilled into a packed cache for ``policy``, then decoded on both steps."""
    t, last = len(ids) - 1, ids[-1]

    def fill():
        cache = packed_cache(model, policy, reserve=reserve, layout=layout)
        prefill(model, ids[:-1], cache, chunk=None)
        return cache

    cache, out = _filled(device, fill)
    out = {"name": name, **out, "kv_bytes_computed": cache_bytes(cache)}
    # every decode starts from the prefilled rings (the full groups' keys past the prompt are
    # written before they are read)
    rings = [(layer.ks.clone(), layer.vs.clone()) for layer in cache.layers]

    def reset() -> None:
        for layer, (ks, vs) in zip(cache.layers, rings):
            layer.ks.copy_(ks)
            layer.vs.copy_(vs)
            layer.n = t

    decoder = PackedDecoder(model, kernel, policy, layout)

    def decode() -> list[int]:
        got: list[int] = []
        decoder.decode_cache(cache, last, args.steps, _on_tokens(got), check_every=None)
        return got

    out.update(time_captured(decode, reset, args.steps, args.repeats, device))
    out["captured_path"] = decoder.last_path  # "captured": graph replays; "static": eager
    reset()
    out.update(time_lean(LeanDecoder(model, kernel, attention=PackedAttention), cache, last, t,
                         args.steps, args.warmup, device))
    return out


@torch.no_grad()
def run_engine(model, ids: list[int], kernel: KernelPolicy, layout: CacheLayout, reserve: int, args,
               device: torch.device) -> dict:
    """``ids[:-1]`` prefilled into the engine's KV pool, then decoded on the engine's own steps."""
    t, last = len(ids) - 1, ids[-1]
    pool = KVPool(hf_model(model), layout.n_layers)

    def fill():
        body = tuple(ids[:-1])
        pool.ensure(1, t + reserve, body, None, False, t)
        pool.fill(model, 0, body, None, False, t, kernel.prefill_attn)  # one chunk: one pass

    _, out = _filled(device, fill)
    out = {"name": "engine-full", **out}
    decoder = CapturedDecoder(model, kernel)

    def decode() -> list[int]:
        got: list[int] = []
        decoder.decode(pool.k, pool.v, 1, t + 1, [last], args.steps, _on_tokens(got), check_every=None)
        return got

    out.update(time_captured(decode, lambda: None, args.steps, args.repeats, device))
    out["captured_path"] = decoder.last_path
    out.update(time_lean(LeanDecoder(model, kernel), pool.decode_cache(1, t), last, t, args.steps,
                         args.warmup, device))
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
    ap.add_argument("--steps", type=int, default=32, help="decode steps timed (one captured decode)")
    ap.add_argument("--warmup", type=int, default=4, help="lean steps run before the timed ones")
    ap.add_argument("--repeats", type=int, default=5, help="captured decodes timed (after the first)")
    ap.add_argument("--no-engine", action="store_true", help="skip the engine's plain-cache run")
    ap.add_argument("--out", default=None, help="write the JSON here too")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    t0 = time.perf_counter()
    lean_reserve = args.warmup + args.steps + 16 + 1  # positions the lean steps feed after the prompt
    model, _ = random_model(args.shape, DTYPES[args.dtype], args.device, args.tokens + lean_reserve)
    hf = hf_model(model)
    layout = CacheLayout.of(model)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, int(hf.config.vocab_size), (args.tokens,), generator=gen).tolist()
    kernel = KernelPolicy(rows="batch").resolve(device, model)
    # the captured step's keys: the prompt body + the answer, rounded up to the policy's bucket
    n_body = args.tokens - 1
    keys = -(-(n_body + args.steps) // kernel.bucket) * kernel.bucket
    reserve = max(lean_reserve, keys - n_body)

    runs = []
    full = full_policy(layout, args.sink, args.window)
    runs.append(run_packed(model, ids, "full", full, kernel, layout, reserve, args, device))
    for share in (float(s) for s in args.shares.split(",")):
        policy = HeadPolicy(random_kv_heads(layout, share), args.sink, args.window)
        res = run_packed(model, ids, f"keep-{share:g}", policy, kernel, layout, reserve, args, device)
        res["full_kv_heads"] = len(policy.full)
        res["share_of_bytes_computed"] = policy.share(layout, args.tokens)
        runs.append(res)
    if not args.no_engine:
        runs.append(run_engine(model, ids, kernel, layout, reserve, args, device))
    base = runs[0]
    for r in runs:
        r["kv_GiB"] = round(r["kv_bytes"] / 2**30, 3)
        r["prefill_peak_GiB"] = round(r["prefill_peak_bytes"] / 2**30, 3)
        r["kv_vs_full"] = round(base["kv_bytes"] / r["kv_bytes"], 3) if r["kv_bytes"] else None
        r["step_vs_full"] = round(r["step_ms"] / base["step_ms"], 3)
        r["lean_step_vs_full"] = round(r["lean_step_ms"] / base["lean_step_ms"], 3)
        r["same_tokens"] = r["tokens"] == r["lean_tokens"]
    report = {"benchmark": "bench_compress", "machine": machine(), "shape": args.shape,
              "dtype": args.dtype, "tokens": args.tokens, "sink": args.sink, "window": args.window,
              "steps": args.steps, "repeats": args.repeats, "kernel_policy": kernel.to_dict(),
              "layout": {"layers": layout.n_layers, "kv_heads": layout.n_kv, "head_dim": layout.head_dim},
              "runs": runs, "wall_s": round(time.perf_counter() - t0, 1)}
    text = json.dumps(report, indent=1)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
