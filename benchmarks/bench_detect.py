"""Speed and memory of retrieval-head detection against HF ``generate`` (issue #8).

Everything is timed in ONE process, on one device, warm-up first, median of repeats:

* ``hf``: HF ``generate`` (greedy, SDPA, the same prompt, the same number of new tokens) on
  the plain HF model (every bridge component swapped for the module it wraps);
* ``paper``: a reference of the paper's decode loop written here: prefill (all logits kept, as
  the authors' harness does), then eager decode steps with ``output_attentions=True`` and a
  Python loop over layers and heads taking each head's argmax (one host sync per head);
* ``rhlens``: ``detect_retrieval_heads`` on one probe (``batch_size=1``);
* ``grid``: ``detect_retrieval_heads`` on a lengths x depths grid in one call (prefix reuse +
  batched decode), against the summed HF generate time of its probes (each length's median
  HF time x its number of probes), and checked against probes detected one at a time;
* ``masked``: one probe under ``ablate_heads`` (20 random heads, the paper's uniform mask)
  against the same probe unmasked;
* ``memory``: peak ``torch.cuda.max_memory_allocated`` of detection at very long contexts.

Models: ``--model default`` (the packaged SmolLM2-135M with its tokenizer and real NIAH
probes), or ``--shape llama3-8b|llama2-7b|tiny``: a randomly initialised Llama of that shape
(``LlamaConfig`` + ``AutoModelForCausalLM.from_config``) with a word-level tokenizer made in
memory and probes of random token ids with a needle span of 8 tokens (detection's cost does
not depend on the token values).

    python benchmarks/bench_detect.py --model default --lengths 2048 --out cpu.json
    python benchmarks/bench_detect.py --shape llama3-8b --dtype bf16 --lengths 8192,32768 \\
        --grid-lengths 1024,4096,8192,16384,32768 --memory-lengths 131072 --out l3.json
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rhlens.ablation import ablate_heads, random_heads
from rhlens.engine import KernelPolicy, _set_attn_impl, hf_model, native_modules
from rhlens.probe import Probe
from rhlens.retrieval import DetectConfig, detect_retrieval_heads

SHAPES = {
    # name: hidden, intermediate, layers, heads, kv heads, vocab, rope theta
    "llama3-8b": (4096, 14336, 32, 32, 8, 128256, 500000.0),
    "llama2-7b": (4096, 11008, 32, 32, 32, 32000, 10000.0),
    "tiny": (128, 256, 4, 8, 2, 1000, 10000.0),
}
NEEDLE_LEN, QUESTION_LEN = 8, 16


# ---------------------------------------------------------------------------------------
# Models and probes
# ---------------------------------------------------------------------------------------
class _NoEos:
    """The tokenizer with no end-of-sequence token: every run makes exactly N tokens."""

    def __init__(self, tok):
        self._tok = tok
        self.eos_token_id = None

    def __getattr__(self, name):
        return getattr(self._tok, name)


def word_tokenizer(vocab: int):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t0"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="t0")


def random_hf(shape: str, dtype: torch.dtype, device: str, max_len: int, layers: int | None = None):
    """A randomly initialised HF Llama of ``shape`` (``layers``: that many of its layers only)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    hidden, inter, n_layers, heads, kv, vocab, theta = SHAPES[shape]
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers or n_layers,
                      num_attention_heads=heads, num_key_value_heads=kv, vocab_size=vocab,
                      rope_theta=theta, max_position_embeddings=max(4096, max_len),
                      bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    cfg.architectures = ["LlamaForCausalLM"]
    torch.manual_seed(0)
    with torch.device(device):
        hf = AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation="sdpa")
    return hf.eval()


def random_model(shape: str, dtype: torch.dtype, device: str, max_len: int, layers: int | None = None):
    """:func:`random_hf` booted into a TransformerBridge, with a word-level tokenizer."""
    from transformer_lens.model_bridge import TransformerBridge

    hf = random_hf(shape, dtype, device, max_len, layers)
    tok = word_tokenizer(SHAPES[shape][5])
    bridge = TransformerBridge.boot_transformers(f"random-{shape}", hf_model=hf, tokenizer=tok)
    bridge.eval()
    bridge.rhlens_name = f"random-{shape}"
    return bridge, tok


