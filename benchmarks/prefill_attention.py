"""Attention of a prefill chunk that follows cached keys: which kernel, how fast, how exact.

A chunk of ``q`` new tokens after ``n - q`` cached ones needs a causal mask aligned to the
lower right (query ``i`` sees keys ``<= n - q + i``). PyTorch's ``scaled_dot_product_attention``
takes that as ``causal_lower_right``, which it never sends to the flash kernel; flash-attention
2 itself aligns a causal mask to the lower right whenever ``q != n``, so calling its op
directly gives the same mask on the fast kernel. This script times, for one layer of a model
shape on the current GPU, a chunk at the end of ``--keys`` keys:

* ``sdpa lower-right``: SDPA with ``causal_lower_right`` (K/V expanded per query head);
* ``flash op``: ``aten._scaled_dot_product_flash_attention`` with ``is_causal`` (expanded K/V);
* ``one shot``: flash over all ``--keys`` tokens at once (what a prefill without chunks does,
  divided by the number of chunks it replaces, for scale),

and reports the largest difference of each against a float32 dense-mask reference.

    python benchmarks/prefill_attention.py --keys 32768 --chunk 4096
"""

from __future__ import annotations

import argparse
import json

import torch
from gpu_timing import median_seconds


def main() -> None:
    from torch.nn.attention.bias import causal_lower_right

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--keys", type=int, default=32768)
    ap.add_argument("--chunk", type=int, default=4096)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    n, c, h, d = args.keys, args.chunk, args.heads, args.head_dim
    dev, dt = torch.device("cuda"), torch.bfloat16
    g = torch.Generator(device=dev).manual_seed(0)
    q = torch.randn(1, h, c, d, device=dev, dtype=dt, generator=g)
    k = torch.randn(1, h, n, d, device=dev, dtype=dt, generator=g)
    v = torch.randn(1, h, n, d, device=dev, dtype=dt, generator=g)
    scale = d ** -0.5
    sdpa = torch.nn.functional.scaled_dot_product_attention
    flash = torch.ops.aten._scaled_dot_product_flash_attention

    def lower_right():
        return sdpa(q, k, v, attn_mask=causal_lower_right(c, n), scale=scale)

    def flash_op():
        return flash(q, k, v, 0.0, True, False, scale=scale)[0]

    # float32 reference on the last 256 queries (a dense [256, n] mask is small)
    tail = 256
    qi = torch.arange(c - tail, c, device=dev)[:, None] + (n - c)
    mask = torch.arange(n, device=dev)[None, :] <= qi
    ref = sdpa(q[:, :, -tail:].float(), k.float(), v.float(), attn_mask=mask, scale=scale)
    res = {"device": torch.cuda.get_device_name(dev), "torch": torch.__version__, "keys": n,
           "chunk": c, "heads": h, "head_dim": d}
    for name, fn in (("sdpa_lower_right", lower_right), ("flash_op", flash_op)):
        out = fn()
        res[name] = {"ms": 1000 * median_seconds(fn, args.repeats),
                     "max_abs_err": float((out[:, :, -tail:].float() - ref).abs().max())}
    res["sdpa_vs_flash_identical"] = bool(torch.equal(lower_right(), flash_op()))
    qa = torch.randn(1, h, n, d, device=dev, dtype=dt, generator=g)
    res["one_shot_ms_per_chunk"] = 1000 * median_seconds(
        lambda: sdpa(qa, k, v, is_causal=True, scale=scale), args.repeats) / (n // c)
    print(json.dumps(res))


if __name__ == "__main__":
    main()
