"""Decode speed per model family on one GPU (issue 25): random-weight bf16 models of real shapes.

For each family (``--families``), in one process, one JSON file (``--out``, rewritten after
every family and every length, and read back on a rerun: what is there is not measured again):

* the decode step ``rhlens`` takes for it (``Generation.info["decode"]``: captured / lean /
  bridge) and the resolved kernel policy;
* ``step_ms`` at each of ``--lengths`` prompt tokens: one decode step, as (time of a decode of
  ``--new-tokens`` + ``--step-tokens`` tokens - time of one of ``--new-tokens``) /
  ``--step-tokens`` (the same prefill in both), the retrieval recorder on; beside it the
  memory-bandwidth floor: the bytes a step must read (every weight once, an MoE's experts
  only the ones routed to: ``top_k / n_experts`` of them; every layer's K and V up to its
  sliding window) over the device-to-device copy bandwidth measured in this run;
* ``probe``: one probe end to end (``detect_retrieval_heads``, recorder on, ``--new-tokens``
  tokens) against HF ``generate`` of the same prompt (SDPA; eager where SDPA cannot serve the
  family, e.g. Gemma-2's softcaps; an out-of-memory is recorded, not fatal), timed in
  rotation, median of ``--repeats``; and whether the tokens agree.

Models are built on the GPU from their config (``torch.device("cuda")`` + ``from_config``, no
download). ``--tiny`` uses 2-layer shapes of every family instead (a CPU check of the script)::

    python benchmarks/bench_families.py --out families.json                 # every family, 8K and 32K
    python benchmarks/bench_families.py --families qwen3-8b --lengths 8192 --out q.json
    python benchmarks/bench_families.py --tiny --lengths 256 --out /tmp/f.json   # CPU, seconds
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_detect import _NoEos, detect, machine, random_probes, word_tokenizer
from bench_speed import copy_bandwidth, rotation, seconds

# name: (config class, arguments). Real shapes of the public checkpoints' configs.
SHAPES = {
    "qwen3-8b": ("Qwen3Config", dict(
        hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
        num_key_value_heads=8, head_dim=128, vocab_size=151936, rope_theta=1e6, rms_norm_eps=1e-6)),
    "gemma2-9b": ("Gemma2Config", dict(
        hidden_size=3584, intermediate_size=14336, num_hidden_layers=42, num_attention_heads=16,
        num_key_value_heads=8, head_dim=256, vocab_size=256000, query_pre_attn_scalar=256,
        sliding_window=4096, attn_logit_softcapping=50.0, final_logit_softcapping=30.0)),
    "gemma3-12b": ("Gemma3TextConfig", dict(
        hidden_size=3840, intermediate_size=15360, num_hidden_layers=48, num_attention_heads=16,
        num_key_value_heads=8, head_dim=256, vocab_size=262208, query_pre_attn_scalar=256,
        sliding_window=1024, rope_theta=1e6, rope_local_base_freq=10000.0)),
    "phi3-mini": ("Phi3Config", dict(
        hidden_size=3072, intermediate_size=8192, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=32, vocab_size=32064, pad_token_id=0)),
    "olmo2-7b": ("Olmo2Config", dict(
        hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=32, vocab_size=100352, rope_theta=500000.0)),
    "qwen3-30b-a3b": ("Qwen3MoeConfig", dict(
        hidden_size=2048, intermediate_size=6144, num_hidden_layers=48, num_attention_heads=32,
        num_key_value_heads=4, head_dim=128, vocab_size=151936, num_experts=128, num_experts_per_tok=8,
        moe_intermediate_size=768, decoder_sparse_step=1, norm_topk_prob=True, rope_theta=1e6)),
}
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, vocab_size=1000, moe_intermediate_size=32, num_experts=4,
            num_experts_per_tok=2, sliding_window=64, query_pre_attn_scalar=16)

T0 = time.perf_counter()


def log(*args) -> None:
    print(f"[{time.perf_counter() - T0:6.1f}s]", *args, flush=True)


def make_config(name: str, tiny: bool, max_len: int):
    import transformers

    cls, kwargs = SHAPES[name]
    kwargs = dict(kwargs)
    if tiny:
        kwargs.update({k: v for k, v in TINY.items() if k in kwargs})
    if name == "phi3-mini" and tiny:
        kwargs["num_key_value_heads"] = kwargs["num_attention_heads"]
    cfg = getattr(transformers, cls)(**kwargs, max_position_embeddings=max(4096, max_len + 256),
                                     tie_word_embeddings=name.startswith("gemma"), bos_token_id=1,
                                     eos_token_id=2)
    return cfg


def build(name: str, tiny: bool, dtype: torch.dtype, device: str, max_len: int):
    """``(bridge, tokenizer)`` of a random-weight model of ``name`` built on ``device``."""
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import AutoModelForCausalLM

    cfg = make_config(name, tiny, max_len)
    torch.manual_seed(0)
    with torch.device(device):
        hf = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    hf.config.architectures = [type(hf).__name__]
    tok = word_tokenizer(cfg.vocab_size)
    bridge = TransformerBridge.boot_transformers(f"random-{name}", hf_model=hf.eval(), tokenizer=tok)
    bridge.eval()
    bridge.rhlens_name = f"random-{name}"
    return bridge, tok


def step_bytes(model, keys: int) -> dict:
    """Bytes one decode step of one prompt must read: every weight once (the embedding: one
    row; routed experts: ``top_k / n_experts`` of them), and each layer's K and V over the keys
    it attends to (a sliding-window layer: its window)."""
    from rhlens.engine import hf_model

    hf = hf_model(model)
    cfg = hf.config.get_text_config()
    embed = hf.get_input_embeddings().weight
    n_exp = getattr(cfg, "num_experts", None) or getattr(cfg, "num_local_experts", None)
    top = getattr(cfg, "num_experts_per_tok", None)
    weights = 0
    seen = set()
    for name, p in hf.named_parameters():
        if p.data_ptr() in seen:  # tied embeddings are read once
            continue
        seen.add(p.data_ptr())
        b = p.numel() * p.element_size()
        if n_exp and top and ".experts" in name:
            b = b * top / n_exp
        weights += b
    weights += (embed.shape[1] - embed.numel()) * embed.element_size()
    n_kv = cfg.num_key_value_heads
    d = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    types = getattr(cfg, "layer_types", None) or ["full_attention"] * cfg.num_hidden_layers
    window = getattr(cfg, "sliding_window", None)
    kv = 0
    for kind in types:
        seen_keys = min(keys, window) if kind == "sliding_attention" and window else keys
        kv += 2 * n_kv * d * seen_keys * embed.element_size()
    return {"weights": int(weights), "kv": int(kv), "total": int(weights + kv)}


def hf_impl(model) -> str:
    """HF's attention for ``generate``: SDPA, or eager where SDPA cannot serve the family."""
    from rhlens.engine import hf_model

    cfg = hf_model(model).config.get_text_config()
    return "eager" if getattr(cfg, "attn_logit_softcapping", None) else "sdpa"


