"""``rhlens cot``: chain-of-thought vs direct answers under retrieval-head masks."""

from __future__ import annotations

import argparse

from rhlens.cli import prepare
from rhlens.cli.args import (
    add_mask_args,
    add_model_args,
    add_out_args,
    cot_config,
    draws,
    nonnegative_int,
    positive_int,
    repeated,
    resume_note,
    say,
)
from rhlens.errors import ConfigError

__all__ = ["add_parsers", "cmd_cot"]


def add_parsers(sub) -> None:
    p = sub.add_parser("cot", help="chain of thought vs direct answers under retrieval-head masks",
                       description="Accuracy of chain-of-thought and direct answers with the "
                                   "top-K retrieval heads (and K random heads) masked, with "
                                   "bootstrap intervals (the paper's Section 5).")
    add_model_args(p)
    p.add_argument("--task", action="append", required=True, metavar="NAME|FILE",
                   help="built-in task (arithmetic, lookup, capitals, counts) or a GSM8K / "
                        "MMLU / MuSiQue file (repeatable)")
    p.add_argument("--scores", default=None, metavar="RUN_DIR|FILE",
                   help="retrieval scores (a detection run's --out, saved scores, or a "
                        "paper-format JSON file); needed when --k > 0")
    p.add_argument("--k", type=nonnegative_int, default=20, metavar="K",
                   help="mask the top-K retrieval heads and K random heads (default 20; 0: only "
                        "the unmasked baseline)")
    p.add_argument("--seeds", type=draws(), default=3, metavar="N",
                   help="random-K masks, seeds 0..N-1 (default 3)")
    add_mask_args(p, modes=("uniform", "zero"), phase=False)
    p.add_argument("--n-items", type=positive_int, default=None, metavar="N",
                   help="only the first N items of each task (default: all)")
    p.add_argument("--max-new-tokens-cot", type=positive_int, default=160, metavar="N",
                   help="answer budget with reasoning (default 160)")
    p.add_argument("--max-new-tokens-direct", type=positive_int, default=24, metavar="N",
                   help="answer budget without reasoning (default 24)")
    p.add_argument("--no-chat-template", action="store_true",
                   help="plain prompts, no chat template")
    add_out_args(p)
    p.set_defaults(func=cmd_cot, interrupted=resume_note("answer"))


def cmd_cot(args: argparse.Namespace) -> int:
    from rhlens.cot.experiment import cot_ablation
    from rhlens.cot.tasks import get_task
    from rhlens.masks import Mask, sweep_masks
    from rhlens.plotting import plot_cot_bars
    from rhlens.report.runs import save_figure
    from rhlens.store.layout import RunDir

    out = prepare.take_output(args)
    config = cot_config(args)
    if args.k > 0 and not args.scores:
        raise ConfigError("--k > 0 needs --scores (a detection run or a paper JSON file); "
                          "--k 0 runs the unmasked baseline only")
    tasks = [get_task(t) for t in args.task]
    names = [t.name for t in tasks]
    if len(set(names)) != len(names):
        raise ConfigError(f"--task given twice: {repeated(names)}")
    if args.n_items:
        most = max(len(t) for t in tasks)  # the real limit, before anything runs
        if args.n_items > most:
            sizes = ", ".join(f"{t.name}: {len(t)}" for t in tasks)
            raise ConfigError(f"--n-items {args.n_items} is more than the {most} items the task"
                              f"{'s hold' if len(tasks) > 1 else ' holds'} ({sizes}); give at most "
                              f"{most}, or leave --n-items out for every item")
        tasks = [t.head(args.n_items) for t in tasks]
    shape = prepare.model_facts(args)
    for flag in ("--max-new-tokens-cot", "--max-new-tokens-direct"):  # before any buffer is sized
        value = getattr(args, flag[2:].replace("-", "_"))
        if shape.n_ctx and value >= shape.n_ctx:
            raise ConfigError(f"{flag} {value} does not fit the model's maximum context of "
                              f"{shape.n_ctx} tokens, which must also hold the prompt; use {flag} "
                              f"below {shape.n_ctx}")
    if args.k > 0:
        scores = prepare.scores(args.scores, shape)
        masks = sweep_masks(scores, ks=[args.k], seeds=args.seeds, mode=args.mode)
    else:
        masks = [Mask.none()]
    for task in tasks:
        prepare.check_resume(args, out, f"cot_{task.name}.jsonl", config=config)
    model, tok = prepare.load(args)
    results = []
    for task in tasks:
        res = cot_ablation(model, task, masks=masks, config=config, tokenizer=tok,
                           out=out, progress=not args.quiet)
        results.append(res)
        if not prepare.is_main():  # under torchrun, rank 0 writes the outputs
            continue
        res.save(RunDir(out).cot_result(task.name))
        say(f"\n{task.name} ({task.kind}, {len(task)} items)")
        say(f"  {'mask':>10} {'mode':>6}  accuracy [95% CI]      drop [95% CI]")
        for row in res.table():
            drop = (f"{100 * row['drop']:+6.1f} [{100 * row['drop_low']:+.0f}, "
                    f"{100 * row['drop_high']:+.0f}]") if "drop" in row else ""
            say(f"  {row['mask']:>10} {row['mode']:>6}  {100 * row['accuracy']:5.1f} "
                f"[{100 * row['low']:4.0f}, {100 * row['high']:4.0f}]   {drop}")
    if not prepare.is_main():
        return 0
    figure = save_figure(plot_cot_bars(results), RunDir(out).cot_figure)
    say(f"wrote: {RunDir(out).cot}/<task>/, {out}/cot_<task>.jsonl, {figure}")
    return 0
