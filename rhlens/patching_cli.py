"""``rhlens patch``: causal head patching on needle-in-a-haystack pairs, from the command line.

Wired into ``rhlens.cli`` with ``add_patch_parser(sub)``; ``cmd_patch(args)`` only parses into
configs, calls :mod:`rhlens.patching`, saves and reports.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

__all__ = ["add_patch_parser", "cmd_patch"]


def _say(msg: str) -> None:
    print(msg, flush=True)  # noqa: T201 - the CLI's job is to talk


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from exc


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from exc


def add_patch_parser(sub) -> argparse.ArgumentParser:
    """Add the ``patch`` subcommand to ``sub`` (what ``add_subparsers`` returns)."""
    p = sub.add_parser("patch", help="causal head patching: which heads carry the needle to the answer")
    p.add_argument("--model", default=None,
                   help="packaged model (default: smollm2-135m; or gemma-3-270m), a .gguf file, "
                        "a local HF folder, or a hub id")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--dtype", default=None, help="float32 (default), bfloat16, float16")
    p.add_argument("--lengths", type=_ints, default=(500,),
                   help="probe lengths in tokens (prompt + answer buffer), comma-separated (default 500)")
    p.add_argument("--depths", type=_floats, default=(50.0,),
                   help="needle depths in percent, comma-separated (default 50)")
    p.add_argument("--answer-buffer", type=int, default=100,
                   help="tokens of each length kept free for the answer (default 100)")
    p.add_argument("--needles", default=None, help="JSONL file of {needle, question, real_needle}")
    p.add_argument("--n-needles", type=int, default=None, help="use only the first N needles")
    p.add_argument("--haystack", default=None,
                   help="directory of .txt files, 'stdlib' (default) or 'synthetic'")
    p.add_argument("--no-chat-template", action="store_true", help="plain prompt, no chat template")
    p.add_argument("--kind", choices=("swap", "remove"), default="swap",
                   help="swap: the needle's answer changed to another of the same length; "
                        "remove: the needle replaced by neutral filler")
    p.add_argument("--answer-prefix", choices=("needle", "model", "none"), default="needle",
                   help="reply fed before the answer: the needle's words (default), the model's "
                        "own reply, or nothing")
    p.add_argument("--mode", choices=("exact", "attribution"), default="exact",
                   help="exact: one patched run per head; attribution: one forward+backward per pair")
    p.add_argument("--direction", choices=("denoise", "noise"), default="denoise",
                   help="denoise: clean z into the corrupted run; noise: corrupted z into the clean run")
    p.add_argument("--positions", choices=("answer", "all"), default="answer",
                   help="patch only the answer positions (default) or every position")
    p.add_argument("--metric", choices=("logit_diff", "logprob"), default="logit_diff")
    p.add_argument("--layers", type=_ints, default=None, help="patch only these layers")
    p.add_argument("--batch-size", type=int, default=None,
                   help="patched copies per forward (default: one layer's heads)")
    p.add_argument("--scores", default=None,
                   help="retrieval scores (detection run dir, saved scores, or paper JSON): "
                        "adds the effect-vs-score comparison and scatter")
    p.add_argument("--top", type=int, default=10, help="heads to list (default 10)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_patch)
    return p


def cmd_patch(args) -> int:
    from rhlens.errors import ConfigError
    from rhlens.models import load_model
    from rhlens.patching import PatchConfig, make_pairs, patch_heads, patching_vs_retrieval
    from rhlens.plotting.patching import plot_patching_heatmap, plot_patching_vs_retrieval
    from rhlens.probes import BUILTIN_NEEDLES, ProbeConfig, build_probes, load_needles
    from rhlens.runs import save_figure
    from rhlens.scores import RetrievalScores

    # Everything that can fail on a typo fails here, before the model loads.
    config = PatchConfig(mode=args.mode, direction=args.direction, positions=args.positions,
                         metric=args.metric, layers=args.layers, batch_size=args.batch_size)
    scores = RetrievalScores.from_any(args.scores) if args.scores else None
    probe_config = ProbeConfig(lengths=args.lengths, depths=args.depths,
                               answer_buffer=args.answer_buffer,
                               chat_template=not args.no_chat_template)
    needles = load_needles(args.needles) if args.needles else list(BUILTIN_NEEDLES)
    if args.n_needles:
        needles = needles[: args.n_needles]

    _say(f"loading {args.model or 'the default model (SmolLM2-135M-Instruct)'} ...")
    t = time.perf_counter()
    model, tok = load_model(args.model, device=args.device, dtype=args.dtype)
    _say(f"  loaded in {time.perf_counter() - t:.1f} s: {model.cfg.n_layers} layers x "
         f"{model.cfg.n_heads} heads")
    grid = (int(model.cfg.n_layers), int(model.cfg.n_heads))
    if scores is not None and (scores.n_layers, scores.n_heads) != grid:
        raise ConfigError(f"--scores covers {scores.n_layers} layers x {scores.n_heads} heads, the "
                          f"model {grid[0]} x {grid[1]}: scores of another model?")
    probes = build_probes(tok, config=probe_config, needles=needles, haystack=args.haystack,
                          max_length=getattr(model.cfg, "n_ctx", None))
    needs_model = args.answer_prefix == "model" or args.kind == "remove"
    pairs = make_pairs(tok, probes, kind=args.kind, answer_prefix=args.answer_prefix,
                       model=model if needs_model else None)
    _say(f"patching {len(pairs)} pairs ({args.kind}, {config.mode}, {config.direction}, "
         f"positions={config.positions}, metric={config.metric}) -> {args.out}")
    t = time.perf_counter()
    result = patch_heads(model, pairs, config=config, progress=not args.quiet)
    wall = time.perf_counter() - t

    out = Path(args.out)
    result.save(out / "patching")
    written = [out / "patching", save_figure(plot_patching_heatmap(result), out / "patching_heatmap.png")]
    _say(f"\nclean vs corrupted {config.metric}, per pair:")
    for rec, c, r in zip(result.pairs, result.clean.tolist(), result.corrupted.tolist()):
        _say(f"  [{rec.get('key', '?')}] clean {c:7.3f}  corrupted {r:7.3f}  "
             f"({rec.get('clean_answer')!r} vs {rec.get('corrupted_answer')!r})")
    _say(f"top {args.top} heads by {config.direction} effect (1 = carries it all), (layer, head):")
    for la, h, e in result.top(args.top):
        _say(f"  L{la:>2} H{h:>2}: {e:6.3f}")
    _say(f"{wall:.1f} s in all, {wall / max(1, len(pairs)):.1f} s per pair")
    if scores is not None:
        cmp = patching_vs_retrieval(result, scores)
        written.append(cmp.save(out / "patching_vs_retrieval.json"))
        written.append(save_figure(plot_patching_vs_retrieval(cmp), out / "patching_vs_retrieval.png"))
        _say(f"effect vs retrieval score over {int(cmp.effect.isfinite().sum())} heads: "
             f"Spearman {cmp.spearman:.3f}, Pearson {cmp.pearson:.3f}")
        for title, rows in (("causal but not retrieval", cmp.causal_not_retrieval),
                            ("retrieval but not causal", cmp.retrieval_not_causal)):
            shown = ", ".join(f"L{la}H{h} ({e:.2f}, {s:.2f})" for la, h, e, s in rows[:8]) or "none"
            _say(f"  {title} (effect, score): {shown}")
    _say("wrote: " + ", ".join(str(p) for p in written))
    return 0
