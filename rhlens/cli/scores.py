"""``rhlens scores``: several score families of every head side by side, optionally judged by masking."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from rhlens.cli import prepare
from rhlens.cli.args import (
    Renamed,
    add_model_args,
    add_out_args,
    add_probe_args,
    detect_generation,
    draws,
    int_list,
    positive_int,
    resume_note,
    say,
)
from rhlens.errors import ConfigError

__all__ = ["add_parsers", "cmd_scores"]

def add_parsers(sub) -> None:
    p = sub.add_parser(
        "scores", help="score heads by several families (copy, mass, query, induction, ...) and "
                       "judge them by masking",
        description="Score every head with several score families on the same needle-in-a-"
                    "haystack probes: the paper's copy score, attention mass on the needle while "
                    "answering, attention from the question to the needle, and TransformerLens' "
                    "head detectors. With --judge, mask each family's top-K heads and K random "
                    "heads and compare the NIAH curves (K to halve NIAH, area under the curve).")
    add_model_args(p)
    add_probe_args(p, lengths="1000", depths="10,30,50,70,90", max_new_tokens=32)
    p.add_argument("--family", default=None, metavar="F,F,...",
                   help="score families, comma-separated (default: all): copy, copy-paper (the "
                        "paper's score, unique / the authors' count), mass (attention on the answer "
                        "while answering), query (attention from the question to the needle), "
                        "induction, previous-token, duplicate-token (TransformerLens' detectors)")
    p.add_argument("--needle-set", choices=("literal", "nonliteral"), default=None,
                   help="literal: the built-in needles (default); nonliteral: the same needles "
                        "asked with no content word in common with them (not with --needles)")
    p.add_argument("--answers", choices=("model", "reference"), default="model",
                   help="model: copy and mass at the model's own answers, over the probes it "
                        "answers (the paper); reference: the needle's answer teacher-forced, "
                        "every probe counted")
    p.add_argument("--mass-span", choices=("answer", "needle"), default="answer",
                   help="mass looks at the answer's tokens (default) or the whole needle sentence")
    p.add_argument("--query-span", choices=("answer", "needle"), default="needle",
                   help="query looks at the whole needle sentence (default) or the answer")
    p.add_argument("--sequences", type=draws(), default=8, metavar="N",
                   help="repeated random-word sequences for the head detectors (default 8)")
    p.add_argument("--prefill-chunk", type=positive_int, default=64, metavar="N",
                   help="prefill N tokens at a time (default 64: a probe's masks reuse all of its "
                        "prefill but the last chunk)")
    p.add_argument("--batch-size", type=positive_int, default=None, metavar="N",
                   help="probes of one length decoded together (default 8; results do not depend on it)")
    g = p.add_argument_group("causal judgement (--judge)")
    g.add_argument("--judge", action="store_true",
                   help="mask each family's top-K heads and K random heads, NIAH per K")
    g.add_argument("--ks", type=int_list(minimum=1), default=(1, 2, 5, 10, 20), metavar="K,K,...",
                   help="numbers of heads to mask (default 1,2,5,10,20; the unmasked answer is "
                        "always run)")
    g.add_argument("--seeds", type=draws(), default=3, metavar="N",
                   help="random-K masks per K, seeds 0..N-1 (default 3)")
    g.add_argument("--knockout", "--mode", dest="mode", action=Renamed, old=("--mode",),
                   choices=("uniform", "zero"), default="uniform",
                   help="uniform: zero the head's query (the paper's mask); zero: zero its output "
                        "(default uniform; --mode is the deprecated spelling)")
    g.add_argument("--judge-split", choices=("choose", "report"), default=None,
                   help="held out: judge the masks on this split's probes (same lengths and "
                        "depths) instead of the scored ones, e.g. --split choose --judge-split "
                        "report: heads scored on one split, judged on the other")
    add_out_args(p)
    p.set_defaults(func=cmd_scores, interrupted=resume_note("probe"))


def _config(args: argparse.Namespace):
    from rhlens.families import FamiliesConfig
    from rhlens.retrieval import DetectConfig

    families = {} if args.family is None else {"families": tuple(f.strip() for f in args.family.split(","))}
    return FamiliesConfig(**families, detect=DetectConfig().with_generation(**detect_generation(args)),
                          answers=args.answers,
                          mass_span=args.mass_span, query_span=args.query_span,
                          n_sequences=args.sequences)


def _probes(args: argparse.Namespace, tok, shape, config):
    """The probe grid of the flags, with ``--needle-set``; none when no family needs probes."""
    if not config.probe_families:
        return None
    if args.needle_set is None or args.needles:
        return prepare.probes(args, tok, shape, max_new_tokens=config.detect.generation.max_new_tokens)
    from rhlens.cli.args import probe_config
    from rhlens.families import needle_set
    from rhlens.probes import build_probes
    from rhlens.retrieval import check_probes

    found = list(needle_set(args.needle_set))
    if args.n_needles and args.n_needles > len(found):
        raise ConfigError(f"--n-needles {args.n_needles}: the {args.needle_set} set has {len(found)} needles")
    built = build_probes(tok, config=probe_config(args), needles=found[: args.n_needles or None],
                         haystack=args.haystack, max_length=shape.n_ctx)
    check_probes(built.probes, shape.n_ctx, config.detect.generation.max_new_tokens, name="--max-new-tokens")
    return built


def cmd_scores(args: argparse.Namespace) -> int:
    from rhlens.families import FAMILIES_LOG, damage_masks, question_span, score_families
    from rhlens.report.runs import save_figure

    if args.needle_set and args.needles:
        raise ConfigError("--needle-set and --needles: give one of them")
    if args.split and args.needle_set:
        raise ConfigError("--split and --needle-set: give one of them")
    if args.judge_split and not args.judge:
        raise ConfigError("--judge-split chooses the probes --judge masks on: add --judge")
    if args.judge_split and args.needle_set:
        raise ConfigError("--judge-split takes the packaged split needles: drop --needle-set")
    config = _config(args)  # unknown or repeated families fail here
    if args.judge and args.mode not in ("uniform", "zero"):
        raise ConfigError(f"--knockout {args.mode!r}: uniform or zero")
    out = prepare.take_output(args)
    shape = prepare.model_facts(args)
    if args.judge:
        import torch

        # Ks within the grid, random heads drawable: checked on a stand-in grid of the right shape.
        damage_masks({f: torch.zeros(shape.grid) for f in config.families}, shape.grid, args.ks,
                     args.seeds, args.mode)
        if not config.probe_families:
            raise ConfigError("--judge answers NIAH probes under masks: ask for at least one of "
                              "copy, copy-paper, mass, query (or drop --judge)")
    tok = prepare.tokenizer(args)
    probes = _probes(args, tok, shape, config)
    if probes is not None and "query" in config.families:
        for p in probes:
            question_span(p, tok)
    judge_probes = probes
    if args.judge_split:
        judge_probes = prepare.probes(_argparse_ns(args, args.judge_split), tok, shape,
                                      max_new_tokens=config.detect.generation.max_new_tokens)
    if probes is not None:
        prepare.check_resume(args, out, FAMILIES_LOG, probes, config)
    if args.judge:  # the judging sweep's records, before the weights
        prepare.check_records(args, Path(out) / "damage", "niah.jsonl")
    model, tok = prepare.load(args)
    name = args.needle_set or ("custom" if args.needles else "literal")
    say(f"scoring {', '.join(config.families)}"
        + (f" over {len(probes)} probes ({name} needles)" if probes is not None else "") + f" -> {out}")
    t = time.perf_counter()
    fs = score_families(model, probes or [], config=config, tokenizer=tok, needle_set=name, out=out,
                        progress=not args.quiet)
    written = {"families": fs.save(Path(out) / "families")}
    for f in fs.families:
        if f.n_successful:
            written[f"head_scores_{f.family}"] = f.to_paper_json(Path(out) / f"head_scores_{f.family}.json")
    say(f"scored in {time.perf_counter() - t:.0f} s")
    for row in fs.table():
        rho = row.get("spearman_vs_copy")
        say(f"  {row['family']:>16}: {row['counted']}/{row['probes']} counted, top "
            + ", ".join(f"L{la}H{h}" for la, h, _ in row["top"][:3])
            + (f", Spearman vs copy {rho:.2f}" if rho is not None else ""))
    for missing in sorted(set(fs.names) - set(fs.defined())):
        say(f"  {missing:>16}: no probe answered correctly: undefined")
    from rhlens.plotting import plot_family_correlations, plot_family_tops

    if len(fs.defined()) >= 2:
        written["correlations"] = save_figure(plot_family_correlations(fs), Path(out) / "families.png")
    if fs.defined():
        written["tops"] = save_figure(plot_family_tops(fs), Path(out) / "family_tops.png")
    prepare.record_split(args, out, probes, "scoring the heads" + (" and judging them" if args.judge
                                                                   and not args.judge_split else ""))
    if args.judge:
        written.update(_judge(args, model, tok, judge_probes, fs, out))
        if args.judge_split:
            prepare.record_split(_argparse_ns(args, args.judge_split), Path(out) / "damage", judge_probes,
                                 "judging by masking the heads scored on "
                                 + (f"the {args.split} split" if args.split else "the scored probes"))
    say("wrote: " + ", ".join(str(p) for p in written.values()))
    return 0


def _judge(args, model, tok, probes, fs, out) -> dict:
    import math

    from rhlens.families import damage_sweep
    from rhlens.niah import NIAHConfig
    from rhlens.plotting import plot_damage_curves
    from rhlens.report.runs import save_figure

    rankings = {f: fs[f] for f in fs.defined()}
    if not rankings:
        raise ConfigError("no family has a score to judge (no probe was answered correctly)")
    where = Path(out) / "damage"
    say(f"judging {', '.join(rankings)}: K = {', '.join(map(str, args.ks))}, {args.seeds} random "
        f"seed(s) -> {where}")
    res = damage_sweep(model, probes, rankings, ks=args.ks, seeds=args.seeds, mode=args.mode,
                       config=NIAHConfig().with_generation(max_new_tokens=args.max_new_tokens,
                                                           prefill_chunk=args.prefill_chunk),
                       tokenizer=tok, needle_set=fs.needle_set, out=where, progress=not args.quiet)
    written = {"damage": res.save(where)}
    written["damage_figure"] = save_figure(plot_damage_curves(res), Path(out) / "damage.png")
    say(f"{'heads masked':>16} {'K to halve':>10} {'AUC':>6}")
    for name, s in res.summary().items():
        k = s["k_half"]
        say(f"{name:>16} {('> max' if math.isinf(k) else f'{k:.1f}'):>10} {s['auc']:6.2f}")
    return written


def _argparse_ns(args: argparse.Namespace, split: str) -> argparse.Namespace:
    return argparse.Namespace(**{**vars(args), "split": split})
