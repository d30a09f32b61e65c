"""HF ``generate`` at its fastest (issue #15, target 3): a static KV cache and the compiled decode forward.

transformers compiles the decode step of ``generate`` on its own when the cache is static
(``cache_implementation="static"``; the prompt's prefill runs uncompiled). This script times,
on a randomly initialised Llama of ``--shape`` (bf16, as ``bench_detect.py`` makes it), one
probe of random token ids per ``--lengths`` with ``--new-tokens`` new tokens (greedy, no EOS):
the first call (the compile, for that cache length) and the median of ``--repeats`` calls
after it; the decode step as (t(new tokens) - t(2 tokens)) / (new tokens - 2). Its compile
takes minutes: run it on a second GPU while ``bench_speed.py`` runs on the first, e.g.

    CUDA_VISIBLE_DEVICES=1 python benchmarks/hf_static.py --lengths 8192 --out hf_static.json &
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_detect import SHAPES, machine, random_hf


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


@torch.no_grad()
def run(hf, ids: torch.Tensor, n_new: int, cache=None) -> tuple[float, list[int]]:
    """One greedy generate; ``cache``: a StaticCache (reset first), else HF's DynamicCache."""
    kw = {}
    if cache is not None:
        cache.reset()
        kw["past_key_values"] = cache
    _sync()
    t = time.perf_counter()
    out = hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n_new,
                      min_new_tokens=n_new, do_sample=False, pad_token_id=0, **kw)
    _sync()
    return time.perf_counter() - t, out[0, ids.shape[1]:].tolist()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="llama3-8b")
    ap.add_argument("--lengths", default="8192")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default="hf_static.json")
    args = ap.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    lengths = [int(x) for x in args.lengths.split(",")]
    hf = random_hf(args.shape, dtype, device, max(lengths) + args.new_tokens + 8)
    res = {"machine": machine(), "args": vars(args), "rows": []}
    g = torch.Generator().manual_seed(0)
    for n in lengths:
        ids = torch.randint(3, hf.config.vocab_size, (1, n), generator=g).to(device)
        # One static cache for every call at this length (its tensors are the compiled graph's);
        # what cache_implementation="static" makes, sized for the longest call.
        from transformers import StaticCache

        cache = StaticCache(config=hf.config, max_cache_len=n + args.new_tokens)
        first, _ = run(hf, ids, args.new_tokens, cache)  # compiles the decode step
        row = {"length": n, "first_call_s": first}
        for name, c in (("static", cache), ("dynamic", None)):
            times = [run(hf, ids, args.new_tokens, c)[0] for _ in range(args.repeats)]
            short = [run(hf, ids, 2, c)[0] for _ in range(args.repeats)]
            row[f"{name}_s"] = statistics.median(times)
            row[f"{name}_all"] = times
            row[f"{name}_step_ms"] = ((statistics.median(times) - statistics.median(short))
                                      / (args.new_tokens - 2) * 1e3)
        row["same_tokens"] = run(hf, ids, args.new_tokens, cache)[1] == run(hf, ids, args.new_tokens)[1]
        del cache
        res["rows"].append(row)
        print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()
                          if not k.endswith("_all")}), flush=True)
        Path(args.out).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
