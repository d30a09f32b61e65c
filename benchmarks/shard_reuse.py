"""Prefill work per rank: one process against a torchrun launch (issue 27), on any code.

Runs ``rhlens detect`` with the given arguments (in one process, or in each rank of a torchrun
launch) and writes, per process, ``OUT.tally/r<RANK>.json``: the busy seconds of the detection
loop, the probes it answered, the prompt tokens it prefilled (computed) and the ones whose KV
it reused, counted from each probe's record (``n_tokens - 1 - reused_prefix`` computed,
``reused_prefix`` reused: the engine prefills a prompt minus its last token). It counts from
the records, not from ``run.json``, so that the code before the run's own counters existed
can be measured the same way. ``--table OUT [OUT ...]`` prints the Markdown table of runs.

    python benchmarks/shard_reuse.py detect --lengths 500,1000 ... --out runs/one
    torchrun --nproc-per-node 2 benchmarks/shard_reuse.py detect ... --out runs/two
    python benchmarks/shard_reuse.py --table runs/one runs/two
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _tally_dir(out: str) -> Path:
    return Path(out.rstrip("/") + ".tally")


def run(argv: list[str]) -> int:
    from rhlens.cli import main
    from rhlens.distributed import sweep as sweep_mod

    out = argv[argv.index("--out") + 1]
    rank = int(os.environ.get("RANK", "0"))
    tally = {"rank": rank, "items": 0, "prefill_tokens": 0, "reused_tokens": 0, "busy_s": 0.0}
    add, finish = sweep_mod.Sweep.add, sweep_mod.Sweep.finish

    def counting_add(self, record, *args, **kwargs):
        if "reused_prefix" in record:
            tally["items"] += 1
            tally["reused_tokens"] += int(record["reused_prefix"])
            tally["prefill_tokens"] += int(record["n_tokens"]) - 1 - int(record["reused_prefix"])
        return add(self, record, *args, **kwargs)

    def noting_finish(self):
        tally["busy_s"] += self.stats.busy_s
        return finish(self)

    sweep_mod.Sweep.add, sweep_mod.Sweep.finish = counting_add, noting_finish
    code = main(argv)
    folder = _tally_dir(out)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"r{rank}.json").write_text(json.dumps(tally))
    return code


def table(outs: list[str]) -> str:
    rows = ["| run | rank | probes | busy s | prefill tokens computed | tokens reused |",
            "|---|---:|---:|---:|---:|---:|"]
    for out in outs:
        parts = [json.loads(p.read_text()) for p in sorted(_tally_dir(out).glob("r*.json"))]
        for t in parts:
            rows.append(f"| {out} | {t['rank']} | {t['items']} | {t['busy_s']:.1f} | "
                        f"{t['prefill_tokens']} | {t['reused_tokens']} |")
        if len(parts) > 1:
            rows.append(f"| {out} | all | {sum(t['items'] for t in parts)} | "
                        f"{sum(t['busy_s'] for t in parts):.1f} | "
                        f"{sum(t['prefill_tokens'] for t in parts)} | "
                        f"{sum(t['reused_tokens'] for t in parts)} |")
    return "\n".join(rows)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--table"]:
        print(table(sys.argv[2:]))
        sys.exit(0)
    sys.exit(run(sys.argv[1:]))
