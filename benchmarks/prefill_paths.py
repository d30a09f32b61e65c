"""The engine's prefill through the plain HF modules against the bridge's wrapped modules.

With no hook that acts during the prefill attached, ``rhlens.engine.prefill`` swaps every
bridge component for the HF module it wraps; with one (here a no-op user hook on
``blocks.0.hook_resid_pre``) it runs through the bridge. Both are timed in alternation on
one probe of the default model, and their KV caches compared.

    python benchmarks/prefill_paths.py --length 2000 --repeats 4
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rhlens import engine
from rhlens.models import load_model
from rhlens.probes import ProbeConfig, build_probes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--length", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = load_model(None)
    hf = engine.hf_model(model)
    probe = build_probes(tok, config=ProbeConfig(lengths=(args.length,), depths=(50.0,))).probes[0]
    ids = probe.prompt_ids[:-1]
    user = ("blocks.0.hook_resid_pre", lambda x, hook=None: None)
    times: dict[str, list[float]] = {"plain": [], "bridge": []}
    caches = {}
    for _ in range(args.repeats + 1):  # the first round warms up
        for mode in times:
            cache = engine._new_cache(hf)
            t = time.perf_counter()
            if mode == "plain":
                engine.prefill(model, ids, cache)
            else:
                with model.hooks(fwd_hooks=[user]):
                    engine.prefill(model, ids, cache)
            times[mode].append(time.perf_counter() - t)
            caches[mode] = cache
    same = all(torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
               for a, b in zip(caches["plain"].layers, caches["bridge"].layers))
    print(json.dumps({"tokens": len(ids), "threads": args.threads,
                      **{f"{k}_median_s": round(statistics.median(v[1:]), 3) for k, v in times.items()},
                      "all_s": times, "kv_identical": same}))


if __name__ == "__main__":
    main()
