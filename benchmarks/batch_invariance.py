"""Which decode-step products give a row the same bits whatever else is in the batch?

Batched decoding (issue #8, target 2) must give every probe exactly what it gets alone. BLAS
libraries choose a kernel, and with it the order of a reduction, from the shapes of a product,
so a row of an ``[M, K] @ [K, N]`` product can round differently for M = 1 and M = 10. This
script measures, on the current device and dtype, for the shapes of one decode step of a
model shape (``--shape``), whether each product is *batch-invariant*:

* ``linear M=1 vs M=b``: the row alone against the same row in a batch of ``b`` rows;
* ``linear padded``: the row alone padded to ``--pad`` rows (zeros) against the same row at
  position ``r`` of a full batch of ``--pad`` rows (the engine's fixed-shape mode);
* ``scores bmm`` / ``pattern @ V bmm``: the attention products of one row alone against the
  same row in a batched ``matmul`` (batch dimension = rows), for a few key counts.

    python benchmarks/batch_invariance.py --shape llama3-8b --dtype bf16 --rows 10 --pad 16
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

import torch
from gpu_timing import mean_seconds

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHAPES = {  # hidden, intermediate, heads, kv heads, vocab
    "llama3-8b": (4096, 14336, 32, 8, 128256),
    "llama2-7b": (4096, 11008, 32, 32, 32000),
    "smollm2-135m": (576, 1536, 9, 3, 49152),
}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return bool(torch.equal(a, b))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="llama3-8b")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--rows", type=int, default=10)
    ap.add_argument("--pad", type=int, default=16)
    ap.add_argument("--keys", default="1024,1041,8192,8219,16411,32768,32799")
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--random-keys", type=int, default=0, help="also this many random key counts")
    args = ap.parse_args()
    d, ff, h, kv, vocab = SHAPES[args.shape]
    dt, dev = DTYPES[args.dtype], torch.device(args.device)
    g, hd = h // kv, d // h
    gen = torch.Generator(device="cpu").manual_seed(0)

    def rand(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * 0.02).to(dev, dt)

    results: dict[str, dict[str, int]] = {}
    timings: dict[str, float] = {}

    def blocked_av(w: torch.Tensor, v: torch.Tensor, c: int = 1024) -> torch.Tensor:
        """The engine's ``split`` pattern @ V: blocks of ``c`` keys, partial sums in float32."""
        from rhlens.engine.attention import split_av

        return split_av(w, v, c)

    def count(name: str, ok: bool) -> None:
        r = results.setdefault(name, {"identical": 0, "of": 0})
        r["identical"] += int(ok)
        r["of"] += 1
        if name.endswith(" keys"):  # and a total per product over every key count
            t = results.setdefault(name.split(",")[0] + ", every key count", {"identical": 0, "of": 0})
            t["identical"] += int(ok)
            t["of"] += 1

    F = torch.nn.functional
    b, pad = args.rows, args.pad
    for n_out, n_in in ((d, d), (kv * hd, d), (ff, d), (d, ff), (vocab, d)):
        w = rand(n_out, n_in)
        for _ in range(args.trials):
            x = rand(b, n_in)
            for r in (0, b // 2, b - 1):
                alone = F.linear(x[r:r + 1], w)
                count(f"linear M=1 vs M={b}", same(alone[0], F.linear(x, w)[r]))
                solo = torch.zeros(pad, n_in, device=dev, dtype=dt)
                solo[0] = x[r]
                full = torch.cat([x, rand(pad - b, n_in)])
                count(f"linear padded to {pad}: row 0 alone vs row r of a full batch",
                      same(F.linear(solo, w)[0], F.linear(full, w)[r]))
    keys = [int(k) for k in args.keys.split(",")]
    keys += sorted(random.Random(0).sample(range(1000, 33000), args.random_keys))
    for n in keys:
        for _ in range(args.trials):
            # K/V as the engine holds them: views of longer buffers (capacity n + 32)
            q = rand(b, kv, g, hd)
            k, v = rand(b, kv, n + 32, hd)[:, :, :n], rand(b, kv, n + 32, hd)[:, :, :n]
            scores = torch.matmul(q, k.transpose(-2, -1))
            w = torch.softmax(scores.float(), -1).to(dt)
            out = torch.matmul(w, v)
            for r in (0, b // 2, b - 1):
                count(f"scores bmm, {n} keys", same(torch.matmul(q[r:r + 1], k[r:r + 1].transpose(-2, -1))[0],
                                                    scores[r]))
                count(f"softmax, {n} keys", same(torch.softmax(scores[r:r + 1].float(), -1).to(dt)[0], w[r]))
                count(f"pattern @ V bmm, {n} keys", same(torch.matmul(w[r:r + 1], v[r:r + 1])[0], out[r]))
                count(f"pattern @ V in key blocks, {n} keys",
                      same(blocked_av(w[r:r + 1], v[r:r + 1])[0], blocked_av(w, v)[r]))
    if dev.type == "cuda":  # what a product of `pad` rows costs against one row
        for n_out, n_in in ((d, d), (ff, d), (d, ff), (vocab, d)):
            w = rand(n_out, n_in)
            for m in (1, 8, pad):
                x = rand(m, n_in)
                us = 1e6 * mean_seconds(lambda x=x, w=w: F.linear(x, w))
                timings[f"linear {n_out}x{n_in}, M={m} (us)"] = round(us, 1)
    info = {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
            "torch": torch.__version__, "shape": args.shape, "dtype": args.dtype,
            "rows": b, "pad": pad, "results": results, "timings": timings}
    width = max(len(k) for k in results)
    for name, r in results.items():
        print(f"{name:<{width}}  {r['identical']}/{r['of']}")
    for name, t in timings.items():
        print(f"{name:<{width}}  {t}")
    print(json.dumps(info))


if __name__ == "__main__":
    main()