def random_probes(tok, vocab: int, lengths, depths, seed: int = 0) -> list[Probe]:
    """Probes of random ids sharing one haystack: the needle moves, as in a NIAH grid."""
    rng = random.Random(seed)
    hay = [rng.randrange(3, vocab) for _ in range(max(lengths))]
    needle = [rng.randrange(3, vocab) for _ in range(NEEDLE_LEN)]
    question = [rng.randrange(3, vocab) for _ in range(QUESTION_LEN)]
    out = []
    for n in lengths:
        body = hay[:n - NEEDLE_LEN - QUESTION_LEN - 1]
        for d in depths:
            at = round(len(body) * d / 100)
            ids = [1, *body[:at], *needle, *body[at:], *question]
            span = (1 + at, 1 + at + NEEDLE_LEN)
            out.append(Probe(prompt_ids=ids, needle_span=span, real_needle=tok.decode(needle),
                             length=n, depth=float(d), needle_id="random"))
    return out


def real_probes(tok, lengths, depths) -> list[Probe]:
    from rhlens.probes import ProbeConfig, build_probes

    cfg = ProbeConfig(lengths=tuple(lengths), depths=tuple(depths), answer_buffer=0)
    return [p for p in build_probes(tok, config=cfg, haystack="synthetic").probes
            if p.needle_id == "lighthouse-soup"]


# ---------------------------------------------------------------------------------------
# The measured runs
# ---------------------------------------------------------------------------------------
def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _reset_peak():
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def _peak() -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None


def timed_pair(fa, fb, repeats: int, warmup: int = 1):
    """Two functions timed in alternation (a, b, a, b, ...), so that drifting load on a shared
    machine hits both alike. (median a, all a, peak a, last a), the same for b."""
    for _ in range(warmup):
        fa()
        fb()
    out = [{"times": [], "peak": None, "last": None} for _ in range(2)]
    for _ in range(repeats):
        for slot, fn in zip(out, (fa, fb)):
            _reset_peak()
            _sync()
            t = time.perf_counter()
            slot["last"] = fn()
            _sync()
            slot["times"].append(time.perf_counter() - t)
            peak = _peak()
            slot["peak"] = peak if slot["peak"] is None else max(slot["peak"], peak)
    return tuple((statistics.median(x["times"]), x["times"], x["peak"], x["last"]) for x in out)


def timed(fn, repeats: int, warmup: int = 1):
    """(median seconds, all seconds, peak GiB, last result)."""
    for _ in range(warmup):
        fn()
    times, out = [], None
    _reset_peak()
    for _ in range(repeats):
        _sync()
        t = time.perf_counter()
        out = fn()
        _sync()
        times.append(time.perf_counter() - t)
    return statistics.median(times), times, _peak(), out


@torch.no_grad()
def hf_generate(model, probe: Probe, n_new: int) -> list[int]:
    with native_modules(model) as hf:
        device = next(hf.parameters()).device
        x = torch.tensor([probe.prompt_ids], device=device)
        out = hf.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=n_new,
                          min_new_tokens=n_new, do_sample=False, pad_token_id=0)
    return out[0, x.shape[1]:].tolist()


@torch.no_grad()
def paper_reference(model, probe: Probe, n_new: int) -> list[int]:
    """The authors' loop: eager decode, output_attentions, a Python loop over every head."""
    start, end = probe.needle_span
    ids = probe.prompt_ids
    with native_modules(model, "sdpa") as hf:
        device = next(hf.parameters()).device
        x = torch.tensor([ids], device=device)
        out = hf(input_ids=x[:, :-1], use_cache=True)  # all logits kept, as in the paper
        past = out.past_key_values
        del out
        _set_attn_impl(hf, "eager")
        n_layers, n_heads = hf.config.num_hidden_layers, hf.config.num_attention_heads
        copied = [[set() for _ in range(n_heads)] for _ in range(n_layers)]
        inp, gen = x[:, -1:], []
        for _ in range(n_new):
            out = hf(input_ids=inp, past_key_values=past, use_cache=True, output_attentions=True)
            past = out.past_key_values
            token = int(out.logits[0, -1].argmax())
            gen.append(token)
            for layer in range(n_layers):
                attn = out.attentions[layer][0]
                for head in range(n_heads):
                    pos = int(attn[head, -1].argmax())
                    if start <= pos < end and ids[pos] == token:
                        copied[layer][head].add(pos)
            inp = torch.tensor([[token]], device=device)
    return gen


def _kernel_table(prof, rows: int = 12) -> str:
    for key in ("self_device_time_total", "self_cuda_time_total", "self_cpu_time_total"):
        try:
            return prof.key_averages().table(sort_by=key, row_limit=rows)
        except (AttributeError, KeyError, ValueError, RuntimeError):
            continue
    return ""


