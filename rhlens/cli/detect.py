"""``rhlens detect`` (retrieval scores of every head) and ``rhlens ask`` (answer one probe)."""

from __future__ import annotations

import argparse
import time

from rhlens.cli import prepare
from rhlens.cli.args import (
    Renamed,
    add_model_args,
    add_out_args,
    add_probe_args,
    add_prompt_args,
    detect_config,
    percent,
    positive_int,
    resume_note,
    say,
)

__all__ = ["add_parsers", "cmd_ask", "cmd_detect"]


def add_parsers(sub) -> None:
    p = sub.add_parser("detect", help="score every head on needle-in-a-haystack probes",
                       description="Score every attention head of a model on a grid of "
                                   "needle-in-a-haystack probes (Wu et al., 2024).")
    add_model_args(p)
    add_probe_args(p)
    p.add_argument("--score-formula", "--mode", dest="mode", action=Renamed, old=("--mode",),
                   choices=("unique", "paper"), default="unique",
                   help="unique: distinct needle tokens copied / needle length (<= 1, the "
                        "paper's formula); paper: the authors' code, +1/length per copying step "
                        "(default unique; --mode is the deprecated spelling)")
    p.add_argument("--prefill-chunk", type=positive_int, default=None, metavar="N",
                   help="prefill long prompts N tokens at a time (default 32768)")
    p.add_argument("--batch-size", type=positive_int, default=None, metavar="N",
                   help="probes of one length decoded together (default 8; results do not "
                        "depend on it)")
    add_out_args(p)
    p.set_defaults(func=cmd_detect, interrupted=resume_note("probe"))

    p = sub.add_parser("ask", help="answer one needle-in-a-haystack probe (a smoke test)",
                       description="Build one probe with the first built-in needle and let the "
                                   "model answer it.")
    add_model_args(p)
    p.add_argument("--length", type=positive_int, default=600, metavar="N",
                   help="context length in tokens, including the 200-token answer buffer "
                        "(default 600)")
    p.add_argument("--depth", type=percent, default=50.0, metavar="D",
                   help="needle depth in percent of the haystack (default 50)")
    add_prompt_args(p)
    p.add_argument("--max-new-tokens", type=positive_int, default=40, metavar="N",
                   help="tokens the model may answer with, at most (default 40)")
    p.set_defaults(func=cmd_ask, interrupted=lambda args: "interrupted")


def cmd_detect(args: argparse.Namespace) -> int:
    from rhlens.report.runs import save_detection_run
    from rhlens.retrieval import detect_retrieval_heads

    out = prepare.take_output(args)
    config = detect_config(args)
    shape = prepare.model_facts(args)
    probes = prepare.probes(args, prepare.tokenizer(args), shape,
                            max_new_tokens=config.generation.max_new_tokens)
    prepare.check_resume(args, out, "probes.jsonl", probes, config)
    model, tok = prepare.load(args)
    say(f"detecting over {len(probes)} probes "
        f"({len(probes.config.lengths)} lengths x {len(probes.config.depths)} depths x "
        f"{len(probes.needles)} needles) -> {out}")
    before, earlier = _finished(out)
    t = time.perf_counter()
    scores = detect_retrieval_heads(model, probes, config=config, tokenizer=tok, out=out,
                                    progress=not args.quiet)
    wall = time.perf_counter() - t
    if not prepare.is_main():  # under torchrun, rank 0 writes the outputs
        return 0
    # A resumed run's wall time is the sessions' sum: a rerun that finds everything done
    # computes nothing, and must not report the run as taking 0 s.
    new = _finished(out)[0] - before
    total = wall + (earlier or 0.0) if new or earlier is None else earlier
    written = save_detection_run(out, scores, wall_seconds=total)
    when = (f"{wall:.0f} s this run" + (f", {total:.0f} s in all" if earlier else "") if new else
            f"all finished earlier, in {total:.0f} s; nothing computed now")
    say(f"\n{scores.n_successful}/{scores.n_probes} probes answered correctly ({when})")
    for p in scores.probes[: min(3, len(scores.probes))]:
        say(f"  [{p['key']}] recall {p['rouge_recall']:.2f}: {p['response'][:100]!r}")
    if scores.n_successful:
        say(f"top heads (score formula {args.mode}), (layer, head): score")
        for la, h, s in scores.top(10):
            say(f"  L{la:>2} H{h:>2}: {s:.3f}")
        say(f"{100 * scores.fraction_above(0.1):.1f}% of heads score above 0.1")
    say("wrote: " + ", ".join(str(p) for p in written.values()))
    return 0


def _finished(out) -> tuple[int, float | None]:
    """Probes already in ``out``'s log, and the wall time its summary recorded (if any)."""
    import json

    from rhlens.store.layout import RunDir
    from rhlens.store.logs import read_jsonl

    run = RunDir(out)
    n = sum(1 for r in read_jsonl(run.probes) if isinstance(r, dict) and "key" in r) \
        if run.probes.exists() else 0
    try:
        wall = json.loads(run.summary.read_text()).get("wall_seconds")
    except (OSError, ValueError, AttributeError):
        wall = None
    return n, (float(wall) if isinstance(wall, (int, float)) else None)


def cmd_ask(args: argparse.Namespace) -> int:
    """Answer one NIAH probe (a smoke test of the model and the engine)."""
    from rhlens.engine import GenerationConfig, generate
    from rhlens.probes import ProbeConfig, build_probes
    from rhlens.stats import rouge1_recall

    config = ProbeConfig(lengths=(args.length,), depths=(args.depth,),
                         chat_template=not args.no_chat_template)
    shape = prepare.model_facts(args)
    probe = build_probes(prepare.tokenizer(args), config=config, haystack=args.haystack,
                         max_length=shape.n_ctx)[0]
    model, tok = prepare.load(args)
    gen = generate(model, tok, probe.prompt_ids,
                   config=GenerationConfig(max_new_tokens=args.max_new_tokens))
    say(f"question: {probe.question}\nexpected: {probe.real_needle}\nanswer:   {gen.response}\n"
        f"needle at depth {probe.placed_depth:g}% ({probe.n_tokens} prompt tokens)\n"
        f"ROUGE-1 recall: {rouge1_recall(probe.real_needle, gen.response):.2f}")
    return 0
