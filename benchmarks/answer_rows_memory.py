"""Peak memory of keeping only the answer's attention rows (``cache_answer_patterns``).

Scoring heads from a user's forward pass needs each layer's attention at the answer's query
rows only. Three ways to get them, each measured in a fresh process on a prompt of ``--n``
random tokens plus a 20-token answer:

* ``rows``: ``cache_answer_patterns`` (default): the prompt is prefilled through the model's
  native attention (no pattern formed), then the answer rows run through the bridge;
* ``eager``: ``cache_answer_patterns(prefill_prompt=False)``: one bridge forward whose hooks
  keep the answer rows, while eager attention forms each layer's whole [seq, seq] pattern;
* ``full``: ``model.run_with_cache`` keeping every layer's whole pattern.

On CPU it reports the growth of the process's peak RSS; on CUDA, ``max_memory_allocated``.

    python benchmarks/answer_rows_memory.py --n 2000 4000 --paths rows eager
    python benchmarks/answer_rows_memory.py --device cuda --n 8000 32000 --paths rows eager
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def measure(n: int, path: str, device: str, model_name: str | None) -> str:
    import torch

    sys.path.insert(0, str(ROOT))
    from rhlens.models import load_model
    from rhlens.retrieval import cache_answer_patterns

    torch.set_num_threads(1)
    model, _ = load_model(model_name, device=device)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(100, 20000, (n + 20,), generator=g).tolist()
    rows = path == "rows"
    cache_answer_patterns(model, tokens[:64], answer_start=44, prefill_prompt=rows)  # warm-up

    def peak() -> float:
        if device.startswith("cuda"):
            return torch.cuda.max_memory_allocated() / 2**20
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    before = peak() if not device.startswith("cuda") else torch.cuda.memory_allocated() / 2**20
    with torch.no_grad():
        if path == "full":
            _, cache = model.run_with_cache(torch.tensor([tokens], device=device),
                                            names_filter=lambda s: s.endswith("hook_pattern"))
        else:
            cache = cache_answer_patterns(model, tokens, answer_start=n, prefill_prompt=rows)
    kept = sum(v.numel() * v.element_size() for v in cache.cache_dict.values()) / 2**20
    return f"| {n} | {path} | {peak() - before:.0f} | {kept:.0f} |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, nargs="+", default=[2000, 4000])
    parser.add_argument("--paths", nargs="+", default=["rows", "eager"],
                        choices=["rows", "eager", "full"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", default=None)
    parser.add_argument("--one", nargs=2, metavar=("N", "PATH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(measure(int(args.one[0]), args.one[1], args.device, args.model))
        return
    print("| prompt tokens | path | peak growth (MiB) | cache kept (MiB) |\n|---|---|---|---|")
    for n in args.n:
        for path in args.paths:
            extra = ["--model", args.model] if args.model else []
            out = subprocess.run([sys.executable, __file__, "--one", str(n), path,
                                  "--device", args.device, *extra],
                                 capture_output=True, text=True, check=True).stdout
            print(out.strip().splitlines()[-1], flush=True)


if __name__ == "__main__":
    main()
