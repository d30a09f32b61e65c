"""Detection at the hardware's speed (issue #15): decode steps against the memory-bandwidth floor,
long prompts, grids, masks; the captured decode step against the lean one and HF ``generate``.

One process, one device, one JSON file (``--out``), sections chosen with ``--sections``:

* ``check``: correctness on this device first: the captured step against the lean step
  (greedy tokens, recorded top-key positions; alone, batched, masked) on the toy model (fp32)
  and a random grouped-query model (fp32 and bf16), and batched rows against the same prompts
  alone on the captured step;
* ``steps`` (target 1, 5): milliseconds per decode step, from CUDA events around whole decodes
  (``--new-tokens`` steps, no prefill): the lean step (host sync every step), the captured step
  run eagerly, captured (graph replay; also the replays alone); the recorder on in all; + 20
  masked heads; a batch of ``--batch`` probes (and each of its rows against itself alone).
  Beside them the floor: (weights + KV bytes a step reads) / the copy
  bandwidth measured in this run; and the share of recorded positions on which the captured
  and lean steps agree; a kernel-time split of one eager captured step (torch.profiler);
* ``prefill`` (target 2): one prefill of a ``--prefill-layers``-layer model of the same shape at
  ``--prefill-lengths``: one pass, and chunks of ``--chunks`` tokens with each way of computing
  a chunk's attention after cached keys (``KernelPolicy.prefill_attn``); the attention kernels
  alone (one layer); each way's error against a float32 reference;
* ``probe`` (target 2): one probe end to end (``detect_retrieval_heads``, recorder on, 32 new
  tokens) at ``--lengths``: HF ``generate``, rhlens (defaults: the captured step) and rhlens
  with the lean step, timed in rotation, median of ``--repeats``;
* ``grid`` (target 4): a grid of ``--grid-lengths`` x ``--grid-depths`` probes in one call with
  prefill chunks of each of ``--grid-chunks`` tokens (a reused prefix is cut back to a chunk
  boundary), against the summed HF generate time estimated from one HF run per length times
  the probes of that length (HF's time does not depend on the needle's depth); probes checked
  identical to running alone;
* ``masked`` (target 5): one probe under ``ablate_heads`` (20 random heads) against unmasked,
  end to end, alternated;
* ``compile``: the captured step under ``torch.compile`` (``KernelPolicy.compile``), its first
  decode (the compile) and its step time, and its agreement with the lean step.

HF ``generate`` with a static cache and a compiled forward (target 3) is
``benchmarks/hf_static.py``: its compile takes minutes, run it on a second GPU beside this.

    python benchmarks/bench_speed.py --shape llama3-8b --sections check,steps,prefill,probe \\
        --lengths 8192,32768 --out l3.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_detect import (
    SHAPES,
    _NoEos,
    detect,
    hf_generate,
    machine,
    random_model,
    random_probes,
)

from rhlens import engine
from rhlens.ablation import ablate_heads, ablation_hooks, random_heads
from rhlens.engine import GenerationConfig, KernelPolicy, StepState, hf_model
from rhlens.engine.captured import CapturedDecoder
from rhlens.retrieval import TopKeyRecorder

T0 = time.perf_counter()


def log(*args) -> None:
    print(f"[{time.perf_counter() - T0:6.1f}s]", *args, flush=True)


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def seconds(fn) -> float:
    """One call, timed with CUDA events on a GPU (perf_counter elsewhere)."""
    if not torch.cuda.is_available():
        t = time.perf_counter()
        fn()
        return time.perf_counter() - t
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    sync()
    a.record()
    fn()
    b.record()
    b.synchronize()
    return a.elapsed_time(b) / 1e3


def median_of(fn, repeats: int, warmup: int = 1) -> tuple[float, list[float]]:
    for _ in range(warmup):
        fn()
    times = [seconds(fn) for _ in range(repeats)]
    return statistics.median(times), times


def rotation(fns: dict, repeats: int, warmup: int = 1) -> dict:
    """Functions timed in rotation (a, b, c, a, b, c, ...): median seconds and the last result."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {k: [] for k in fns}
    last = {}
    for _ in range(repeats):
        for k, fn in fns.items():
            got = []
            times[k].append(seconds(lambda f=fn, o=got: o.append(f())))
            last[k] = got[0]
    return {k: {"s": statistics.median(v), "all": v, "last": last[k]} for k, v in times.items()}


# ---------------------------------------------------------------------------------------
# Bandwidth and the floor
# ---------------------------------------------------------------------------------------
def copy_bandwidth(device: str) -> float | None:
    """Bytes a second of a large device-to-device copy (bytes read + bytes written)."""
    if device != "cuda":
        return None
    n = 1 << 31  # 2 GiB
    x = torch.empty(n, dtype=torch.uint8, device=device).random_()
    y = torch.empty_like(x)
    t, _ = median_of(lambda: [y.copy_(x) for _ in range(10)], 5, warmup=2)
    return 2 * n * 10 / t


def step_bytes(model, keys: int, rows: int = 1) -> dict:
    """Bytes a decode step must read: every weight matrix once (the embedding: one row a
    prompt), and each prompt's keys and values."""
    hf = hf_model(model)
    cfg = hf.config
    embed = hf.get_input_embeddings().weight
    weights = sum(p.numel() * p.element_size() for p in hf.parameters())
    weights += (rows * embed.shape[1] - embed.numel()) * embed.element_size()
    n_kv = cfg.num_key_value_heads
    d = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    kv = rows * 2 * cfg.num_hidden_layers * n_kv * d * keys * embed.element_size()
    return {"weights": weights, "kv": kv, "total": weights + kv}


