"""Issue #15: where the decode-steps row of ``bench_speed.py`` runs out of memory (CUDA memory history).

Runs ``bench_speed._steps_at`` (lean, captured, masked decodes with the recorder on) at one
length on a random Llama-3-8B shape (bf16) with ``torch.cuda.memory._record_memory_history``
on, and writes ``h200-issue15-final-oom32k.json`` to ``$OUT`` (or ``.``): whether it ran out of
memory, the traceback, the peak, the largest allocations with their rhlens / benchmark frames,
and the events just before the failure. The committed JSON is this script's run against the
``bench_speed.py`` of merge 13bf3fd, before its decode helpers ran under ``torch.no_grad``;
with them, it should report ``"oom": false``.

    python benchmarks/step_memory.py 32768
"""

import argparse
import json
import os
import sys
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import bench_speed as bs

from rhlens.engine import KernelPolicy


def _frames(frames) -> list[str]:
    keep = [f"{Path(f['filename']).name}:{f['line']}:{f['name']}" for f in frames
            if any(s in f["filename"] for s in ("rhlens", "benchmarks", "transformers", "transformer_lens"))]
    return keep[:14]


def main() -> int:
    out = Path(os.environ.get("OUT", "."))
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 32768
    model, tok = bs.random_model("llama3-8b", torch.bfloat16, "cuda", n + 32 + 1100)
    heads = bs.random_heads(model.cfg.n_layers, model.cfg.n_heads, 20, seed=0)
    policy = KernelPolicy().resolve(torch.device("cuda"), model)
    args = argparse.Namespace(new_tokens=32, repeats=1, profile=False, step_lengths=[n])
    res = {"length": n, "allocated_gib_start": torch.cuda.memory_allocated() / 2**30,
           "policy": policy.to_dict()}
    torch.cuda.memory._record_memory_history(max_entries=100000)
    row: dict = {}
    try:
        bs._steps_at(model, tok, n, args, None, heads, policy, row)
        res["oom"] = False
    except torch.OutOfMemoryError as exc:
        res["oom"] = True
        res["error"] = str(exc)[:400]
        res["traceback"] = traceback.format_exc()[-6000:]
    res["row_before_failure"] = {k: v for k, v in row.items() if k != "bytes"}
    res["max_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
    snap = torch.cuda.memory._snapshot()
    torch.cuda.memory._record_memory_history(enabled=None)
    live = [{"gib": b["size"] / 2**30, "frames": _frames(b.get("frames", []))}
            for seg in snap["segments"] for b in seg["blocks"] if b["state"] == "active_allocated"]
    live.sort(key=lambda r: -r["gib"])
    res["live_blocks_total_gib"] = sum(r["gib"] for r in live)
    res["live_blocks_top"] = live[:12]
    trace = [e for dev in snap.get("device_traces", []) for e in dev]
    allocs = sorted((e for e in trace if e["action"] == "alloc"), key=lambda e: -e["size"])[:12]
    res["largest_allocs"] = [{"gib": e["size"] / 2**30, "frames": _frames(e.get("frames", []))}
                             for e in allocs]
    oom_at = [i for i, e in enumerate(trace) if e["action"] == "oom"]
    if oom_at:
        res["before_oom"] = [{"action": e["action"], "gib": e["size"] / 2**30,
                              "frames": _frames(e.get("frames", []))[:6]}
                             for e in trace[max(0, oom_at[0] - 8):oom_at[0] + 1]]
    (out / "h200-issue15-final-oom32k.json").write_text(json.dumps(res, indent=1, default=str))
    print(json.dumps({k: v for k, v in res.items() if k != "traceback"}, default=str)[:6000])
    print(res.get("traceback", "")[-3000:])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
