"""A million tokens on one GPU, and the prefill's model-FLOPs utilisation (issue 26).

Random weights of the Qwen2.5-7B-Instruct-1M shape (28 layers, 28 query / 4 KV heads of 128,
hidden 3584, MLP 18944, vocab 152064; bf16), booted into a TransformerBridge.

``--section mfu``: the bf16 matrix-product peak of this GPU (an 8192^3 product, best of
several), then for each of ``--lengths`` the engine's chunked prefill into its KV buffers
(``rhlens.engine.prefill``) and, where it fits, HF's own one-pass prefill (``model(ids,
use_cache=True, logits_to_keep=1)``, SDPA), each timed after a warm-up at a short length;
model FLOPs = per token and layer the projections and the MLP (2 x multiply-adds), plus the
causal attention's two products (2 x 2 x heads x head_dim x n^2 / 2).

``--section probe``: one needle probe of ``--length`` tokens (depth 50%) through
``detect_retrieval_heads`` with the recorder (``--new-tokens`` greedy steps): wall time split
into prefill / decode / rest, peak memory against weights + KV, the recorder's top keys, and a
refusal (a probe twice as long, refused before its prefill with what it needs and what is free).

    python benchmarks/million.py --section mfu --lengths 32768,131072,524288 --out mfu.json
    python benchmarks/million.py --section probe --length 1048576 --out probe.json
    python benchmarks/million.py --tiny ...   # a CPU check of the script (tiny shapes)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_detect import machine, word_tokenizer

# hidden, intermediate, layers, heads, kv heads, head dim, vocab, rope theta
QWEN25_7B_1M = (3584, 18944, 28, 28, 4, 128, 152064, 10_000_000.0)
TINY = (128, 256, 2, 4, 2, 32, 1000, 10_000.0)
GIB = 2 ** 30


def random_qwen2(shape, device: str, dtype: torch.dtype, max_len: int):
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import AutoModelForCausalLM, Qwen2Config

    hidden, inter, layers, heads, kv, hd, vocab, theta = shape
    cfg = Qwen2Config(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv, head_dim=hd,
                      vocab_size=vocab, rope_theta=theta, max_position_embeddings=max_len + 64,
                      bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    cfg.architectures = ["Qwen2ForCausalLM"]
    torch.manual_seed(0)
    with torch.device(device):
        hf = AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation="sdpa").eval()
    tok = word_tokenizer(vocab)
    bridge = TransformerBridge.boot_transformers("random-qwen2.5-7b-1m", hf_model=hf, tokenizer=tok)
    bridge.eval()
    bridge.rhlens_name = "random-qwen2.5-7b-1m"
    return bridge, hf, tok


def prefill_flops(shape, n: int) -> float:
    hidden, inter, layers, heads, kv, hd, _, _ = shape
    per_token = 2 * (hidden * (heads * hd + 2 * kv * hd) + heads * hd * hidden) + 2 * 3 * hidden * inter
    attention = 2 * 2 * heads * hd * n * n / 2
    return layers * (n * per_token + attention)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def matmul_peak(device: str) -> float:
    """bf16 TFLOP/s of an 8192^3 product, best of 10 timed runs."""
    n = 8192 if device == "cuda" else 256
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    best = float("inf")
    for _ in range(10):
        sync(device)
        t = time.perf_counter()
        for _ in range(5):
            a @ b
        sync(device)
        best = min(best, (time.perf_counter() - t) / 5)
    return 2 * n ** 3 / best / 1e12


def kv_buffers(hf, shape, n: int, device: str, dtype):
    _, _, layers, _, kv, hd, _, _ = shape
    ks = [torch.empty(1, kv, n, hd, device=device, dtype=dtype) for _ in range(layers)]
    vs = [torch.empty(1, kv, n, hd, device=device, dtype=dtype) for _ in range(layers)]
    return ks, vs


def rh_prefill(model, hf, shape, ids, device, dtype, chunk) -> float:
    from rhlens.engine.kv import buffer_cache
    from rhlens.engine.native import prefill

    ks, vs = kv_buffers(hf, shape, len(ids), device, dtype)
    cache = buffer_cache(hf, ks, vs, 0)
    sync(device)
    t = time.perf_counter()
    prefill(model, ids, cache, chunk=chunk, attn="split" if device == "cuda" else "lower_right")
    sync(device)
    took = time.perf_counter() - t
    del cache, ks, vs
    return took


@torch.no_grad()
def hf_prefill(model, hf, ids, device) -> float:
    """HF's own one-pass prefill: the bridge's attention slots given back to HF's modules, with
    HF's SDPA attention (the bridge boots the model eager)."""
    from rhlens.engine.native import native_attention

    with native_attention(model, "sdpa"):
        x = torch.tensor([ids], device=device)
        sync(device)
        t = time.perf_counter()
        out = hf(input_ids=x, use_cache=True, logits_to_keep=1)
        sync(device)
        took = time.perf_counter() - t
        del out
    return took