# ---------------------------------------------------------------------------------------
# Decode steps
# ---------------------------------------------------------------------------------------
class Bench:
    """A model, its probes and a prefilled KV pool, decoded again and again from the prompt."""

    def __init__(self, model, tok, n: int, rows: int, n_new: int, masked: list | None = None):
        self.model, self.tok, self.n, self.rows, self.n_new = model, tok, n, rows, n_new
        hf = hf_model(model)
        self.device = next(hf.parameters()).device
        vocab = hf.config.vocab_size
        self.probes = random_probes(tok, vocab, [n], [round(100 * i / max(1, rows - 1)) for i in range(rows)])
        self.config = GenerationConfig(max_new_tokens=n_new, stop_at_newline=False, stop_at_eos=False,
                                       batch_size=rows)
        self.state = StepState()
        self.runner = engine._Runner(model, _NoEos(tok), self.config, self.state)
        policy = self.runner.policy
        cap = -(-(n - 1 + n_new) // policy.bucket) * policy.bucket
        pool = self.runner.pool
        bodies = [tuple(p.prompt_ids[:-1]) for p in self.probes]
        pool.ensure(rows, cap, bodies[0], None, False, self.runner.chunk)
        for r in range(rows):
            pool.fill(model, r, bodies[r], None, False, self.runner.chunk, policy.prefill_attn)
        self.last = [p.prompt_ids[-1] for p in self.probes]
        self.rec = TopKeyRecorder(model.cfg.n_layers, model.cfg.n_heads, n_new, self.state, self.device,
                                  max_batch=rows)
        self.masked = masked

    def hooks(self, masked: bool = False):
        pairs = self.rec.hooks()
        if masked and self.masked:
            pairs += ablation_hooks(self.model, self.masked)
        return self.model.hooks(fwd_hooks=pairs)

    def lean(self):
        cache = self.runner.pool.decode_cache(self.rows, self.n - 1)
        return self.runner._decode(cache, self.last, self.n, "lean")

    def captured(self, decoder: CapturedDecoder):
        return self.runner._decode_captured(decoder, self.rows, self.last, self.n)

    def tokens_and_positions(self, fn):
        self.rec.reset()
        outs = fn()
        return [o for o, _ in outs], self.rec._buf[:, :, :self.rows].clone()


def agreement(a, b) -> dict:
    """Two decodes of the same rows: equal token lists, the share of equal recorded positions
    over all steps, and over the steps before the first token that differs (after it the two
    decodes read different inputs; a random model's near-uniform logits and patterns make such
    splits early and often)."""
    (ta, pa), (tb, pb) = a, b
    first = min((next((i for i, (x, y) in enumerate(zip(ra, rb)) if x != y), len(ra))
                 for ra, rb in zip(ta, tb)), default=0)
    same = pa == pb
    return {"tokens_equal": sum(x == y for x, y in zip(ta, tb)), "rows": len(ta),
            "positions_equal_share": float(same.float().mean()), "first_token_split": first,
            "positions_equal_share_before_split": float(same[:first + 1].float().mean())}


@torch.no_grad()
def kernel_split(bench: Bench, decoder: CapturedDecoder) -> dict:
    """Device time by kernel kind over two eager captured steps (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    if not torch.cuda.is_available():
        return {}
    decoder.capture = False
    with bench.hooks(), profile(activities=[ProfilerActivity.CUDA]) as prof:
        bench.runner.config = GenerationConfig(max_new_tokens=2, stop_at_newline=False, stop_at_eos=False,
                                               batch_size=bench.rows)
        bench.captured(decoder)
        sync()
    bench.runner.config = bench.config
    kinds: dict[str, list[float]] = {}
    for ev in prof.key_averages():
        us = getattr(ev, "self_device_time_total", None) or getattr(ev, "self_cuda_time_total", 0)
        if not us or ev.count == 0:
            continue
        name = ev.key.lower()
        kind = ("gemm" if any(s in name for s in ("gemm", "gemv", "cutlass", "nvjet", "sm90_xmma", "cublas"))
                else "copy/cat" if any(s in name for s in ("copy", "cat", "index")) else
                "reduce/softmax" if any(s in name for s in ("reduce", "softmax", "argmax", "norm", "mean"))
                else "elementwise")
        k = kinds.setdefault(kind, [0.0, 0])
        k[0] += us / 2e3  # ms a step
        k[1] += ev.count / 2
    out = {k: {"ms_per_step": round(v[0], 3), "kernels_per_step": int(v[1])} for k, v in kinds.items()}
    def device_us(ev) -> float:
        return getattr(ev, "self_device_time_total", 0) or getattr(ev, "self_cuda_time_total", 0)

    top = sorted(prof.key_averages(), key=lambda ev: -device_us(ev))
    out["top"] = [{"kernel": ev.key[:90], "ms_per_step": round(device_us(ev) / 2e3, 3),
                   "per_step": ev.count / 2} for ev in top[:15] if ev.count]
    return out


# no_grad: Bench.lean calls _Runner._decode outside run()'s no_grad; with autograd on, each step's
# in-place KV writes chained the steps' graphs and kept every layer's saved V copy (64 MiB at 32K
# keys): the 32K row's OOM in the H200 runs (BENCHMARKS.md E)
@torch.no_grad()
def _steps_at(model, tok, n: int, args, bw: float | None, heads, policy, row: dict) -> None:
    """Fills ``row`` as it goes (a failure keeps what was measured)."""
    S = args.new_tokens
    bench = Bench(model, tok, n, 1, S, heads)
    eager = CapturedDecoder(model, policy)
    eager.capture = False
    graph = CapturedDecoder(model, policy)

    def per_step(fn) -> float:
        return median_of(fn, args.repeats)[0] / S * 1e3

    with bench.hooks():
        row["lean_ms"] = per_step(bench.lean)
        row["static_eager_ms"] = per_step(lambda: bench.captured(eager))
        row["captured_first_decode_s"] = seconds(lambda: bench.captured(graph))  # captures
        row["captured_ms"] = per_step(lambda: bench.captured(graph))
        st = next(iter(graph._graphs.values()))
        if st.graph is not None:
            def replays() -> None:  # the S steps of a decode as graph replays, nothing else
                st.pos.fill_(n - 1)  # (the counters index the step's buffers: reset them)
                st.step.zero_()
                for _ in range(S):
                    st.graph.replay()

            row["replay_only_ms"] = per_step(replays)
        lean_tp = bench.tokens_and_positions(bench.lean)
        cap_tp = bench.tokens_and_positions(lambda: bench.captured(graph))
        row["captured_vs_lean"] = agreement(cap_tp, lean_tp)
        mm = CapturedDecoder(model, KernelPolicy(av="mm").resolve(bench.device, model))
        if mm.policy.av != policy.av:  # pattern @ V as one product per row, not blocks of keys
            bench.captured(mm)
            row["captured_av_mm_ms"] = per_step(lambda: bench.captured(mm))
    with bench.hooks(masked=True):
        row["captured_mask20_ms"] = per_step(lambda: bench.captured(graph))
        row["lean_mask20_ms"] = per_step(bench.lean)
    row["mask20_over_recorder"] = row["captured_mask20_ms"] / row["captured_ms"]
    nbytes = step_bytes(model, n)
    row["bytes"] = nbytes
    if bw:
        row["copy_bw_GBps"] = bw / 1e9
        row["floor_ms"] = nbytes["total"] / bw * 1e3
        row["best_over_floor"] = row["captured_ms"] / row["floor_ms"]
    if args.profile and n == args.step_lengths[0]:
        try:
            with bench.hooks():
                row["kernel_split_eager"] = kernel_split(bench, eager)
        except Exception as exc:  # the profile is a diagnosis, not a result
            row["kernel_split_eager"] = repr(exc)[:200]


@torch.no_grad()
def _batch_at(model, tok, n: int, args, policy, one_row_ms: float) -> dict:
    """A batch of probes of one length decoded together, and each of its rows decoded alone."""
    bench = Bench(model, tok, n, args.batch, args.new_tokens)
    graph = CapturedDecoder(model, policy)
    with bench.hooks():
        bench.captured(graph)
        t = median_of(lambda: bench.captured(graph), args.repeats)[0] / args.new_tokens * 1e3
        batched = bench.tokens_and_positions(lambda: bench.captured(graph))
    out = {"length": n, "rows": args.batch, "ms_per_step": t, "one_row_ms": one_row_ms,
           "tokens_per_s_ratio": args.batch * one_row_ms / t}
    same = 0
    pool = bench.runner.pool
    for r in range(args.batch):
        for t_ in pool.k + pool.v:  # row r's prompt into row 0, decoded as a batch of one
            t_[0, :, :n - 1].copy_(t_[r, :, :n - 1])
        rec = TopKeyRecorder(model.cfg.n_layers, model.cfg.n_heads, args.new_tokens, bench.state,
                             bench.device)
        with model.hooks(fwd_hooks=rec.hooks()):
            outs = bench.runner._decode_captured(graph, 1, [bench.last[r]], n)
        same += int(outs[0][0] == batched[0][r] and torch.equal(rec._buf[:, :, 0], batched[1][:, :, r]))
    out["rows_identical_to_alone"] = same
    if args.profile:  # where the batched step's time goes (issue 15, target 1: batch of 8)
        try:
            out["kernel_split_eager"] = kernel_split(bench, CapturedDecoder(model, policy))
            one = Bench(model, tok, n, 1, args.new_tokens)
            out["kernel_split_eager_one_row"] = kernel_split(one, CapturedDecoder(model, policy))
        except Exception as exc:  # a diagnosis, not a result
            out["kernel_split_eager"] = repr(exc)[:200]
    return out


def section_steps(model, tok, args, bw: float | None, res: dict) -> None:
    out = res["steps"] = {}
    heads = random_heads(model.cfg.n_layers, model.cfg.n_heads, 20, seed=0)
    # the captured step uncompiled here (the compile section times the default, compiled one)
    policy = KernelPolicy(compile=False).resolve(next(model.parameters()).device, model)
    for n in args.step_lengths:
        row = out[n] = {"allocated_gib_before": allocated_gib()}
        try:  # one length failing keeps the others
            _steps_at(model, tok, n, args, bw, heads, policy, row)
        except Exception as exc:
            row["error"] = repr(exc)[:300]
        release()
        row["allocated_gib_after"] = allocated_gib()
        log("steps", n, json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()
                                    if k not in ("bytes", "kernel_split_eager")}))
    if args.batch > 1 and "captured_ms" in out[args.step_lengths[0]]:
        n = args.step_lengths[0]
        out["batch"] = _batch_at(model, tok, n, args, policy, out[n]["captured_ms"])
        release()
        log("batch", json.dumps(out["batch"]))


def allocated_gib() -> float | None:
    return torch.cuda.memory_allocated() / 2**30 if torch.cuda.is_available() else None


def release() -> None:
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@torch.no_grad()
def _compile_at(model, tok, n: int, args, row: dict) -> None:
    S = args.new_tokens
    bench = Bench(model, tok, n, 1, S)
    comp = CapturedDecoder(model, KernelPolicy(compile=True).resolve(bench.device, model))
    with bench.hooks():
        row["compile_first_decode_s"] = seconds(lambda: bench.captured(comp))
        row["captured_compile_ms"] = median_of(lambda: bench.captured(comp), args.repeats)[0] / S * 1e3
        comp_tp = bench.tokens_and_positions(lambda: bench.captured(comp))
        lean_tp = bench.tokens_and_positions(bench.lean)
    row["compile_vs_lean"] = agreement(comp_tp, lean_tp)
    if row.get("floor_ms"):
        best = min(row["captured_compile_ms"], row.get("captured_ms", 1e9))
        row["best_over_floor"] = best / row["floor_ms"]


def section_compile(model, tok, args, res: dict) -> None:
    """The captured step under torch.compile (its first decode compiles), recorder on."""
    out = res.setdefault("steps", {})
    for n in args.step_lengths:
        if time.perf_counter() - T0 > args.budget:
            log("compile", n, "skipped: over the time budget")
            continue
        row = out.setdefault(n, {})
        _compile_at(model, tok, n, args, row)
        log("compile", n, json.dumps({k: row[k] for k in ("compile_first_decode_s", "captured_compile_ms",
                                                           "compile_vs_lean")}))
        release()
    n = args.step_lengths[0]
    if args.batch > 1 and "captured_compile_ms" in out.get(n, {}):  # the batch on the default step
        policy = KernelPolicy(compile=True).resolve(next(model.parameters()).device, model)
        out["batch_compiled"] = _batch_at(model, tok, n, args, policy, out[n]["captured_compile_ms"])
        release()
        log("batch compiled", json.dumps(out["batch_compiled"], default=str)[:2000])


# ---------------------------------------------------------------------------------------
# Prefill
# ---------------------------------------------------------------------------------------
@torch.no_grad()
def section_prefill(model, tok, args, device: str, dtype, res: dict) -> None:
    """``model``: ``--prefill-layers`` layers of the shape."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from rhlens.engine.native import _chunk_attention

    out = res["prefill"] = {"layers": args.prefill_layers}
    hf = hf_model(model)
    vocab = hf.config.vocab_size
    n_layers = engine._plain_cache_layers(hf)
    for n in args.prefill_lengths:
        ids = tuple(random_probes(tok, vocab, [n], [50])[0].prompt_ids[:-1])
        row = out[n] = {}
        pool = engine._KVPool(hf, n_layers)
        pool.ensure(1, n + 8, ids, None, False, n)

        def fill(chunk, attn="lower_right", p=pool, x=ids):
            return p.fill(model, 0, x, None, False, chunk, attn)

        reps = args.prefill_repeats
        row["one_pass_s"] = median_of(lambda: fill(1 << 21), reps)[0]
        ref_k = pool.k[-1][0, :, :n - 1].float().clone()

        def hf_pass(x=ids):
            cache = engine._new_cache(hf)
            with engine.native_modules(model):
                hf(input_ids=torch.tensor([x], device=device), past_key_values=cache, use_cache=True,
                   logits_to_keep=1)

        row["hf_one_pass_s"] = median_of(hf_pass, reps)[0]
        for chunk in args.chunks:
            if chunk >= n:
                continue
            for attn in ("lower_right", "flash_gqa", "split"):
                t = median_of(lambda c=chunk, a=attn: fill(c, a), reps)[0]
                err = float((pool.k[-1][0, :, :n - 1].float() - ref_k).norm() / ref_k.norm())
                row[f"chunk{chunk}_{attn}"] = {"s": t, "x_one_pass": t / row["one_pass_s"],
                                               "last_layer_k_rel_err_vs_one_pass": err}
        log("prefill", n, json.dumps(row, default=lambda v: round(v, 4)))
        del pool
        torch.cuda.empty_cache() if torch.cuda.is_available() else None
    # The attention kernels alone, one layer: a square causal pass per backend, and the last
    # chunk of a prompt after its cached keys per prefill_attn way, against float32.
    if device != "cuda":
        return
    hidden, _, _, heads, kv, _, _ = SHAPES[args.shape]
    d = hidden // heads
    kern = out["kernels"] = {}
    g = torch.Generator(device=device).manual_seed(0)
    for n, c in ((32768, 8192), (131072, 32768), (131072, 8192)):
        if n > max(args.prefill_lengths):
            continue
        q = torch.randn(1, heads, n, d, device=device, dtype=dtype, generator=g)
        k = torch.randn(1, kv, n, d, device=device, dtype=dtype, generator=g)
        v = torch.randn(1, kv, n, d, device=device, dtype=dtype, generator=g)
        entry = kern[f"{n}_{c}"] = {}
        flops_full = 4 * heads * d * n * n / 2
        for name, backends in (("default", None), ("flash", [SDPBackend.FLASH_ATTENTION]),
                               ("cudnn", [SDPBackend.CUDNN_ATTENTION]),
                               ("efficient", [SDPBackend.EFFICIENT_ATTENTION])):
            ctx = sdpa_kernel(backends) if backends else contextlib.nullcontext()
            try:
                with ctx:
                    t = median_of(lambda q=q, k=k, v=v: torch.nn.functional.scaled_dot_product_attention(
                        q, k, v, is_causal=True, enable_gqa=True), 3)[0]
                entry[f"one_pass_{name}_ms"] = t * 1e3
                entry[f"one_pass_{name}_TFLOPs"] = flops_full / t / 1e12
            except RuntimeError as exc:
                entry[f"one_pass_{name}"] = str(exc).splitlines()[0][:120]
        qc = q[:, :, n - c:]
        flops_chunk = 4 * heads * d * c * (n - c / 2)
        tail = 128
        qi = torch.arange(c - tail, c, device=device)[:, None] + (n - c)
        mask = torch.arange(n, device=device)[None, :] <= qi
        ref = torch.nn.functional.scaled_dot_product_attention(
            qc[:, :, -tail:].float(), k.float().repeat_interleave(heads // kv, 1),
            v.float().repeat_interleave(heads // kv, 1), attn_mask=mask)
        for mode in ("lower_right", "flash_gqa", "split"):
            try:
                t = median_of(lambda m=mode, q=qc, k=k, v=v: _chunk_attention(q, k, v, None, m), 3)[0]
                got = _chunk_attention(qc, k, v, None, mode)[:, :, -tail:].float()
                entry[f"chunk_{mode}_ms"] = t * 1e3
                entry[f"chunk_{mode}_TFLOPs"] = flops_chunk / t / 1e12
                entry[f"chunk_{mode}_rel_err"] = float((got - ref).norm() / ref.norm())
            except RuntimeError as exc:
                entry[f"chunk_{mode}"] = str(exc).splitlines()[0][:120]
        log("kernels", n, c, json.dumps(entry, default=lambda v: round(v, 4)))


# ---------------------------------------------------------------------------------------
# End to end
# ---------------------------------------------------------------------------------------
def section_probe(model, tok, args, res: dict) -> None:
    out = res["probe"] = {}
    vocab = hf_model(model).config.vocab_size
    tok_n = _NoEos(tok)
    lean = KernelPolicy(decode="lean")
    for n in args.lengths:
        probe = random_probes(tok, vocab, [n], [50])[0]
        fns = {"hf": lambda p=probe: hf_generate(model, p, args.new_tokens),
               "rhlens": lambda p=probe: detect(model, tok_n, [p], args.new_tokens)}
        if not args.no_lean:  # today's step, for scale
            fns["rhlens_lean"] = lambda p=probe: detect(model, tok_n, [p], args.new_tokens, policy=lean)
        repeats = args.repeats if n <= 65536 else max(1, args.repeats - 1)  # the long ones: ~12 s a call
        got = rotation(fns, repeats)
        row = out[n] = {k: {"s": v["s"], "all": v["all"]} for k, v in got.items()}
        ours, theirs = got["rhlens"]["last"].probes[0]["response_ids"], got["hf"]["last"]
        row["ratio"] = got["rhlens"]["s"] / got["hf"]["s"]
        eos = hf_model(model).config.eos_token_id
        cut = next((i for i, t in enumerate(ours) if t == eos), len(ours))
        row["same_tokens_as_hf"] = list(ours)[:cut] == list(theirs)[:cut]
        if "rhlens_lean" in got:
            row["lean_ratio"] = got["rhlens_lean"]["s"] / got["hf"]["s"]
            lean_ids = got["rhlens_lean"]["last"].probes[0]["response_ids"]
            row["same_tokens_as_lean"] = list(ours) == list(lean_ids)
        log("probe", n, json.dumps({k: (round(v["s"], 3) if isinstance(v, dict) else v)
                                    for k, v in row.items()}))


def section_grid(model, tok, args, res: dict) -> None:
    out = res["grid"] = {"lengths": args.grid_lengths, "depths": args.grid_depths}
    vocab = hf_model(model).config.vocab_size
    tok_n = _NoEos(tok)
    depths = [round(100 * i / max(1, args.grid_depths - 1), 1) for i in range(args.grid_depths)]
    probes = random_probes(tok, vocab, args.grid_lengths, depths)
    hf_each = {}
    for n in args.grid_lengths:  # one HF run per length: its time does not depend on the depth
        probe = next(p for p in probes if p.length == n)
        # warmed up by the shorter lengths before it: the long ones run once (seconds each)
        hf_each[n] = median_of(lambda p=probe: hf_generate(model, p, args.new_tokens), 1,
                               warmup=1 if n <= 8192 else 0)[0]
        log("grid HF", n, round(hf_each[n], 3))
    hf_sum = sum(hf_each[p.length] for p in probes)
    out["hf_per_length_s"] = hf_each
    out["hf_sum_s"] = hf_sum
    for chunk in args.grid_chunks:
        t = time.perf_counter()
        grid = detect(model, tok_n, probes, args.new_tokens, batch_size=args.grid_depths, chunk=chunk or None)
        sync()
        grid_s = time.perf_counter() - t
        check = [0, len(probes) // 2, len(probes) - 1]
        same = 0
        for i in check:
            solo = detect(model, tok_n, [probes[i]], args.new_tokens, chunk=chunk or None)
            same += int(torch.equal(solo.per_probe[0], grid.per_probe[i])
                        and solo.probes[0]["response"] == grid.probes[i]["response"])
        out[f"chunk{chunk}"] = {"grid_s": grid_s, "ratio": grid_s / hf_sum, "checked": len(check),
                                "identical_alone": same}
        log("grid chunk", chunk, json.dumps(out[f"chunk{chunk}"]))


def section_masked(model, tok, args, res: dict) -> None:
    vocab = hf_model(model).config.vocab_size
    tok_n = _NoEos(tok)
    n = args.lengths[0]
    probe = random_probes(tok, vocab, [n], [50])[0]
    heads = random_heads(model.cfg.n_layers, model.cfg.n_heads, 20, seed=0)

    def masked():
        with ablate_heads(model, heads):
            return detect(model, tok_n, [probe], args.new_tokens)

    got = rotation({"plain": lambda: detect(model, tok_n, [probe], args.new_tokens), "masked": masked},
                   args.repeats)
    res["masked"] = {"length": n, "plain_s": got["plain"]["s"], "masked_s": got["masked"]["s"],
                     "ratio": got["masked"]["s"] / got["plain"]["s"]}
    log("masked", json.dumps(res["masked"]))


@contextlib.contextmanager
def phase_clock(targets):
    """While inside, each ``(owner, method, label)`` is timed (synchronised wall time and calls,
    summed per label into the yielded dict); a method's nested calls are timed under their own
    labels too."""
    times: dict[str, list] = {}
    saved = []
    for owner, name, label in targets:
        fn = getattr(owner, name)
        saved.append((owner, name, owner.__dict__.get(name)))

        def wrapped(*a, _fn=fn, _label=label, **kw):
            sync()
            t = time.perf_counter()
            try:
                return _fn(*a, **kw)
            finally:
                sync()
                rec = times.setdefault(_label, [0.0, 0])
                rec[0] += time.perf_counter() - t
                rec[1] += 1

        setattr(owner, name, wrapped)
    try:
        yield times
    finally:
        for owner, name, fn in reversed(saved):
            if fn is None:
                delattr(owner, name)
            else:
                setattr(owner, name, fn)


def _split_run(fn, targets) -> dict:
    from rhlens.engine import captured as cap

    graphs = cap.torch.cuda.CUDAGraph  # count captures: each capture makes one CUDAGraph
    made = [0]

    class Counting(graphs):
        def __init__(self, *a, **kw):
            made[0] += 1
            super().__init__(*a, **kw)

    cap.torch.cuda.CUDAGraph = Counting
    try:
        with phase_clock(targets) as times:
            sync()
            t = time.perf_counter()
            fn()
            sync()
            total = time.perf_counter() - t
    finally:
        cap.torch.cuda.CUDAGraph = graphs
    out = {"total_s": total, "graph_captures": made[0]}
    out.update({f"{k}_s": v[0] for k, v in times.items()})
    out.update({f"{k}_calls": v[1] for k, v in times.items()})
    out["outside_prefill_and_decode_s"] = (total - out.get("prefill_s", 0.0) - out.get("decode_s", 0.0)
                                           - out.get("decode_lean_s", 0.0))
    return out


@torch.no_grad()
def section_split(model, tok, args, res: dict) -> None:
    """Where one probe's time goes (targets 3 and 5): prefill, decode (graph captures counted),
    and the rest, for a plain probe and one under ``ablate_heads``; HF's one prefill pass of
    the same prompt for scale. Each call synchronised, so the parts add up to the total."""
    from bench_detect import native_modules

    from rhlens.engine.runner import _Runner

    vocab = hf_model(model).config.vocab_size
    tok_n = _NoEos(tok)
    n = args.lengths[0]
    probe = random_probes(tok, vocab, [n], [50])[0]
    heads = random_heads(model.cfg.n_layers, model.cfg.n_heads, 20, seed=0)
    targets = [(_Runner, "_prefill", "prefill"), (_Runner, "_decode_captured", "decode"),
               (_Runner, "_decode", "decode_lean"), (CapturedDecoder, "_edit_values", "edit_values"),
               (CapturedDecoder, "_static", "static")]

    def plain():
        return detect(model, tok_n, [probe], args.new_tokens)

    def masked():
        with ablate_heads(model, heads):
            return detect(model, tok_n, [probe], args.new_tokens)

    out = res["split"] = {"length": n, "plain": [], "masked": []}
    for _ in range(1 + args.repeats):  # the first of each: warm-up (kept, marked)
        for name, fn in (("plain", plain), ("masked", masked)):
            out[name].append(_split_run(fn, targets))
    with native_modules(model) as hf:
        x = torch.tensor([probe.prompt_ids[:-1]], device=next(hf.parameters()).device)
        out["hf_prefill_s"] = median_of(lambda: hf(input_ids=x, use_cache=True, logits_to_keep=1),
                                        args.repeats)[0]
    for name in ("plain", "masked"):
        runs = out[name][1:]
        out[f"{name}_median"] = {k: statistics.median(r.get(k, 0) for r in runs) for k in runs[0]}
    log("split", json.dumps({k: out[k] for k in ("plain_median", "masked_median", "hf_prefill_s")},
                            default=str))


# ---------------------------------------------------------------------------------------
# Correctness on this device
# ---------------------------------------------------------------------------------------
def _decode(model, tok, prompts, policy, batch, n_new, masks=()):
    state = StepState()
    cfg = GenerationConfig(max_new_tokens=n_new, stop_at_newline=False, stop_at_eos=False, batch_size=batch,
                           reuse_prefix=False, policy=policy)
    rec = TopKeyRecorder(model.cfg.n_layers, model.cfg.n_heads, n_new, state,
                         next(model.parameters()).device, max_batch=batch)
    res, paths = [], set()
    for gen in engine.generate_many(model, tok, prompts, config=cfg, hooks=[*rec.hooks(), *masks],
                                    state=state, on_start=lambda i: rec.reset()):
        res.append((gen.response_ids, rec.row(gen.info["batch_row"])[:gen.n_steps].clone()))
        paths.add(gen.info["decode"])
    return res, paths


def _compare(a, b) -> dict:
    pos = [float((x[1] == y[1]).float().mean()) if x[1].shape == y[1].shape else 0.0 for x, y in zip(a, b)]
    return {"tokens_equal": f"{sum(x[0] == y[0] for x, y in zip(a, b))}/{len(a)}",
            "positions_equal_share": round(statistics.mean(pos), 4),
            "bit_identical": sum(x[0] == y[0] and torch.equal(x[1], y[1]) for x, y in zip(a, b))}


def _check_model(out: dict, prefix: str, model, tok, prompts, masks, n_new: int, compiled: bool) -> None:
    """The captured step (compiled too, if asked) against the lean step, alone, and batched
    against alone, unmasked and masked."""
    lean, cap = KernelPolicy(decode="lean"), KernelPolicy(decode="captured")
    comp = KernelPolicy(decode="captured", compile=True)
    for name, m in (("plain", []), ("masked", masks)):
        a, pa = _decode(model, tok, prompts, lean, 1, n_new, m)
        b, pb = _decode(model, tok, prompts, cap, 1, n_new, m)
        c, _ = _decode(model, tok, prompts, cap, 4, n_new, m)
        out[f"{prefix}_{name}_captured_vs_lean"] = {**_compare(b, a), "paths": sorted(pa | pb)}
        out[f"{prefix}_{name}_captured_batch4_vs_alone"] = _compare(c, b)
        if compiled:
            d, _ = _decode(model, tok, prompts, comp, 1, n_new, m)
            e, _ = _decode(model, tok, prompts, comp, 4, n_new, m)
            out[f"{prefix}_{name}_compiled_vs_lean"] = _compare(d, a)
            out[f"{prefix}_{name}_compiled_batch4_vs_alone"] = _compare(e, d)


@torch.no_grad()
def section_check(device: str, res: dict, compiled: bool = False) -> None:
    """``compiled``: the captured step under torch.compile checked too."""
    from rhlens.models import load_model

    root = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(root / "tests"))
    from toy import TOY_MODEL_DIR, make_toy_probe

    out = res["check"] = {}
    # Every model made before any capture (a failed capture can leave the RNG unusable).
    tiny = {dt: random_model("tiny", dt, device, 4096) for dt in (torch.float32, torch.bfloat16)}
    model, tok = load_model(str(TOY_MODEL_DIR), device=device, dtype=torch.float32)
    prompts = [make_toy_probe(tok, 60, s)[0] for s in range(4)]
    masks = ablation_hooks(model, [(0, 1), (1, 3)])
    _check_model(out, "toy_fp32", model, tok, prompts, masks, 8, compiled)
    for dt in (torch.float32, torch.bfloat16):
        model, tok = tiny[dt]
        probes = random_probes(tok, SHAPES["tiny"][5], [1500], [0, 30, 60, 90])
        masks = ablation_hooks(model, random_heads(model.cfg.n_layers, model.cfg.n_heads, 5, seed=1))
        _check_model(out, f"tiny_gqa_{str(dt)[6:]}", model, tok, [p.prompt_ids for p in probes], masks, 16,
                     compiled)
    log("check", json.dumps(out))


# ---------------------------------------------------------------------------------------
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ints = lambda s: [int(x) for x in s.split(",") if x.strip()]  # noqa: E731
    ap.add_argument("--shape", choices=sorted(SHAPES), default="llama3-8b")
    ap.add_argument("--dtype", default=None, help="bf16 | fp32 (default: bf16 on a GPU)")
    ap.add_argument("--sections", default="check,steps,probe,prefill,masked,compile",
                    help="any of check,steps,probe,prefill,masked,split,grid,compile (run in that order)")
    ap.add_argument("--lengths", type=ints, default=[8192, 32768], help="per-probe lengths")
    ap.add_argument("--step-lengths", type=ints, default=[8192, 32768])
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch", type=int, default=8, help="rows of the batched decode step")
    ap.add_argument("--prefill-lengths", type=ints, default=[8192, 32768, 131072])
    ap.add_argument("--prefill-layers", type=int, default=2)
    ap.add_argument("--prefill-repeats", type=int, default=2)
    ap.add_argument("--chunks", type=ints, default=[8192, 32768])
    ap.add_argument("--grid-lengths", type=ints, default=[])
    ap.add_argument("--grid-depths", type=int, default=10)
    ap.add_argument("--grid-chunks", type=ints, default=[0], help="prefill chunks to try (0: the default)")
    ap.add_argument("--budget", type=float, default=1e9, help="seconds: skip optional parts after this")
    ap.add_argument("--no-lean", action="store_true", help="probes: leave out the lean step's run")
    ap.add_argument("--profile", action="store_true",
                    help="also a kernel-time split of one eager captured step (torch.profiler)")
    ap.add_argument("--report", metavar="JSON", help="only print the tables of a saved run")
    ap.add_argument("--out", default="bench_speed.json")
    args = ap.parse_args(argv)
    if args.report:
        print_table(json.loads(Path(args.report).read_text()))
        return 0
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32,
             None: torch.bfloat16 if device == "cuda" else torch.float32}[args.dtype]
    sections = set(args.sections.split(","))
    res: dict = {"machine": machine(), "args": vars(args)}
    out_path = Path(args.out)

    def save():
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(res, indent=1, default=str))

    bw = copy_bandwidth(device)
    res["copy_bw_GBps"] = bw / 1e9 if bw else None
    log("copy bandwidth GB/s", res["copy_bw_GBps"])
    def attempt(name, fn):
        if name not in sections:
            return
        if time.perf_counter() - T0 > args.budget:
            log(name, "skipped: over the time budget")
            return
        try:
            fn()
        except Exception as exc:
            res[f"{name}_error"] = repr(exc)[:500]
            log(name, "FAILED", repr(exc)[:500])
        save()

    model = tok = small = None
    # The models first: a capture that fails can leave the RNG unusable for random weights.
    if "prefill" in sections:
        small = random_model(args.shape, dtype, device, max(args.prefill_lengths) + 64, args.prefill_layers)
    if sections & {"steps", "probe", "grid", "masked", "split", "compile"}:
        t = time.perf_counter()
        need = max([*args.lengths, *args.step_lengths, *args.grid_lengths, 0]) + args.new_tokens + 1100
        model, tok = random_model(args.shape, dtype, device, need)
        res["model"] = f"random {args.shape} {str(dtype)[6:]}"
        res["load_s"] = time.perf_counter() - t
        res["kernel_policy"] = KernelPolicy().resolve(device, model).to_dict()
        log("model", res["model"], "loaded", round(res["load_s"], 1), "s")
    attempt("check", lambda: section_check(device, res, "compile" in sections))
    attempt("steps", lambda: section_steps(model, tok, args, bw, res))
    attempt("probe", lambda: section_probe(model, tok, args, res))
    attempt("prefill", lambda: section_prefill(*small, args, device, dtype, res))
    attempt("masked", lambda: section_masked(model, tok, args, res))
    attempt("split", lambda: section_split(model, tok, args, res))
    attempt("grid", lambda: section_grid(model, tok, args, res))
    attempt("compile", lambda: section_compile(model, tok, args, res))
    save()
    print_table(res)
    return 0


def grid_reuse_model(prefill: dict, lengths=(1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072),
                     depths: int = 10, chunks=(4096, 8192, 16384, 32768)) -> dict | None:
    """The paper-shaped grid's prefill time with haystack reuse, as a share of prefilling every
    probe whole, for each chunk size: one-pass times fitted as ``a n + b n^2`` (the prefill
    section's), probes of a length deepest first, each reusing the haystack before its needle
    cut back to a chunk boundary, a chunk after cached keys costing what its rows cost in one
    pass (measured for the "split" attention: 0.97-1.08x)."""
    import numpy as np

    pts = [(int(n), r["one_pass_s"]) for n, r in prefill.items()
           if isinstance(r, dict) and "one_pass_s" in r]
    if len(pts) < 2:
        return None
    ns = np.array([n for n, _ in pts], dtype=float)
    (a, b), *_ = np.linalg.lstsq(np.stack([ns, ns ** 2], 1), np.array([t for _, t in pts]), rcond=None)

    def cost(p: int, n: int) -> float:  # tokens p..n after p cached ones
        return a * (n - p) + b * (n * n - p * p)

    ds = [100 * i / (depths - 1) for i in range(depths)]
    out = {"fit_a": float(a), "fit_b": float(b)}
    whole = sum(cost(0, n) for n in lengths) * depths
    for chunk in chunks:
        total = 0.0
        for n in lengths:
            prev = None
            for d in sorted(ds, reverse=True):
                at = round((n - 25) * d / 100)  # the needle's position (bench_detect's probes)
                keep = 0 if prev is None else min(prev, at) // chunk * chunk
                total += cost(keep, n)
                prev = at
        out[chunk] = total / whole
    return out


def print_table(res: dict) -> None:
    m = res["machine"]
    print(f"\n{res.get('model', '')} | {m.get('gpu', m['cpu'])} | torch {m['torch']} | {m['date']}")
    if res.get("copy_bw_GBps"):
        print(f"copy bandwidth {res['copy_bw_GBps']:.0f} GB/s (read + write)")
    for k, v in (res.get("check") or {}).items():
        print(f"check {k}: {v}")
    st = res.get("steps") or {}
    if st:
        print("\n| keys | lean ms | static eager ms | captured ms | replay only ms | compiled ms | floor ms "
              "| best/floor | +20 masked | positions agree |")
        print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for n, r in st.items():
            if str(n).startswith("batch"):
                continue
            f = lambda k, r=r: f"{r[k]:.2f}" if isinstance(r.get(k), float) else "-"  # noqa: E731
            agree = r.get("captured_vs_lean", {}).get("positions_equal_share", "-")
            print(f"| {n} | {f('lean_ms')} | {f('static_eager_ms')} | {f('captured_ms')} "
                  f"| {f('replay_only_ms')} | {f('captured_compile_ms')} | {f('floor_ms')} "
                  f"| {f('best_over_floor')} "
                  f"| {f('mask20_over_recorder')} | {agree} |")
        for key in ("batch", "batch_compiled"):
            if key not in st:
                continue
            b = st[key]
            print(f"{key} {b['rows']} at {b['length']}: {b['ms_per_step']:.2f} ms/step vs "
                  f"{b['one_row_ms']:.2f}: "
                  f"{b['tokens_per_s_ratio']:.2f}x probe-tokens/s; rows identical to alone "
                  f"{b.get('rows_identical_to_alone')}/{b['rows']}")
        for n, r in st.items():
            if isinstance(r, dict) and r.get("kernel_split_eager"):
                print(f"eager captured step at {n}, device ms/step by kernel kind: {r['kernel_split_eager']}")
    pf = res.get("prefill") or {}
    for n, r in pf.items():
        if isinstance(r, dict) and n != "kernels":
            print(f"prefill {n} ({pf['layers']} layers): " + ", ".join(
                f"{k} {v['s']:.3f}s ({v['x_one_pass']:.2f}x)" if isinstance(v, dict) else f"{k} {v:.3f}s"
                for k, v in r.items()))
    model = grid_reuse_model(pf) if pf else None
    if model:
        print("paper-shaped grid (1K-128K x 10 depths), prefill with reuse / without, by chunk: "
              + ", ".join(f"{k}: {v:.2f}" for k, v in model.items() if not str(k).startswith("fit")))
    for n, r in (pf.get("kernels") or {}).items():
        print(f"attention {n}: " + ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}"
                                             for k, v in r.items()))
    for n, r in (res.get("probe") or {}).items():
        lean = (f"lean {r['rhlens_lean']['s']:.2f}s ({r['lean_ratio']:.2f}x), " if "rhlens_lean" in r else "")
        print(f"probe {n}: HF {r['hf']['s']:.2f}s, rhlens {r['rhlens']['s']:.2f}s ({r['ratio']:.2f}x), "
              f"{lean}same tokens as HF {r['same_tokens_as_hf']}")
    if res.get("masked"):
        k = res["masked"]
        print(f"masked 20 heads at {k['length']}: {k['masked_s']:.2f}s vs {k['plain_s']:.2f}s "
              f"= {k['ratio']:.3f}x")
    sp = res.get("split") or {}
    for name in ("plain", "masked"):
        r = sp.get(f"{name}_median")
        if r:
            print(f"split {name} probe at {sp['length']}: total {r['total_s']:.3f}s = prefill "
                  f"{r.get('prefill_s', 0):.3f} + decode "
                  f"{r.get('decode_s', 0) + r.get('decode_lean_s', 0):.3f} + rest "
                  f"{r['outside_prefill_and_decode_s']:.3f}; graph captures {r['graph_captures']:.0f}; "
                  f"HF one-pass prefill {sp.get('hf_prefill_s', 0):.3f}s")
    g = res.get("grid") or {}
    for k, v in g.items():
        if k.startswith("chunk"):
            print(f"grid {g['lengths']} x {g['depths']} {k}: {v['grid_s']:.1f}s vs summed HF "
                  f"{g['hf_sum_s']:.1f}s "
                  f"= {v['ratio']:.2f}x; identical alone {v['identical_alone']}/{v['checked']}")
    for k, v in res.items():
        if k.endswith("_error"):
            print(f"{k}: {v}")


if __name__ == "__main__":
    raise SystemExit(main())