def hf_generate(model, probe, n_new: int, impl: str) -> list[int]:
    from rhlens.engine import native_modules

    with native_modules(model, impl) as hf:
        device = next(hf.parameters()).device
        x = torch.tensor([probe.prompt_ids], device=device)
        out = hf.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=n_new,
                          min_new_tokens=n_new, do_sample=False, pad_token_id=0)
    return out[0, x.shape[1]:].tolist()


def decode_info(model, tok, probe, n_new: int) -> tuple[str, dict]:
    from rhlens.engine import GenerationConfig, StepState, generate
    from rhlens.retrieval import TopKeyRecorder

    state = StepState()
    device = next(model.parameters()).device
    rec = TopKeyRecorder(model.cfg.n_layers, model.cfg.n_heads, n_new, state, device)
    config = GenerationConfig(max_new_tokens=n_new, stop_at_eos=False, stop_at_newline=False)
    gen = generate(model, tok, probe.prompt_ids, config=config, hooks=rec.hooks(), state=state)
    return gen.info["decode"], config.describe(model)["kernel_policy"]


def measure_length(model, tok, name: str, n: int, args, bw: float | None, row: dict, save) -> None:
    from rhlens.engine import hf_model

    vocab = hf_model(model).config.get_text_config().vocab_size
    probe = random_probes(tok, vocab, [n], [50])[0]
    tok_n = _NoEos(tok)
    short, long_ = args.new_tokens, args.new_tokens + args.step_tokens
    detect(model, tok_n, [probe], short)  # warm-up (on a GPU the captured step compiles here)
    detect(model, tok_n, [probe], long_)
    t_short = statistics.median(seconds(lambda: detect(model, tok_n, [probe], short))
                                for _ in range(args.repeats))
    t_long = statistics.median(seconds(lambda: detect(model, tok_n, [probe], long_))
                               for _ in range(args.repeats))
    row["step_ms"] = (t_long - t_short) / args.step_tokens * 1e3
    row["bytes"] = step_bytes(model, n)
    if bw:
        row["floor_ms"] = row["bytes"]["total"] / bw * 1e3
        row["step_over_floor"] = row["step_ms"] / row["floor_ms"]
    save()
    impl = hf_impl(model)
    row["hf_attention"] = impl
    fns = {"hf": lambda: hf_generate(model, probe, short, impl),
           "rhlens": lambda: detect(model, tok_n, [probe], short)}
    try:
        got = rotation(fns, args.repeats)
    except torch.OutOfMemoryError as exc:
        row["probe"] = {"hf": f"out of memory ({impl} attention): {str(exc)[:120]}"}
        torch.cuda.empty_cache()
        row["rhlens_probe_s"] = t_short
        return
    row["probe"] = {k: {"s": v["s"], "all": v["all"]} for k, v in got.items()}
    row["probe_over_hf"] = got["rhlens"]["s"] / got["hf"]["s"]
    ours = list(got["rhlens"]["last"].probes[0]["response_ids"])
    row["same_tokens_as_hf"] = ours == list(got["hf"]["last"])
    row["first_difference"] = next((i for i, (a, b) in enumerate(zip(ours, got["hf"]["last"])) if a != b),
                                   None)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--families", default=",".join(SHAPES), help=f"comma-separated, of {', '.join(SHAPES)}")
    ap.add_argument("--lengths", default="8192,32768", help="prompt tokens, comma-separated")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--step-tokens", type=int, default=32, help="extra tokens whose time gives the step")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tiny", action="store_true", help="2-layer shapes (a CPU check of the script)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    families = [f for f in args.families.split(",") if f]
    unknown = [f for f in families if f not in SHAPES]
    if unknown:
        ap.error(f"unknown families {unknown}; known: {', '.join(SHAPES)}")
    lengths = [int(x) for x in args.lengths.split(",") if x]
    dtype = getattr(torch, args.dtype)
    out = Path(args.out)
    res = json.loads(out.read_text()) if out.exists() else {}
    res.setdefault("families", {})
    res["machine"] = machine()
    if args.device == "cuda":
        res["machine"]["gpu"] = torch.cuda.get_device_name()
    try:
        import subprocess

        res["commit"] = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                       cwd=Path(__file__).resolve().parents[1]).stdout.strip() or None
    except OSError:
        res["commit"] = None
    res["settings"] = {k: getattr(args, k) for k in ("new_tokens", "step_tokens", "repeats", "dtype", "tiny")}

    def save() -> None:
        out.write_text(json.dumps(res, indent=1, default=str))

    bw = copy_bandwidth(args.device)
    res["copy_bandwidth_GBps"] = bw / 1e9 if bw else None
    save()
    for name in families:
        fam = res["families"].setdefault(name, {})
        todo = [n for n in lengths
                if "step_ms" not in fam.get(str(n), {}) or "probe" not in fam.get(str(n), {})]
        if not todo:
            log(name, "done already")
            continue
        log(name, "building")
        try:
            t = time.perf_counter()
            model, tok = build(name, args.tiny, dtype, args.device, max(lengths))
            fam["build_s"] = time.perf_counter() - t
            path, policy = decode_info(model, tok, random_probes(tok, 100, [64], [50])[0], 4)
            fam["decode"], fam["kernel_policy"] = path, policy
            log(name, "decode step:", path)
            save()
            for n in todo:
                row = fam.setdefault(str(n), {})
                try:
                    measure_length(model, tok, name, n, args, bw, row, save)
                except Exception as exc:
                    row["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
                    traceback.print_exc()
                    if isinstance(exc, torch.OutOfMemoryError):
                        torch.cuda.empty_cache()
                log(name, n, json.dumps({k: v for k, v in row.items() if k not in ("probe", "bytes")}))
                save()
        except Exception as exc:
            fam["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
            traceback.print_exc()
        finally:
            save()
            model = tok = None
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    print_table(res)
    return 0


def print_table(res: dict) -> None:
    print("| family | decode | length | step ms | floor ms | x floor | probe s | HF s | x HF | same tokens |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---|")
    for name, fam in res["families"].items():
        for n, row in fam.items():
            if not n.isdigit():
                continue
            probe = row.get("probe", {})
            ours = probe.get("rhlens", {}).get("s") if isinstance(probe.get("rhlens"), dict) else None
            hf = probe.get("hf", {}).get("s") if isinstance(probe.get("hf"), dict) else probe.get("hf")

            def f(x, p=2):
                return f"{x:.{p}f}" if isinstance(x, (int, float)) else (str(x)[:30] if x else "-")
            print(f"| {name} | {fam.get('decode', '-')} | {n} | {f(row.get('step_ms'))} | "
                  f"{f(row.get('floor_ms'))} | {f(row.get('step_over_floor'))} | {f(ours, 3)} | {f(hf, 3)} | "
                  f"{f(row.get('probe_over_hf'))} | {row.get('same_tokens_as_hf', '-')} |")


if __name__ == "__main__":
    sys.exit(main())
