"""``rhlens show``: a few heads answering one probe of a detection run, as a standalone HTML page."""

from __future__ import annotations

import argparse
from pathlib import Path

from rhlens.cli import prepare
from rhlens.cli.args import add_model_args, positive_int, say
from rhlens.errors import ConfigError

__all__ = ["add_parsers", "cmd_show", "run_probe"]


def add_parsers(sub) -> None:
    p = sub.add_parser("show", help="an HTML view of heads answering one probe, step by step",
                       description="For each decode step of one probe of a detection run: the key "
                                   "each chosen head attended to most, its weight, whether it "
                                   "copied; the context around the needle, needle highlighted; a "
                                   "step control; the heads side by side. The answer traced is the "
                                   "one the run scored.")
    p.add_argument("run", metavar="RUN_DIR", help="a detection run (rhlens detect --out, make demo)")
    p.add_argument("--probe", default=None, metavar="KEY|N",
                   help="the probe: its key (e.g. len500-depth50-lighthouse-soup) or its index in "
                        "probes.jsonl (default: the first probe answered correctly)")
    p.add_argument("--heads", default="top:2,bottom:1", metavar="SPEC",
                   help="L.H,L.H (e.g. 18.6,3.1), top:K and bottom:K by the run's scores, "
                        "comma-separated (default top:2,bottom:1)")
    p.add_argument("--context", type=positive_int, default=48, metavar="N",
                   help="tokens of context shown on each side of the needle (default 48)")
    p.add_argument("--out", default=None, metavar="FILE.html",
                   help="where to write the page (default RUN_DIR/heads-<probe key>.html)")
    add_model_args(p)
    p.set_defaults(func=cmd_show)


def run_probe(run_dir: str | Path, which: str | None, tokenizer=None):
    """``(probe, answer_ids)`` of one probe of a detection run's ``probes.jsonl``; a needle
    that is not built in is expected as its span's text (``tokenizer`` decodes it)."""
    from rhlens.io import read_jsonl
    from rhlens.probe import Probe
    from rhlens.probes import BUILTIN_NEEDLES
    from rhlens.runs import RunDir

    log = RunDir(run_dir).probes
    if not log.exists():
        raise ConfigError(f"{run_dir} holds no probes.jsonl: give a detection run's --out")
    records = [r for r in read_jsonl(log) if isinstance(r, dict) and "prompt_ids" in r]
    if not records:
        raise ConfigError(f"{log} holds no finished probe")
    if which is None:
        rec = next((r for r in records if r.get("success")), records[0])
    elif which.isdigit():
        if int(which) >= len(records):
            raise ConfigError(f"--probe {which}: the run holds {len(records)} probes (0..{len(records) - 1})")
        rec = records[int(which)]
    else:
        found = [r for r in records if r.get("key") == which]
        if not found:
            keys = ", ".join(r["key"] for r in records[:4])
            raise ConfigError(f"--probe {which}: no such probe in {log} (e.g. {keys})")
        rec = found[0]
    needle = next((n for n in BUILTIN_NEEDLES if n.id == rec.get("needle_id")), None)
    expected = rec.get("real_needle") or (needle.real_needle if needle else "")
    if not expected and tokenizer is not None:
        start, end = rec["needle_span"]
        expected = tokenizer.decode(rec["prompt_ids"][start:end])
    probe = Probe(rec["prompt_ids"], rec["needle_span"], expected or "?",
                  length=rec.get("length", 0), depth=rec.get("depth", 0.0),
                  needle_id=rec.get("needle_id", "custom"),
                  question=rec.get("question") or (needle.question if needle else ""))
    return probe, rec["response_ids"]


def cmd_show(args: argparse.Namespace) -> int:
    from rhlens.trace import parse_heads, trace_heads
    from rhlens.views import head_view

    shape = prepare.model_facts(args)
    probe, answer = run_probe(args.run, args.probe, prepare.tokenizer(args))
    scores = prepare.scores(args.run, shape) if ("top:" in args.heads or "bottom:" in args.heads
                                                 or (Path(args.run) / "scores").exists()) else None
    heads = parse_heads(args.heads, scores)
    for la, h in heads:
        if not (0 <= la < shape.n_layers and 0 <= h < shape.n_heads):
            raise ConfigError(f"--heads: L{la}H{h} is outside the model's {shape.n_layers} layers x "
                              f"{shape.n_heads} heads")
    out = Path(args.out) if args.out else Path(args.run) / f"heads-{probe.key}.html"
    model, tok = prepare.load(args)
    trace = trace_heads(model, probe, heads, answer_ids=answer, tokenizer=tok, scores=scores,
                        context=args.context)
    head_view(trace).save(out)
    copied = ", ".join(f"L{la}H{h} {int(trace.copied[:, i].sum())}/{trace.n_steps}"
                       for i, (la, h) in enumerate(trace.heads))
    say(f"{probe.key}: steps copied from the needle: {copied}\nwrote {out} (open it in a browser)")
    return 0
