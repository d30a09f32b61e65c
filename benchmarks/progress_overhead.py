"""What the progress bar costs the captured decode step: one prompt answered with the bar's
per-step callback (``StepState.on_step`` -> ``Records.advance``, a tqdm bar) and without, in ONE
process, alternating, median of repeats; and how many times the callback ran (one per step).

    python benchmarks/progress_overhead.py --device cuda --length 4096 --steps 64 --out progress.json
    python benchmarks/progress_overhead.py --device cpu --length 200 --steps 8 --repeats 2   # a check

The ratio ``with / without`` is the bar's cost (the callback runs on the host between graph
replays and adds no synchronisation; a ratio near 1 says so).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--length", type=int, default=4096, help="prompt tokens (default 4096)")
    parser.add_argument("--steps", type=int, default=64, help="decode steps (default 64)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs of each (default 5)")
    parser.add_argument("--decode", default="captured", help="KernelPolicy.decode (default captured)")
    parser.add_argument("--out", default=None, help="a JSON file for the numbers")
    args = parser.parse_args(argv)

    import torch

    from rhlens.engine import GenerationConfig, KernelPolicy, StepState, generate
    from rhlens.models import load_model
    from rhlens.store.logs import Records

    model, tok = load_model(device=args.device)
    ids = torch.randint(1000, 20000, (args.length,), generator=torch.Generator().manual_seed(0)).tolist()
    config = GenerationConfig(max_new_tokens=args.steps, stop_at_eos=False, stop_at_newline=False,
                              policy=KernelPolicy(decode=args.decode))

    def sync() -> None:
        if torch.cuda.is_available() and str(args.device).startswith("cuda"):
            torch.cuda.synchronize()

    def run(bar: bool) -> tuple[float, int, str]:
        state = StepState()
        records = (Records(None, progress=True, total=1, desc="bench", weights={"p": args.length})
                   if bar else None)
        calls = []
        if bar:
            def tick() -> None:
                calls.append(1)
                records.advance(args.length / args.steps)
            state.on_step = tick
        sync()
        t0 = time.perf_counter()
        gen = generate(model, tok, ids, config=config, state=state)
        sync()
        seconds = time.perf_counter() - t0
        if records is not None:
            records.close()
        return seconds, len(calls), gen.info.get("decode", "?")

    run(False)
    run(True)  # warm-up: the step's capture (and compile) happen here
    times: dict[str, list[float]] = {"without": [], "with": []}
    calls, path = 0, "?"
    for _ in range(args.repeats):
        times["without"].append(run(False)[0])
        seconds, calls, path = run(True)
        times["with"].append(seconds)
    median = {k: statistics.median(v) for k, v in times.items()}
    result = {"device": str(args.device), "decode": path, "length": args.length, "steps": args.steps,
              "median_s": median, "ratio_with_over_without": median["with"] / median["without"],
              "callbacks_per_run": calls, "repeats": args.repeats,
              "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}
    print(json.dumps(result, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    return 0 if calls == args.steps else 1


if __name__ == "__main__":
    raise SystemExit(main())