def section_mfu(args, shape, device, dtype, res, save) -> None:
    lengths = [int(x) for x in args.lengths.split(",")]
    model, hf, _ = random_qwen2(shape, device, dtype, max(lengths))
    res["peak_tflops"] = matmul_peak(device)
    save()
    chunk = args.chunk
    warm = list(range(3, 3 + min(4096, lengths[0])))
    rh_prefill(model, hf, shape, warm, device, dtype, chunk)
    hf_prefill(model, hf, warm, device)
    rows = res.setdefault("rows", [])
    for n in lengths:
        ids = [(7 * i) % (shape[6] - 3) + 3 for i in range(n)]
        flops = prefill_flops(shape, n)
        row = {"tokens": n, "tflop": flops / 1e12}
        s = rh_prefill(model, hf, shape, ids, device, dtype, chunk)
        row.update(rhlens_s=s, rhlens_mfu=flops / s / 1e12 / res["peak_tflops"])
        rows.append(row)
        save()
        if n <= args.hf_max:
            try:
                if device == "cuda":
                    torch.cuda.empty_cache()
                s = hf_prefill(model, hf, ids, device)
                row.update(hf_s=s, hf_mfu=flops / s / 1e12 / res["peak_tflops"])
            except torch.OutOfMemoryError as exc:
                row["hf"] = f"out of memory: {str(exc)[:120]}"
            if device == "cuda":
                torch.cuda.empty_cache()
        save()
        print(json.dumps(row), flush=True)


