"""``rhlens patch``: causal head patching on needle-in-a-haystack pairs."""

from __future__ import annotations

import argparse
import time

from rhlens.cli import prepare
from rhlens.cli.args import (
    Renamed,
    add_model_args,
    add_out_args,
    add_probe_args,
    int_list,
    patch_config,
    positive_int,
    resume_note,
    say,
)
from rhlens.errors import ConfigError

__all__ = ["add_parsers", "add_patch_parser", "cmd_patch"]


def add_parsers(sub) -> None:
    add_patch_parser(sub)


def add_patch_parser(sub) -> argparse.ArgumentParser:
    """Add the ``patch`` subcommand to ``sub`` (what ``add_subparsers`` returns)."""
    p = sub.add_parser("patch", help="causal head patching: which heads carry the needle to the answer",
                       description="Patch each head's output between clean and corrupted "
                                   "needles and measure how much of the answer it carries.")
    add_model_args(p)
    add_probe_args(p, lengths="500", depths="50", answer_buffer=100, max_new_tokens=None)
    p.add_argument("--kind", choices=("swap", "remove"), default="swap",
                   help="swap: the needle's answer changed to another of the same length; "
                        "remove: the needle replaced by neutral filler")
    p.add_argument("--answer-prefix", choices=("needle", "model", "none"), default="needle",
                   help="reply fed before the answer: the needle's words (default), the model's "
                        "own reply, or nothing")
    p.add_argument("--method", "--mode", dest="mode", action=Renamed, old=("--mode",),
                   choices=("exact", "attribution"), default="exact",
                   help="exact: one patched run per head; attribution: one forward+backward per "
                        "pair (default exact; --mode is the deprecated spelling)")
    p.add_argument("--direction", choices=("denoise", "noise"), default="denoise",
                   help="denoise: clean z into the corrupted run; noise: corrupted z into the clean run")
    p.add_argument("--positions", choices=("answer", "all"), default="answer",
                   help="patch only the answer positions (default) or every position")
    p.add_argument("--metric", choices=("logit_diff", "logprob"), default="logit_diff",
                   help="logit_diff: clean minus corrupted answer-token logit (default); "
                        "logprob: summed log-prob of the clean answer")
    p.add_argument("--layers", type=int_list(minimum=0), default=None, metavar="L,L,...",
                   help="patch only these layers (default: all)")
    p.add_argument("--heads", default=None, metavar="L.H,L.H,...",
                   help="patch only these heads (not with --layers)")
    p.add_argument("--activation", default="z", metavar="NAME",
                   help="the per-head activation patched: z (default, the head's output), q, k, v, "
                        "pattern, result, ov (own pattern x clean values), or names joined by + "
                        "(q+k: where the head looks)")
    p.add_argument("--batch-size", type=positive_int, default=None, metavar="N",
                   help="patched copies per forward (default: one layer's heads)")
    p.add_argument("--scores", default=None, metavar="RUN_DIR|FILE",
                   help="retrieval scores (detection run dir, saved scores, or paper JSON): "
                        "adds the effect-vs-score comparison and scatter")
    p.add_argument("--top", type=positive_int, default=10, metavar="N",
                   help="heads to list (default 10)")
    add_out_args(p)
    p.set_defaults(func=cmd_patch, interrupted=_interrupted)
    return p


def _interrupted(args: argparse.Namespace) -> str:
    return resume_note("pair")(args)


def _check_batch_size(config, shape) -> None:
    """``--batch-size`` at most the heads patched per pair: a batch holds one patched copy of
    the pair per head, so a larger one can never fill (and a huge one is a typo)."""
    from rhlens.patching.config import kv_indexed

    width = (shape.n_kv_heads or shape.n_heads) if kv_indexed(config.atoms) else shape.n_heads
    if config.heads is not None:
        cells, which = len(config.heads), "--heads"
    elif config.layers is not None:
        cells, which = len(config.layers) * width, f"--layers: {len(config.layers)} x {width}"
    else:
        cells, which = shape.n_layers * width, f"every head: {shape.n_layers} x {width}"
    if config.batch_size > cells:
        raise ConfigError(f"--batch-size {config.batch_size} is more than the {cells} heads patched "
                          f"per pair ({which}); a batch holds one patched copy per head: give at "
                          f"most {cells}")


def cmd_patch(args: argparse.Namespace) -> int:
    from rhlens.patching import make_pairs, patch_heads, patching_vs_retrieval
    from rhlens.plotting.patching import plot_patching_heatmap, plot_patching_vs_retrieval
    from rhlens.report.runs import save_figure
    from rhlens.store.layout import RunDir

    # Everything that can fail on a typo fails here, before the model loads.
    out = prepare.take_output(args)
    config = patch_config(args)
    shape = prepare.model_facts(args)
    if config.layers is not None and max(config.layers) >= shape.n_layers:
        raise ConfigError(f"--layers {','.join(map(str, config.layers))}: the model has layers "
                          f"0..{shape.n_layers - 1}")
    if config.batch_size is not None:
        _check_batch_size(config, shape)
    scores = prepare.scores(args.scores, shape)
    probes = prepare.probes(args, prepare.tokenizer(args), shape)
    prepare.check_records(args, out, "patching.jsonl", config)  # a resume's records, before the weights
    model, tok = prepare.load(args)
    needs_model = args.answer_prefix == "model" or args.kind == "remove"
    pairs = make_pairs(tok, probes, kind=args.kind, answer_prefix=args.answer_prefix,
                       model=model if needs_model else None)
    say(f"patching {len(pairs)} pairs ({args.kind}, {config.mode}, {config.direction}, "
        f"positions={config.positions}, metric={config.metric}) -> {out}")
    t = time.perf_counter()
    result = patch_heads(model, pairs, config=config, progress=not args.quiet, out=out)
    wall = time.perf_counter() - t
    if not prepare.is_main():  # under torchrun, rank 0 writes the outputs
        return 0

    run = RunDir(out)
    written = [result.save(run.patching), save_figure(plot_patching_heatmap(result), run.patching_figure)]
    say(f"\nclean vs corrupted {config.metric}, per pair:")
    for rec, c, r in zip(result.pairs, result.clean.tolist(), result.corrupted.tolist()):
        say(f"  [{rec.get('key', '?')}] clean {c:7.3f}  corrupted {r:7.3f}  "
            f"({rec.get('clean_answer')!r} vs {rec.get('corrupted_answer')!r})")
    say(f"top {args.top} heads by {config.direction} effect (1 = carries it all), (layer, head):")
    for la, h, e in result.top(args.top):
        say(f"  L{la:>2} H{h:>2}: {e:6.3f}")
    say(f"{wall:.1f} s in all, {wall / max(1, len(pairs)):.1f} s per pair")
    if scores is not None:
        cmp = patching_vs_retrieval(result, scores)
        written.append(cmp.save(run.patching_vs_retrieval))
        written.append(save_figure(plot_patching_vs_retrieval(cmp), run.patching_vs_retrieval_figure))
        say(f"effect vs retrieval score over {int(cmp.effect.isfinite().sum())} heads: "
            f"Spearman {cmp.spearman:.3f}, Pearson {cmp.pearson:.3f}")
        for title, rows in (("causal but not retrieval", cmp.causal_not_retrieval),
                            ("retrieval but not causal", cmp.retrieval_not_causal)):
            shown = ", ".join(f"L{la}H{h} ({e:.2f}, {s:.2f})" for la, h, e, s in rows[:8]) or "none"
            say(f"  {title} (effect, score): {shown}")
    say("wrote: " + ", ".join(str(p) for p in written))
    return 0