@torch.no_grad()
def step_profile(model, probe: Probe, n_steps: int = 30, kernels: bool = False) -> dict:
    """Milliseconds per decode step (no prefill, no scoring): HF's own forward on its DynamicCache
    (SDPA), the engine's lean step without and with the retrieval recorder, and the bridge's
    step with the recorder (what the engine did before the lean step)."""
    import contextlib

    from rhlens import engine
    from rhlens.engine import StepState
    from rhlens.retrieval import TopKeyRecorder

    def forced_av(mode: str) -> KernelPolicy | None:  # "av=split": that pattern @ V at any length
        return KernelPolicy(av=mode.split("av=")[1], split_from=0) if "av=" in mode else None

    hf = hf_model(model)
    ids = probe.prompt_ids[:-1]
    device = next(hf.parameters()).device
    state = StepState()
    rec = TopKeyRecorder(model.cfg.n_layers, model.cfg.n_heads, n_steps + 10, state, device)
    out = {}
    masked = random_heads(model.cfg.n_layers, model.cfg.n_heads, 20, seed=0)
    for mode in ("hf", "lean", "lean+recorder", "lean+recorder+mask20", "lean+recorder av=mm",
                 "lean+recorder av=sdpa", "bridge+recorder"):
        ctx = contextlib.ExitStack()
        if mode == "hf":
            cache = engine._new_cache(hf)
            ctx.enter_context(native_modules(model))
            hf(input_ids=torch.tensor([ids], device=device), past_key_values=cache, use_cache=True,
               logits_to_keep=1)

            def step(x, c, pos):
                return hf(input_ids=x, past_key_values=c, use_cache=True).logits
        else:
            pool = engine._KVPool(hf, engine._plain_cache_layers(hf))
            pool.ensure(1, len(ids) + n_steps + 10, tuple(ids), None, False, engine.DEFAULT_PREFILL_CHUNK)
            pool.fill(model, 0, tuple(ids), None, False, engine.DEFAULT_PREFILL_CHUNK)
            cache = pool.decode_cache(1, len(ids))
            if "recorder" in mode:
                ctx.enter_context(model.hooks(fwd_hooks=rec.hooks()))
            if "mask20" in mode:  # ablate_heads' uniform mask on 20 random heads
                ctx.enter_context(ablate_heads(model, masked))
            step = engine._decode_step(model, mode.startswith("lean"), forced_av(mode))
        x = torch.tensor([[probe.prompt_ids[-1]]], device=device)
        with ctx, engine.phase("decode", state):
            for i in range(n_steps + 5):
                if i == 5:
                    _sync()
                    t = time.perf_counter()
                state.step, state.n_seen = i, len(ids) + 1 + i
                step(x, cache, len(ids) + i)
            _sync()
            out[mode] = (time.perf_counter() - t) / n_steps * 1e3
            if (kernels and mode in ("hf", "lean+recorder", "lean+recorder+mask20")
                    and torch.cuda.is_available()):
                from torch.profiler import ProfilerActivity, profile

                with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                    for i in range(3):
                        state.step = n_steps + 5 + i
                        step(x, cache, len(ids) + n_steps + 5 + i)
                    _sync()
                out[f"kernels {mode}"] = _kernel_table(prof)
        del cache
    return out


@torch.no_grad()
def prefill_seconds(model, probe: Probe) -> dict:
    """One prefill of the prompt minus its last token: the engine's vs HF's own forward."""
    from rhlens import engine

    hf = hf_model(model)
    device = next(hf.parameters()).device
    ids = probe.prompt_ids[:-1]
    out = {}
    for mode in ("hf", "rhlens", "hf", "rhlens"):
        _sync()
        t = time.perf_counter()
        if mode == "hf":
            cache = engine._new_cache(hf)
            with native_modules(model):
                hf(input_ids=torch.tensor([ids], device=device), past_key_values=cache,
                   use_cache=True, logits_to_keep=1)
        else:
            pool = engine._KVPool(hf, engine._plain_cache_layers(hf))
            pool.ensure(1, len(ids) + 40, tuple(ids), None, False, engine.DEFAULT_PREFILL_CHUNK)
            pool.fill(model, 0, tuple(ids), None, False, engine.DEFAULT_PREFILL_CHUNK)
        _sync()
        out[mode] = time.perf_counter() - t  # the second of each pair (warm)
        cache = pool = None
    return out