def section_probe(args, shape, device, dtype, res, save) -> None:
    import rhlens.engine.native as native
    from rhlens.errors import ProbeError
    from rhlens.probes import Probe
    from rhlens.retrieval import DetectConfig, detect_retrieval_heads

    n = args.length
    model, hf, tok = random_qwen2(shape, device, dtype, 2 * n + 64)
    weights = sum(p.numel() * p.element_size() for p in hf.parameters())
    needle = [11 + i for i in range(8)]
    body = [(7 * i) % (shape[6] - 30) + 30 for i in range(n - 8 - 16 - 1)]
    at = len(body) // 2
    ids = [1, *body[:at], *needle, *body[at:], *[20 + i for i in range(16)]]
    probe = Probe(prompt_ids=ids, needle_span=(1 + at, 1 + at + 8), real_needle=tok.decode(needle),
                  length=n, depth=50.0, needle_id="random")
    res.update(tokens=len(ids), weights_gib=weights / GIB, peak_tflops=matmul_peak(device))
    marks = {}
    real = native._prefill_chunks

    def timed(hf_, x, cache, step, swap, on_chunk=None):
        sync(device)
        marks["prefill_start"] = time.perf_counter()
        done = [0]

        def tick(tokens):
            done[0] += tokens
            if done[0] % (8 * step) < step or done[0] == x.shape[1]:
                print(f"prefill {done[0]:,}/{x.shape[1]:,} tokens, "
                      f"{time.perf_counter() - marks['prefill_start']:.0f} s", flush=True)
            if on_chunk is not None:
                on_chunk(tokens)

        real(hf_, x, cache, step, swap, tick)
        sync(device)
        marks["prefill_end"] = time.perf_counter()
        marks["chunk"] = step

    native._prefill_chunks = timed
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    cfg = DetectConfig(max_new_tokens=args.new_tokens, stop_at_newline=False, prefill_chunk=args.chunk,
                       policy=args.policy)
    t0 = time.perf_counter()
    scores = detect_retrieval_heads(model, [probe], config=cfg, tokenizer=tok, progress=True)
    sync(device)
    t1 = time.perf_counter()
    native._prefill_chunks = real
    hidden, inter, layers, heads, kv, hd, _, _ = shape
    capacity = len(ids) - 1 + args.new_tokens
    kv_bytes = 2 * layers * kv * hd * capacity * 2
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else 0
    prefill_s = marks["prefill_end"] - marks["prefill_start"]
    decode_rest = t1 - marks["prefill_end"]
    res.update(total_s=t1 - t0, prefill_s=prefill_s, before_prefill_s=marks["prefill_start"] - t0,
               after_prefill_s=decode_rest, prefill_chunk=marks["chunk"],
               prefill_tflops=prefill_flops(shape, len(ids) - 1) / prefill_s / 1e12,
               prefill_mfu=prefill_flops(shape, len(ids) - 1) / prefill_s / 1e12 / res["peak_tflops"],
               kv_gib=kv_bytes / GIB, peak_gib=peak / GIB,
               peak_over_weights_plus_kv=peak / (weights + kv_bytes) if peak else None,
               copy_steps=scores.probes[0].get("copy_steps") if scores.probes else None,
               per_probe_top=[(int(h[0]), int(h[1]), float(h[2])) for h in
                              _top(scores.per_probe[0], 5)],
               response=scores.probes[0].get("response") if scores.probes else None)
    save()
    print(json.dumps({k: v for k, v in res.items() if k != "machine"}), flush=True)
    if device == "cuda" and args.refusal:
        long = [1] * (2 * n)
        t = time.perf_counter()
        try:
            detect_retrieval_heads(model, [Probe(prompt_ids=long, needle_span=(10, 18), real_needle="x",
                                                 length=2 * n, depth=0.0, needle_id="random")],
                                   config=cfg, tokenizer=tok, progress=False)
            res["refusal"] = "not refused"
        except ProbeError as exc:
            res["refusal"] = str(exc)
        res["refusal_s"] = time.perf_counter() - t
        save()
        print("refusal:", res["refusal"], f"({res['refusal_s']:.2f} s)", flush=True)


def _top(per_head: torch.Tensor, k: int):
    flat = per_head.flatten()
    idx = flat.argsort(descending=True)[:k]
    return [(int(i) // per_head.shape[1], int(i) % per_head.shape[1], float(flat[i])) for i in idx]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--section", choices=("mfu", "probe"), required=True)
    ap.add_argument("--lengths", default="32768,131072,524288,1048576")
    ap.add_argument("--hf-max", type=int, default=131072, help="HF's one-pass prefill up to this length")
    ap.add_argument("--length", type=int, default=1048576)
    ap.add_argument("--new-tokens", type=int, default=8)
    ap.add_argument("--chunk", type=int, default=None, help="prefill chunk (default: the engine's)")
    ap.add_argument("--policy", default=None, help="KernelPolicy decode path: captured, lean, bridge")
    ap.add_argument("--refusal", action="store_true", help="also show a probe twice as long refused")
    ap.add_argument("--tiny", action="store_true", help="tiny shapes on the CPU (a check of the script)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.policy:
        from rhlens.engine import KernelPolicy

        args.policy = KernelPolicy(decode=args.policy)
    device = "cpu" if args.tiny or not torch.cuda.is_available() else "cuda"
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    shape = TINY if args.tiny else QWEN25_7B_1M
    res = {"machine": machine(), "args": {k: str(v) for k, v in vars(args).items()}, "shape": shape}
    if device == "cuda":
        res["gpu"] = torch.cuda.get_device_name()

    def save() -> None:
        if args.out:
            Path(args.out).write_text(json.dumps(res, indent=1))

    (section_mfu if args.section == "mfu" else section_probe)(args, shape, device, dtype, res, save)
    save()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
