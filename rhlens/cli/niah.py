"""``rhlens niah`` (NIAH scores under head masks) and ``rhlens mask-sweep`` (the K curve)."""

from __future__ import annotations

import argparse

from rhlens.cli import prepare
from rhlens.cli.args import (
    add_mask_args,
    add_model_args,
    add_out_args,
    add_probe_args,
    draws,
    int_list,
    niah_config,
    repeated,
    resume_note,
    say,
)
from rhlens.errors import ConfigError

__all__ = ["add_parsers", "cmd_mask_sweep", "cmd_niah"]

SCORES_HELP = ("retrieval scores: a detection run's --out, saved scores, or a paper-format JSON "
               "file; checked against the model's layers x heads")


def add_parsers(sub) -> None:
    p = sub.add_parser("niah", help="needle-in-a-haystack scores under head masks",
                       description="Answer a probe grid under each head mask; NIAH score = "
                                   "ROUGE-1 recall x 100, answers sorted into classes.")
    add_model_args(p)
    add_probe_args(p)
    add_mask_args(p)
    p.add_argument("--scores", default=None, metavar="RUN_DIR|FILE", help=SCORES_HELP)
    p.add_argument("--mask", action="append", metavar="SPEC",
                   help="none | top:K | random:K[:SEED] | heads:L.H,L.H (repeatable; default "
                        "none). top needs --scores; random draws K heads from the model's grid "
                        "(with --scores, never one scoring above 0.1 or among the top K)")
    add_out_args(p)
    p.set_defaults(func=cmd_niah, interrupted=resume_note("answer"))

    p = sub.add_parser("mask-sweep", help="NIAH score against K: top-K vs random-K heads masked",
                       description="The paper's Figure 7: mask the top-K retrieval heads and K "
                                   "random heads for each K, score the probe grid under each.")
    add_model_args(p)
    add_probe_args(p)
    add_mask_args(p)
    p.add_argument("--scores", required=True, metavar="RUN_DIR|FILE", help=SCORES_HELP)
    p.add_argument("--ks", type=int_list(minimum=0), default=(0, 2, 5, 10, 20), metavar="K,K,...",
                   help="numbers of heads to mask, comma-separated (default 0,2,5,10,20; 0 is "
                        "the unmasked baseline, always included)")
    p.add_argument("--seeds", type=draws(), default=3, metavar="N",
                   help="random-K masks per K, seeds 0..N-1 (default 3)")
    add_out_args(p)
    p.set_defaults(func=cmd_mask_sweep, interrupted=resume_note("answer"))


def _means(args, model, tok, probes):
    if args.mode != "mean":
        return None
    from rhlens.ablation import head_means, mean_reference_prompts

    return head_means(model, tok, mean_reference_prompts(probes))


def cmd_niah(args: argparse.Namespace) -> int:
    from rhlens.masks import parse_mask
    from rhlens.niah import niah_sweep
    from rhlens.report.runs import save_niah_run

    out = prepare.take_output(args)
    config = niah_config(args)
    shape = prepare.model_facts(args)
    scores = prepare.scores(args.scores, shape)
    masks = [parse_mask(s, grid=shape.grid, scores=scores, mode=args.mode, phase=args.phase)
             for s in args.mask or ["none"]]
    labels = [m.label for m in masks]
    if len(set(labels)) != len(labels):
        raise ConfigError(f"--mask given twice: {repeated(labels)}")
    probes = prepare.probes(args, prepare.tokenizer(args), shape,
                            max_new_tokens=config.generation.max_new_tokens)
    prepare.check_resume(args, out, "niah.jsonl", probes, config,
                         masks=[m.to_dict() for m in masks])  # other masks: refused here
    model, tok = prepare.load(args)
    result = niah_sweep(model, probes, masks=masks, config=config, tokenizer=tok,
                        means=_means(args, model, tok, probes), out=out, progress=not args.quiet)
    if not prepare.is_main():  # under torchrun, rank 0 writes the outputs
        return 0
    written = save_niah_run(out, result)
    prepare.record_split(args, out, probes, "NIAH under the masks")
    for label, score in result.table().items():
        say(f"  {label:>20}: NIAH {score:5.1f}   {result.class_counts(label)}")
    say("wrote: " + ", ".join(str(p) for p in written.values()))
    return 0


def cmd_mask_sweep(args: argparse.Namespace) -> int:
    from rhlens.masks import sweep_masks
    from rhlens.niah import mask_sweep
    from rhlens.report.runs import save_mask_sweep_run

    out = prepare.take_output(args)
    config = niah_config(args)
    shape = prepare.model_facts(args)
    scores = prepare.scores(args.scores, shape)
    sweep_masks(scores, args.ks, args.seeds, mode=args.mode, phase=args.phase)  # K fits, heads drawable
    probes = prepare.probes(args, prepare.tokenizer(args), shape,
                            max_new_tokens=config.generation.max_new_tokens)
    prepare.check_resume(args, out, "niah.jsonl", probes, config)
    model, tok = prepare.load(args)
    sweep = mask_sweep(model, probes, scores, ks=args.ks, seeds=args.seeds, mode=args.mode,
                       phase=args.phase, config=config, tokenizer=tok,
                       means=_means(args, model, tok, probes), out=out, progress=not args.quiet)
    if not prepare.is_main():
        return 0
    written = save_mask_sweep_run(out, sweep)
    prepare.record_split(args, out, probes, "the K curve (top-K vs random-K masked)")
    kmax = max(sweep.ks)
    c = sweep.curve()
    say(f"{'K':>4} {'top-K':>7} {'random-K (mean ± std)':>24}")
    for k, t, m, s in zip(c["k"], c["top"], c["random_mean"], c["random_std"]):
        say(f"{k:>4} {t:7.1f} {m:15.1f} ± {s:4.1f}")
    say(f"top-K drops below 50 at K = {sweep.k_below(50.0)}")
    for ex in sweep.niah.examples(f"top-{kmax}", n=3) if kmax else []:
        say(f"  [{ex['key']}] unmasked: {ex['unmasked'][:80]!r}\n"
            f"  {'':>{len(ex['key']) + 2}} masked:   {ex['masked'][:80]!r}")
    say("wrote: " + ", ".join(str(p) for p in written.values()))
    return 0