def identity_breakdown(model, tok, probes, n_new: int) -> dict:
    """Which fast path changes a probe's result: each variant against probes run alone."""
    solo = [detect(model, tok, [p], n_new) for p in probes]

    def same(res):
        return sum(torch.equal(s.per_probe[0], res.per_probe[i])
                   and s.probes[0]["response"] == res.probes[i]["response"]
                   for i, s in enumerate(solo))

    out = {"n": len(probes), "again_alone": same(detect(model, tok, probes, n_new, batch_size=1,
                                                        reuse=False))}
    out["reuse_only"] = same(detect(model, tok, probes, n_new, batch_size=1))
    for rows in ("batch", "row", "slab"):
        policy = KernelPolicy(rows=rows)
        out[f"batch_{rows}_no_reuse"] = same(detect(model, tok, probes, n_new, batch_size=len(probes),
                                                    reuse=False, policy=policy))
        out[f"batch_{rows}_reuse"] = same(detect(model, tok, probes, n_new, batch_size=len(probes),
                                                 policy=policy))
    return out


def detect(model, tok, probes, n_new: int, batch_size: int = 1, chunk: int | None = None,
           reuse: bool = True, policy: KernelPolicy | None = None):
    cfg = DetectConfig(max_new_tokens=n_new, stop_at_newline=False, batch_size=batch_size,
                       prefill_chunk=chunk, reuse_prefix=reuse, policy=policy)
    return detect_retrieval_heads(model, probes, config=cfg, tokenizer=tok)


def masked_costs(model, tok, probe, heads, n_new: int, repeats: int) -> dict:
    """Unmasked vs under ``ablate_heads`` (uniform, decode only), timed in alternation."""

    def masked():
        with ablate_heads(model, heads):
            return detect(model, tok, [probe], n_new)

    plain, under = timed_pair(lambda: detect(model, tok, [probe], n_new), masked, repeats)
    return {"length": probe.n_tokens, "heads": len(heads), "unmasked_s": plain[0],
            "masked_s": under[0], "ratio": under[0] / plain[0],
            "unmasked_all": plain[1], "masked_all": under[1]}


def same_results(a, b) -> bool:
    return (torch.equal(a.per_probe, b.per_probe)
            and [p["response"] for p in a.probes] == [p["response"] for p in b.probes])


# ---------------------------------------------------------------------------------------
@torch.no_grad()
def self_check(device: str) -> dict:
    """Correctness on the benchmark's own machine, before any timing."""
    import inspect

    from transformers.models.llama.modeling_llama import LlamaAttention

    from rhlens import engine
    from rhlens.engine import GenerationConfig, StepState, generate, generate_many
    from rhlens.models import load_model
    from rhlens.retrieval import TopKeyRecorder

    root = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(root / "tests"))
    from toy import TOY_MODEL_DIR, make_toy_probe

    out: dict = {"llama_attention_takes_past_key_values":
                 "past_key_values" in inspect.signature(LlamaAttention.forward).parameters}
    # 1. The toy model: the engine's greedy tokens equal HF generate's (fp32 and bf16).
    for dt in (torch.float32, torch.bfloat16):
        model, tok = load_model(str(TOY_MODEL_DIR), device=device, dtype=dt)
        same = []
        for seed in range(6):
            ids, _, _ = make_toy_probe(tok, 40 + 20 * seed, seed)
            gen = generate(model, tok, ids, config=GenerationConfig(max_new_tokens=10))
            with native_modules(model) as hf:
                x = torch.tensor([ids], device=device)
                ref = hf.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=10,
                                  do_sample=False, pad_token_id=0)[0, len(ids):].tolist()
            same.append(gen.response_ids == ref[:len(gen.response_ids)])
        out[f"toy_{str(dt)[6:]}_engine_tokens_equal_hf_generate"] = f"{sum(same)}/{len(same)}"
    # 2. Lower-right causal SDPA after cached keys (GQA) against an explicit dense mask.
    class _M:
        num_key_value_groups = 4

    g = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(1, 32, 300, 128, device=device, dtype=torch.bfloat16, generator=g)
    k = torch.randn(1, 8, 1000, 128, device=device, dtype=torch.bfloat16, generator=g)
    v = torch.randn(1, 8, 1000, 128, device=device, dtype=torch.bfloat16, generator=g)
    fast = engine._rhlens_sdpa(_M(), q, k, v, None, scaling=128 ** -0.5)[0]
    kk, vv = k.repeat_interleave(4, 1).float(), v.repeat_interleave(4, 1).float()
    mask = torch.ones(300, 1000, dtype=torch.bool, device=device).tril(700)
    ref = torch.nn.functional.scaled_dot_product_attention(q.float(), kk, vv, attn_mask=mask,
                                                           scale=128 ** -0.5).transpose(1, 2)
    out["lower_right_gqa_rel_err"] = float((fast.float() - ref).norm() / ref.norm())
    # 3. A random GQA model in bf16: lean decode vs bridge decode, batched vs alone.
    model, tok = random_model("tiny", torch.bfloat16, device, 4096)
    probes = random_probes(tok, SHAPES["tiny"][5], [1500], [0, 30, 60, 90])
    prompts = [p.prompt_ids for p in probes]

    def run(**kw):
        cfg = GenerationConfig(max_new_tokens=16, stop_at_newline=False, stop_at_eos=False, **kw)
        state = StepState()
        rec = TopKeyRecorder(model.cfg.n_layers, model.cfg.n_heads, 16, state, device,
                             max_batch=cfg.batch_size)
        res = []
        for gen in generate_many(model, tok, prompts, config=cfg, hooks=rec.hooks(), state=state,
                                 on_start=lambda i: rec.reset()):
            res.append((gen.response_ids, rec.row(gen.info["batch_row"])[:gen.n_steps].clone()))
        return res

    def compare(a_runs, b_runs):
        tok_same = sum(a[0] == b[0] for a, b in zip(a_runs, b_runs))
        pos_same = sum(torch.equal(a[1], b[1]) for a, b in zip(a_runs, b_runs))
        return f"tokens {tok_same}/4, positions {pos_same}/4"

    base = run(lean_decode=False, reuse_prefix=False, prefill_chunk=256)
    alone = run(reuse_prefix=False, prefill_chunk=256)
    out["tiny_gqa_bf16_lean_vs_bridge"] = compare(base, alone)
    out["tiny_gqa_bf16_lean_expand_kv_vs_bridge"] = compare(
        base, run(reuse_prefix=False, prefill_chunk=256, policy=KernelPolicy(expand_kv=True)))
    out["tiny_gqa_bf16_batch4_reuse_vs_alone"] = compare(
        alone, run(batch_size=4, prefill_chunk=256))
    return out


