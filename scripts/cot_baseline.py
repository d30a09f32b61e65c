"""Unmasked baseline of the CoT tasks: accuracy per task x prompting mode (CoT / direct).

The masking experiment (Wu et al., 2024, last section) only means something on tasks the
model can do unmasked, so this script measures that baseline with plain HF greedy
decoding (no bridge, no hooks) and is what the built-in tasks' difficulty was tuned with.

    python scripts/cot_baseline.py                      # all built-in tasks, default model
    python scripts/cot_baseline.py --tasks arithmetic --n 10 --show 3
    python scripts/cot_baseline.py --tasks path/to/gsm8k.jsonl --limit 20
    python scripts/cot_baseline.py --out baseline.jsonl # every output, for inspection

Prompts are batched (32 a batch, left padding: on 2 CPU cores a batch of 30 costs little
more per step than one prompt; padding can flip a rare near-tie of greedy decoding
against unbatched runs). A CoT generation stops once its "Answer: ..." line is complete
(``--no-stop-at-answer`` to turn off): the extractor reads the same answer unless the
model would have gone on to write a second "Answer:" line, and most of the 128-token
budget is saved.

Measured on SmolLM2-135M-Instruct, seed 0, 30 items per task, CoT 128 / direct 16 new
tokens: arithmetic 37% / 40%, lookup 93% / 80%, capitals 80% / 93%, counts 33% / 67%
(CoT / direct). About 5 minutes on 2 otherwise idle cores (20 on busy shared ones),
plus the one-off model conversion.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import torch

from rhlens.cot import Task, get_task, list_tasks

_ANSWER_LINE = re.compile(r"\banswer\s*\**\s*:[^\n]*\S[^\n]*\n", re.IGNORECASE)


class _StopAtAnswer:
    """Per-sequence stopping criterion: stop a row once it has a complete answer line."""

    def __init__(self, tok, prompt_len: int) -> None:
        self.tok = tok
        self.prompt_len = prompt_len

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        texts = self.tok.batch_decode(input_ids[:, self.prompt_len :], skip_special_tokens=True)
        return torch.tensor([bool(_ANSWER_LINE.search(t)) for t in texts], dtype=torch.bool)


def generate(
    model, tok, prompts: list[str], max_new_tokens: int, batch_size: int, stop_at_answer: bool
) -> list[str]:
    """Greedy completions of chat-templated ``prompts``, in order."""
    from transformers import StoppingCriteriaList

    tok.padding_side = "left"
    outputs: list[str] = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        texts = [
            tok.apply_chat_template(
                [{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False
            )
            for p in chunk
        ]
        enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        prompt_len = enc["input_ids"].shape[1]
        stopping = StoppingCriteriaList([_StopAtAnswer(tok, prompt_len)]) if stop_at_answer else None
        with torch.no_grad():
            out = model.generate(
                **enc,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tok.pad_token_id,
                stopping_criteria=stopping,
            )
        outputs.extend(tok.batch_decode(out[:, prompt_len:], skip_special_tokens=True))
    return outputs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--tasks",
        nargs="+",
        default=None,
        help=f"task names or dataset files (default: {', '.join(list_tasks())})",
    )
    parser.add_argument("--model", default=None, help="model name or path (default model)")
    parser.add_argument("--n", type=int, default=None, help="items per built-in task")
    parser.add_argument("--limit", type=int, default=None, help="items per dataset file")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--modes", nargs="+", default=["cot", "direct"], choices=["cot", "direct"])
    parser.add_argument("--cot-tokens", type=int, default=128)
    parser.add_argument("--direct-tokens", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-stop-at-answer", dest="stop_at_answer", action="store_false")
    parser.add_argument("--show", type=int, default=0, help="print this many outputs per cell")
    parser.add_argument("--out", type=Path, default=None, help="write every output as JSONL")
    args = parser.parse_args(argv)

    from rhlens.models import load_hf

    torch.set_num_threads(args.threads)
    t0 = time.time()
    model, tok = load_hf(args.model)
    print(f"model loaded in {time.time() - t0:.1f}s", file=sys.stderr)

    tasks: list[Task] = []
    for spec in args.tasks or list_tasks():
        kwargs = {}
        if spec in list_tasks():
            kwargs = {"seed": args.seed} | ({"n": args.n} if args.n else {})
        elif args.limit:
            kwargs = {"limit": args.limit}
        tasks.append(get_task(spec, **kwargs))

    rows = []
    records = []
    for task in tasks:
        for mode in args.modes:
            budget = args.cot_tokens if mode == "cot" else args.direct_tokens
            t0 = time.time()
            outs = generate(
                model,
                tok,
                [it.prompt(mode) for it in task.items],
                budget,
                args.batch_size,
                args.stop_at_answer and mode == "cot",
            )
            elapsed = time.time() - t0
            correct = 0
            none = 0
            for item, out in zip(task.items, outs):
                pred = task.extract(out, item)
                ok = bool(task.scorer(pred, item))
                correct += ok
                none += pred is None
                records.append(
                    {
                        "task": task.name,
                        "mode": mode,
                        "id": item.id,
                        "gold": item.answer,
                        "pred": pred,
                        "correct": ok,
                        "output": out,
                    }
                )
            acc = correct / len(task.items)
            rows.append((task.name, task.kind, mode, len(task.items), acc, none, elapsed))
            print(
                f"{task.name:<12} {mode:<6} acc={acc:.0%} ({correct}/{len(task.items)}) "
                f"no-answer={none} {elapsed:.0f}s",
                file=sys.stderr,
                flush=True,
            )
            for rec in [r for r in records if r["task"] == task.name and r["mode"] == mode][: args.show]:
                print(
                    f"  [{rec['id']}] gold={rec['gold']!r} pred={rec['pred']!r} "
                    f"ok={rec['correct']}\n    {rec['output']!r}",
                    file=sys.stderr,
                )

    if args.out:
        with args.out.open("w", encoding="utf-8") as fh:
            for rec in records:
                fh.write(json.dumps(rec) + "\n")

    print(f"\nmodel: {args.model or 'default (SmolLM2-135M-Instruct)'}, seed {args.seed}")
    print(f"| {'task':<12} | {'kind':<9} | {'n':>3} | {'CoT':>5} | {'direct':>6} |")
    print(f"|{'-' * 14}|{'-' * 11}|{'-' * 5}|{'-' * 7}|{'-' * 8}|")
    for task in tasks:
        cells = {m: a for name, _, m, _, a, _, _ in rows if name == task.name}
        cot = f"{cells['cot']:.0%}" if "cot" in cells else "-"
        direct = f"{cells['direct']:.0%}" if "direct" in cells else "-"
        print(f"| {task.name:<12} | {task.kind:<9} | {len(task):>3} | {cot:>5} | {direct:>6} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
