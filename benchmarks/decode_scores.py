"""The decode step's attention scores under GQA: which product shape cuBLAS runs fast.

One query per head at a decode step: under grouped-query attention the engine folds a KV
group's queries into one product, ``[kv, g, d] @ [kv, d, keys]`` (g = 4 for Llama-3-8B). That
is a tiny-M product over a huge N, and cuBLAS may pick a slow kernel for it at long contexts.
The same dot products as ``[kv, keys, d] @ [kv, d, g]`` (keys @ queries, transposed back) are a
tall-skinny product. This script times both, per layer, with K a view of a longer KV buffer as
the engine holds it, and says whether they give the same bits.

    python benchmarks/decode_scores.py --keys 8192,32768
"""

from __future__ import annotations

import argparse
import json

import torch
from gpu_timing import mean_seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--keys", default="8192,32768")
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--group", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=128)
    args = ap.parse_args()
    dev, dt = torch.device("cuda"), torch.bfloat16
    kv, g, d = args.kv_heads, args.group, args.head_dim
    out = {"device": torch.cuda.get_device_name(dev), "torch": torch.__version__}
    for n in (int(k) for k in args.keys.split(",")):
        q = torch.randn(1, kv, g, d, device=dev, dtype=dt)
        k = torch.randn(1, kv, n + 32, d, device=dev, dtype=dt)[:, :, :n]

        def q_k(q=q, k=k):
            return torch.matmul(q, k.transpose(-2, -1))

        def k_q(q=q, k=k):
            return torch.matmul(k, q.transpose(-2, -1)).transpose(-2, -1)

        def k_q_contiguous(k_q=k_q):
            return k_q().contiguous()

        out[n] = {"q@K^T us": 1e6 * mean_seconds(q_k), "K@q^T us": 1e6 * mean_seconds(k_q),
                  "K@q^T then contiguous us": 1e6 * mean_seconds(k_q_contiguous),
                  "identical": bool(torch.equal(q_k(), k_q())),
                  "max_abs_diff": float((q_k().float() - k_q().float()).abs().max())}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