def machine() -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__,
            "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "threads": torch.get_num_threads()}
    try:
        import transformer_lens
        import transformers

        info["transformers"] = transformers.__version__
        info["transformer_lens"] = getattr(transformer_lens, "__version__", "4.3.0")
    except ImportError:
        pass
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info["cpu"] = f"{cpu} ({os.cpu_count()} cores)"
    if hasattr(os, "getloadavg"):
        info["load_avg"] = os.getloadavg()
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info["gpu"] = f"{p.name}, {p.total_memory / 2**30:.1f} GiB"
    return info


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="'default' (packaged SmolLM2-135M) or a model name/path")
    ap.add_argument("--shape", choices=sorted(SHAPES), help="random-init Llama of this shape")
    ap.add_argument("--dtype", default=None, help="bf16 | fp16 | fp32 (default: bf16 on GPU)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--lengths", default="8192,32768", help="per-probe lengths (tokens)")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--paper-max", type=int, default=32768, help="skip the paper loop above this")
    ap.add_argument("--grid-lengths", default="", help="grid lengths (empty: no grid)")
    ap.add_argument("--grid-depths", type=int, default=10)
    ap.add_argument("--grid-batch", type=int, default=10)
    ap.add_argument("--masked-length", type=int, default=0, help="0: the first per-probe length")
    ap.add_argument("--masked-heads", type=int, default=20)
    ap.add_argument("--memory-lengths", default="", help="long-context peak-memory runs")
    ap.add_argument("--memory-chunk", type=int, default=0, help="0: the engine default")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--memory-cap-gib", type=float, default=0,
                    help="cap this process's GPU memory (e.g. 79: an 80 GB H100 on a larger card)")
    ap.add_argument("--av-variants", default="",
                    help="also time rhlens with these pattern @ V modes (mm,split,sdpa)")
    ap.add_argument("--expand-variant", action="store_true",
                    help="also time rhlens with K/V copied per query head (the bridge's GQA way)")
    ap.add_argument("--out", default="bench_detect.json")
    ap.add_argument("--check", action="store_true", help="run the correctness self-check first")
    ap.add_argument("--chunk-study", action="store_true",
                    help="only: rhlens / HF per probe for prefill chunks x pattern @ V modes")
    ap.add_argument("--diagnose", action="store_true",
                    help="only: decode-step costs and kernels, prefill costs, identity breakdown")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.memory_cap_gib and device == "cuda":
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.memory_cap_gib * 2**30 / total))
    checks = None
    if args.check:
        checks = self_check(device)
        print(json.dumps(checks, indent=1), flush=True)
        if not (args.shape or args.model):
            return 0
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32,
             None: torch.bfloat16 if device == "cuda" else torch.float32}[args.dtype]
    ints = lambda s: [int(x) for x in s.split(",") if x.strip()]  # noqa: E731
    lengths, grid_lengths = ints(args.lengths), ints(args.grid_lengths)
    mem_lengths = ints(args.memory_lengths)
    n_new = args.new_tokens
    depths = [round(100 * i / max(1, args.grid_depths - 1), 1) for i in range(args.grid_depths)]
    res: dict = {"machine": machine(), "args": vars(args), "checks": checks, "rows": [],
                 "grid": None, "masked": None, "memory": []}
    out_path = Path(args.out)

    def save():
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(res, indent=1, default=str))

    t0 = time.perf_counter()
    all_lengths = sorted(set(lengths) | set(grid_lengths) | set(mem_lengths))
    if args.shape:
        model, tok = random_model(args.shape, dtype, device, max(all_lengths) + n_new + 8)
        vocab = SHAPES[args.shape][5]
        make = lambda ls, ds: random_probes(tok, vocab, ls, ds)  # noqa: E731
        name = f"random {args.shape} {str(dtype).replace('torch.', '')}"
    else:
        from rhlens.models import load_model

        model, tok = load_model(None if args.model in (None, "default") else args.model,
                                device=device, dtype=dtype)
        make = lambda ls, ds: real_probes(tok, ls, ds)  # noqa: E731
        name = f"{model.rhlens_name} {str(dtype).replace('torch.', '')}"
    tok_n = _NoEos(tok)
    res["model"] = name
    res["load_seconds"] = round(time.perf_counter() - t0, 1)
    print(f"# {name} on {res['machine'].get('gpu', res['machine']['cpu'])}; loaded in "
          f"{res['load_seconds']} s", flush=True)
    weights_gib = sum(p.numel() * p.element_size() for p in hf_model(model).parameters()) / 2**30
    res["weights_gib"] = weights_gib
    res["kernel_policy"] = KernelPolicy().resolve(device, model).to_dict()  # the default runs

    if args.chunk_study:
        study = res["chunk_study"] = {}
        for n in lengths:
            probe = make([n], [50.0])[0]
            hf_s = timed(lambda p=probe: hf_generate(model, p, n_new), args.repeats)[0]
            study[n] = {"hf_s": hf_s}
            for chunk in (4096, 16384, 1 << 20):
                for av in ("split", "mm"):
                    t = timed(lambda p=probe, c=chunk, a=av: detect(
                        model, tok_n, [p], n_new, chunk=c, policy=KernelPolicy(av=a, split_from=0)),
                        args.repeats)[0]
                    study[n][f"chunk{chunk}_{av}"] = t / hf_s
                print(n, chunk, json.dumps({k: round(v, 3) for k, v in study[n].items()}), flush=True)
            save()
        return 0

    if args.diagnose:
        diag = res["diagnose"] = {}
        for n in lengths:
            probe = make([n], [50.0])[0]
            st = step_profile(model, probe, kernels=(n == max(lengths)))
            diag[f"step_ms_{n}"] = {k: v for k, v in st.items() if not k.startswith("kernels")}
            print(n, json.dumps(diag[f"step_ms_{n}"]), flush=True)
            for k, v in st.items():
                if k.startswith("kernels"):
                    print(f"--- {k} at {n} tokens (3 steps)\n{v}", flush=True)
            diag[f"prefill_s_{n}"] = prefill_seconds(model, probe)
            print(n, "prefill", json.dumps(diag[f"prefill_s_{n}"]), flush=True)
            save()
        if grid_lengths:
            probes = make([min(grid_lengths)], depths)
            diag["identity"] = identity_breakdown(model, tok_n, probes, n_new)
            print("identity vs alone:", json.dumps(diag["identity"]), flush=True)
            save()
        m_len = args.masked_length or lengths[0]
        probe = make([m_len], [50.0])[0]
        heads = random_heads(model.cfg.n_layers, model.cfg.n_heads, args.masked_heads, seed=0)
        diag["masked"] = masked_costs(model, tok_n, probe, heads, n_new, args.repeats)
        print("masked:", json.dumps(diag["masked"]), flush=True)
        save()
        return 0

    # -- per probe ---------------------------------------------------------------------
    hf_times: dict[int, float] = {}
    for n in sorted(set(lengths) | set(grid_lengths)):
        probe = make([n], [50.0])[0]
        if n in lengths:  # HF and rhlens in alternation
            (med, times, peak, gen_hf), (med_r, times_r, peak_r, sc) = timed_pair(
                lambda p=probe: hf_generate(model, p, n_new),
                lambda p=probe: detect(model, tok_n, [p], n_new), args.repeats)
        else:
            med, times, peak, gen_hf = timed(lambda p=probe: hf_generate(model, p, n_new),
                                             args.repeats)
        hf_times[n] = med
        row = {"length": n, "n_tokens": probe.n_tokens, "hf_s": med, "hf_all": times,
               "hf_peak_gib": peak}
        if n in lengths:
            # HF's min_new_tokens forbids EOS, which rhlens (no stop here) may pick and go on
            # past: the two agree up to the first EOS rhlens picks.
            ours = list(sc.probes[0]["response_ids"])
            eos = {i for i in [getattr(tok, "eos_token_id", None)] if i is not None}
            cut = next((i for i, t in enumerate(ours) if t in eos), len(ours))
            row.update(rhlens_s=med_r, rhlens_all=times_r, rhlens_peak_gib=peak_r,
                       ratio=med_r / med, same_tokens_as_hf=ours[:cut] == gen_hf[:cut],
                       tokens_compared=cut)
            if args.expand_variant and model.cfg.n_key_value_heads not in (None, model.cfg.n_heads):
                # The bridge's way under GQA: K/V copied per query head at every step.
                med_x, times_x, peak_x, sx = timed(lambda p=probe: detect(
                    model, tok_n, [p], n_new, policy=KernelPolicy(expand_kv=True)), args.repeats)
                row.update(expand_s=med_x, expand_all=times_x, expand_peak_gib=peak_x,
                           expand_ratio=med_x / med,
                           expand_same=same_results(sx, sc))
            for av in [x for x in args.av_variants.split(",") if x]:
                med_v, times_v, _, _ = timed(lambda p=probe, a=av: detect(
                    model, tok_n, [p], n_new, policy=KernelPolicy(av=a, split_from=0)), args.repeats)
                row.update({f"av_{av}_s": med_v, f"av_{av}_all": times_v,
                            f"av_{av}_ratio": med_v / med})
            if n <= args.paper_max:
                med_p, times_p, peak_p, gen_p = timed(lambda p=probe: paper_reference(model, p, n_new),
                                                      max(1, args.repeats - 2))
                row.update(paper_s=med_p, paper_all=times_p, paper_peak_gib=peak_p,
                           paper_ratio=med_p / med)
        res["rows"].append(row)
        save()
        print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()
                          if not k.endswith("_all")}), flush=True)

    # -- decode step costs ----------------------------------------------------------------
    if lengths:
        probe = make([lengths[0]], [50.0])[0]
        res["step_ms"] = {"length": lengths[0], **step_profile(model, probe)}
        save()
        print(json.dumps(res["step_ms"]), flush=True)

    # -- masked vs unmasked --------------------------------------------------------------
    m_len = args.masked_length or (lengths[0] if lengths else 0)
    if m_len and args.masked_heads:
        probe = make([m_len], [50.0])[0]
        heads = random_heads(model.cfg.n_layers, model.cfg.n_heads, args.masked_heads, seed=0)
        res["masked"] = masked_costs(model, tok_n, probe, heads, n_new, args.repeats)
        save()
        print(json.dumps({k: v for k, v in res["masked"].items() if not k.endswith("_all")}),
              flush=True)

    # -- whole grid ----------------------------------------------------------------------
    if grid_lengths:
        probes = make(grid_lengths, depths)
        detect(model, tok_n, probes[:2], n_new, batch_size=args.grid_batch)  # warm-up
        _reset_peak()
        _sync()
        t = time.perf_counter()
        grid = detect(model, tok_n, probes, n_new, batch_size=args.grid_batch)
        _sync()
        grid_s = time.perf_counter() - t
        grid_peak = _peak()
        hf_sum = sum(hf_times[p.length] for p in probes)
        # One at a time, for the identity check: every depth of the shortest length, and the
        # middle depth of every length.
        mid = depths[len(depths) // 2]
        check = [i for i, p in enumerate(probes)
                 if p.length == min(grid_lengths) or p.depth == mid]
        solo_same = []
        for i in check:
            solo = detect(model, tok_n, [probes[i]], n_new)
            solo_same.append(torch.equal(solo.per_probe[0], grid.per_probe[i])
                             and solo.probes[0]["response"] == grid.probes[i]["response"])
        res["grid"] = {"lengths": grid_lengths, "depths": depths, "n_probes": len(probes),
                       "batch_size": args.grid_batch, "grid_s": grid_s, "hf_sum_s": hf_sum,
                       "ratio": grid_s / hf_sum, "peak_gib": grid_peak,
                       "checked_alone": len(check), "identical_alone": sum(solo_same)}
        save()
        print(json.dumps(res["grid"]), flush=True)

    # -- long-context memory -------------------------------------------------------------
    for n in mem_lengths:
        probe = make([n], [50.0])[0]
        _reset_peak()
        t = time.perf_counter()
        try:
            sc = detect(model, tok_n, [probe], n_new, chunk=args.memory_chunk or None)
            ok, err = True, None
        except torch.cuda.OutOfMemoryError as exc:  # reported, not fatal
            ok, err, sc = False, str(exc).splitlines()[0], None
        _sync()
        cfgm = hf_model(model).config
        n_kv = cfgm.num_key_value_heads
        head_dim = cfgm.hidden_size // cfgm.num_attention_heads
        kv = 2 * cfgm.num_hidden_layers * n_kv * head_dim * (n + n_new) * dtype.itemsize / 2**30
        row = {"length": n, "ok": ok, "error": err, "seconds": time.perf_counter() - t,
               "peak_gib": _peak(), "weights_gib": weights_gib, "kv_gib": kv,
               "chunk": args.memory_chunk}
        if ok and row["peak_gib"] is not None:
            row["other_gib"] = row["peak_gib"] - weights_gib - kv
        res["memory"].append(row)
        save()
        print(json.dumps(row), flush=True)
        del sc
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    print_table(res)
    save()
    return 0


def print_table(res: dict) -> None:
    m = res["machine"]
    print(f"\n{res['model']} | {m.get('gpu', m['cpu'])} | torch {m['torch']}, transformers "
          f"{m.get('transformers')} | {m['date']}")
    print("\n| length | HF generate s | paper loop s (x HF) | rhlens s (x HF) "
          "| rhlens, K/V copied per head s (x HF) | peak GiB HF / rhlens |")
    print("|---:|---:|---:|---:|---:|---:|")
    for r in res["rows"]:
        if "rhlens_s" not in r:
            continue
        paper = f"{r['paper_s']:.2f} ({r['paper_ratio']:.2f}x)" if "paper_s" in r else "-"
        peaks = (f"{r['hf_peak_gib']:.1f} / {r['rhlens_peak_gib']:.1f}"
                 if r.get("hf_peak_gib") is not None else "-")
        expand = f"{r['expand_s']:.2f} ({r['expand_ratio']:.2f}x)" if "expand_s" in r else "-"
        print(f"| {r['length']} | {r['hf_s']:.2f} | {paper} | {r['rhlens_s']:.2f} "
              f"({r['ratio']:.2f}x) | {expand} | {peaks} |")
    for r in res["rows"]:
        variants = [(k[3:-2], v, r[k[:-2] + "_ratio"]) for k, v in r.items()
                    if k.startswith("av_") and k.endswith("_s")]
        if variants:
            print(f"rhlens at {r['length']} with pattern @ V as: " + ", ".join(
                f"{name} {v:.2f} s ({x:.2f}x)" for name, v, x in variants))
    g = res.get("grid")
    if g:
        print(f"\ngrid {len(g['lengths'])} lengths {g['lengths']} x {len(g['depths'])} depths "
              f"({g['n_probes']} probes, batch {g['batch_size']}): {g['grid_s']:.1f} s vs summed "
              f"HF generate {g['hf_sum_s']:.1f} s = {g['ratio']:.2f}x; identical to one-at-a-time "
              f"on {g['identical_alone']}/{g['checked_alone']} probes checked")
    st = res.get("step_ms")
    if st:
        print("ms per decode step at " + str(st["length"]) + " tokens: "
              + ", ".join(f"{k} {v:.2f}" for k, v in st.items() if k != "length"))
    k = res.get("masked")
    if k:
        print(f"masked ({k['heads']} heads, {k['length']} tokens): {k['masked_s']:.2f} s vs "
              f"unmasked {k['unmasked_s']:.2f} s = {k['ratio']:.3f}x (timed in alternation)")
    for r in res.get("memory", []):
        if r["ok"] and r["peak_gib"] is None:
            print(f"memory at {r['length']} tokens: ran in {r['seconds']:.1f} s (no CUDA peak)")
        elif r["ok"]:
            print(f"memory at {r['length']} tokens: peak {r['peak_gib']:.1f} GiB (weights "
                  f"{r['weights_gib']:.1f} + KV {r['kv_gib']:.1f} + other {r.get('other_gib', 0):.1f}),"
                  f" {r['seconds']:.1f} s")
        else:
            print(f"memory at {r['length']} tokens: FAILED {r['error']}")


if __name__ == "__main__":
    raise SystemExit(main())
