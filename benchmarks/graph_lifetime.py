"""Issue 26's crash: a captured decode graph replayed on memory it no longer owns.

cuBLAS keeps one workspace per (handle, stream), allocated through PyTorch's caching allocator
on first use; ``torch._C._cuda_clearCublasWorkspaces()`` frees them, and torch.compile's CUDA
graphs (HF ``generate`` with a static cache compiles its decode step that way) call it around
every recording. A graph captured on a workspace allocated outside its own pool keeps writing
to that address on every replay after the free. Three checks, each on a randomly initialised
Llama of ``--shape`` (bf16) run through ``detect_retrieval_heads`` (captured, compiled step):

* ``soak``: decode (captures the graphs), clear the workspaces, allocate every free block of
  the allocator's cache as a tensor filled with a pattern, decode again (replays): the pattern
  must be intact and the results equal the first decode's.
* ``unmap``: decode, clear the workspaces and empty the allocator's cache (the freed memory
  goes back to the driver), decode again: must not crash and must equal the first decode.
* ``sequence``: the issue's sequence (rhlens at the short and long length, HF's static-cache
  compiled ``generate`` at the short length alternated with rhlens, then HF at the long length,
  then rhlens at the long length): every rhlens result equal to the first at its length.

``--unfixed`` turns rhlens' own clearing off (the code before the fix) to show each check
catches the fault. Run each check in its own process (a fault poisons the CUDA context):

    python benchmarks/graph_lifetime.py --check soak --out soak.json [--unfixed]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_detect import SHAPES, detect, machine, random_model, random_probes, same_results

PATTERN = 0x5A


def _clear() -> None:
    torch._C._cuda_clearCublasWorkspaces()


def _soak() -> list[torch.Tensor]:
    """One uint8 tensor per free block in the caching allocator's segments, filled with PATTERN."""
    taken = []
    for seg in torch.cuda.memory_snapshot():
        for block in seg["blocks"]:
            if block["state"] == "inactive" and block["size"] >= 512:
                taken.append(torch.full((block["size"],), PATTERN, dtype=torch.uint8, device="cuda"))
    return taken


def _intact(taken: list[torch.Tensor]) -> bool:
    return all(bool((t == PATTERN).all()) for t in taken)


@torch.no_grad()
def hf_static(model, probe, n_new: int) -> list[int]:
    """HF's generate with a static cache (transformers compiles its decode step)."""
    from rhlens.engine import native_modules

    with native_modules(model) as hf:
        x = torch.tensor([probe.prompt_ids], device="cuda")
        out = hf.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=n_new,
                          min_new_tokens=n_new, do_sample=False, pad_token_id=0,
                          cache_implementation="static")
    return out[0, x.shape[1]:].tolist()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", choices=("soak", "unmap", "sequence"), required=True)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="llama3-8b")
    ap.add_argument("--layers", type=int, default=None, help="only this many layers (default: all)")
    ap.add_argument("--lengths", default="8192,32768", help="short,long (default 8192,32768)")
    ap.add_argument("--new-tokens", type=int, default=34)
    ap.add_argument("--unfixed", action="store_true", help="rhlens' own workspace clearing off")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    short, long = (int(x) for x in args.lengths.split(","))
    if args.unfixed:
        import rhlens.engine.captured as captured

        captured._clear_cublas_workspaces = lambda: None
    res = {"machine": machine(), "args": vars(args), "ok": False}

    def save() -> None:
        if args.out:
            Path(args.out).write_text(json.dumps(res, indent=1))

    t0 = time.perf_counter()
    try:
        model, tok = random_model(args.shape, torch.bfloat16, "cuda", long + args.new_tokens + 8, args.layers)
        vocab = SHAPES[args.shape][5]
        probes = {n: random_probes(tok, vocab, [n], [50], seed=n)[0] for n in (short, long)}
        n = args.new_tokens
        if args.check in ("soak", "unmap"):
            first = detect(model, tok, [probes[short]], n)
            _clear()
            if args.check == "soak":
                taken = _soak()
                res["soaked_blocks"] = len(taken)
                res["soaked_mib"] = sum(t.numel() for t in taken) / 2**20
                again = detect(model, tok, [probes[short]], n)
                torch.cuda.synchronize()
                res["pattern_intact"] = _intact(taken)
            else:
                torch.cuda.empty_cache()
                again = detect(model, tok, [probes[short]], n)
                torch.cuda.synchronize()
            res["same_results"] = same_results(first, again)
            res["decode"] = again.info.get("decode") if hasattr(again, "info") else None
            res["ok"] = res["same_results"] and res.get("pattern_intact", True)
        else:
            steps, ref = [], {}

            def rh(length: int, new: int) -> None:
                got = detect(model, tok, [probes[length]], new)
                key = (length, new)
                same = None if key not in ref else same_results(ref[key], got)
                ref.setdefault(key, got)
                steps.append({"run": "rhlens", "length": length, "new": new, "same_as_first": same})
                res["steps"] = steps
                save()

            def hf(length: int) -> None:
                hf_static(model, probes[length], 2)
                steps.append({"run": "hf_static", "length": length})
                res["steps"] = steps
                save()

            for length in (short, long):
                for new in (2, n, 2, n):
                    rh(length, new)
            for _ in range(2):
                hf(short)
                rh(short, n)
            hf(long)
            rh(long, n)
            torch.cuda.synchronize()
            res["ok"] = all(s.get("same_as_first") is not False for s in steps)
    except Exception as exc:  # report the fault (an illegal memory access poisons the context)
        res["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
        res["traceback"] = traceback.format_exc()[-2000:]
    res["seconds"] = time.perf_counter() - t0
    save()
    shown = {k: v for k, v in res.items() if k not in ("traceback", "machine", "steps")}
    print(json.dumps(shown), flush=True)
    return 0 if res["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
