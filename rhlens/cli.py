"""The ``rhlens`` command: parse arguments into configs, call the library, save, say where.

Every subcommand is a thin composition of functions a notebook can call directly.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from rhlens.errors import RhlensError

__all__ = ["main"]


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from exc


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from exc


def _say(msg: str) -> None:
    print(msg, flush=True)  # noqa: T201 - the CLI's job is to talk


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="packaged model (default: smollm2-135m; or gemma-3-270m), a .gguf file, "
                        "a local HF folder, or a hub id")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--dtype", default=None, help="float32 (default), bfloat16, float16")


def _add_probe_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--lengths", type=_ints, default=None,
                   help="context lengths in tokens, comma-separated (default 500,1000,1500,2000)")
    p.add_argument("--length-range", type=float, nargs=3, metavar=("MIN", "MAX", "COUNT"),
                   help="COUNT lengths evenly spaced from MIN to MAX (the paper's grid)")
    p.add_argument("--depths", type=_floats, default=None,
                   help="needle depths in percent, comma-separated (default 0,25,50,75,100)")
    p.add_argument("--depth-count", type=int, default=None,
                   help="COUNT depths evenly spaced from 0 to 100")
    p.add_argument("--needles", default=None, help="JSONL file of {needle, question, real_needle}")
    p.add_argument("--n-needles", type=int, default=None,
                   help="use only the first N needles (built-in or from --needles)")
    p.add_argument("--haystack", default=None,
                   help="directory of .txt files, 'stdlib' (default: Python's docstrings) or 'synthetic'")
    p.add_argument("--no-chat-template", action="store_true", help="plain prompt, no chat template")
    p.add_argument("--max-new-tokens", type=int, default=50)


def _probe_set(args, tokenizer, model=None):
    from rhlens.probes import BUILTIN_NEEDLES, ProbeConfig, build_probes, load_needles

    kw = {}
    if args.length_range:
        lo, hi, n = args.length_range
        kw["lengths"] = ProbeConfig.linspace(lo, hi, int(n))
    elif args.lengths:
        kw["lengths"] = args.lengths
    if args.depth_count:
        kw["depths"] = ProbeConfig.linspace(0, 100, args.depth_count, integer=False)
    elif args.depths:
        kw["depths"] = args.depths
    config = ProbeConfig(chat_template=not args.no_chat_template, **kw)
    needles = load_needles(args.needles) if args.needles else list(BUILTIN_NEEDLES)
    if args.n_needles:
        needles = needles[: args.n_needles]
    max_len = getattr(getattr(model, "cfg", None), "n_ctx", None)
    return build_probes(tokenizer, config=config, needles=needles, haystack=args.haystack,
                        max_length=max_len)


def _load(args):
    from rhlens.models import load_model

    _say(f"loading {args.model or 'the default model (SmolLM2-135M-Instruct)'} ...")
    t = time.perf_counter()
    model, tok = load_model(args.model, device=args.device, dtype=args.dtype)
    _say(f"  loaded in {time.perf_counter() - t:.1f} s: {model.cfg.n_layers} layers x "
         f"{model.cfg.n_heads} heads")
    return model, tok


# ---------------------------------------------------------------------------------------
def cmd_detect(args) -> int:
    from rhlens.retrieval import DetectConfig, detect_retrieval_heads
    from rhlens.runs import save_detection_run

    model, tok = _load(args)
    probes = _probe_set(args, tok, model)
    config = DetectConfig(mode=args.mode, max_new_tokens=args.max_new_tokens,
                          prefill_chunk=args.prefill_chunk)
    _say(f"detecting over {len(probes)} probes "
         f"({len(probes.config.lengths)} lengths x {len(probes.config.depths)} depths x "
         f"{len(probes.needles)} needles) -> {args.out}")
    t = time.perf_counter()
    scores = detect_retrieval_heads(model, probes, config=config, tokenizer=tok, out=args.out,
                                    progress=not args.quiet)
    wall = time.perf_counter() - t
    written = save_detection_run(args.out, scores, wall_seconds=wall)
    _say(f"\n{scores.n_successful}/{scores.n_probes} probes answered correctly "
         f"({wall:.0f} s this run)")
    for p in scores.probes[: min(3, len(scores.probes))]:
        _say(f"  [{p['key']}] recall {p['rouge_recall']:.2f}: {p['response'][:100]!r}")
    if scores.n_successful:
        _say(f"top heads ({args.mode} mode), (layer, head): score")
        for la, h, s in scores.top(10):
            _say(f"  L{la:>2} H{h:>2}: {s:.3f}")
        _say(f"{100 * scores.fraction_above(0.1):.1f}% of heads score above 0.1")
    _say("wrote: " + ", ".join(str(p) for p in written.values()))
    return 0


def cmd_ask(args) -> int:
    """Answer one NIAH probe (a smoke test of the model and the engine)."""
    from rhlens.engine import GenerationConfig, generate
    from rhlens.probes import ProbeConfig, build_probes
    from rhlens.retrieval import rouge1_recall

    model, tok = _load(args)
    probes = build_probes(tok, config=ProbeConfig(lengths=(args.length,), depths=(args.depth,)),
                          needles=None)
    probe = probes[0]
    gen = generate(model, tok, probe.prompt_ids, config=GenerationConfig(max_new_tokens=40))
    _say(f"question: {probe.question}\nexpected: {probe.real_needle}\nanswer:   {gen.response}\n"
         f"ROUGE-1 recall: {rouge1_recall(probe.real_needle, gen.response):.2f}")
    return 0


def _parse_mask(spec: str, scores, mode: str, phase: str):
    """``none``, ``top:K``, ``random:K[:seed]`` or ``heads:L.H,L.H``."""
    from rhlens.ablation import Mask
    from rhlens.errors import ConfigError

    kind, _, rest = spec.partition(":")
    if kind == "none":
        return Mask((), mode, phase, label="none")
    if kind == "heads":
        try:
            heads = tuple(tuple(int(x) for x in item.split(".")) for item in rest.split(","))
        except ValueError as exc:
            raise ConfigError(f"--mask heads:L.H,L.H expected, got {spec!r}") from exc
        return Mask(heads, mode, phase, label=spec)
    if kind not in ("top", "random"):
        raise ConfigError(f"--mask must be none, top:K, random:K[:seed] or heads:L.H,..., got {spec!r}")
    if scores is None:
        raise ConfigError(f"--mask {spec} needs --scores (a detection run or a paper JSON file)")
    parts = rest.split(":")
    try:
        k = int(parts[0])
        seed = int(parts[1]) if len(parts) > 1 else 0
    except ValueError as exc:
        raise ConfigError(f"cannot read K/seed in --mask {spec!r}") from exc
    if kind == "top":
        return Mask(tuple(scores.top_heads(k)), mode, phase, label=f"top-{k}")
    banned = sorted(set(scores.retrieval_heads(0.1)) | set(scores.top_heads(k)))
    return Mask(tuple(scores.random_heads(k, seed=seed, exclude=banned)), mode, phase,
                label=f"random-{k}-s{seed}")


def _means_if_needed(args, model, tok, probes):
    if args.mode != "mean":
        return None
    from rhlens.ablation import head_means

    return head_means(model, tok, [p.prompt_ids for p in list(probes)[:4]])


def cmd_niah(args) -> int:
    from rhlens.niah import NIAHConfig, niah_sweep
    from rhlens.runs import save_niah_run
    from rhlens.scores import RetrievalScores

    scores = RetrievalScores.from_any(args.scores) if args.scores else None
    specs = args.mask or ["none"]
    model, tok = _load(args)
    masks = [_parse_mask(s, scores, args.mode, args.phase) for s in specs]
    probes = _probe_set(args, tok, model)
    config = NIAHConfig(max_new_tokens=args.max_new_tokens)
    result = niah_sweep(model, probes, masks=masks, config=config, tokenizer=tok,
                        means=_means_if_needed(args, model, tok, probes), out=args.out,
                        progress=not args.quiet)
    written = save_niah_run(args.out, result)
    for label, score in result.table().items():
        _say(f"  {label:>20}: NIAH {score:5.1f}   {result.class_counts(label)}")
    _say("wrote: " + ", ".join(str(p) for p in written.values()))
    return 0


def cmd_mask_sweep(args) -> int:
    from rhlens.niah import NIAHConfig, mask_sweep
    from rhlens.runs import save_mask_sweep_run
    from rhlens.scores import RetrievalScores

    scores = RetrievalScores.from_any(args.scores)
    model, tok = _load(args)
    probes = _probe_set(args, tok, model)
    sweep = mask_sweep(model, probes, scores, ks=args.ks, seeds=args.seeds, mode=args.mode,
                       phase=args.phase, config=NIAHConfig(max_new_tokens=args.max_new_tokens),
                       tokenizer=tok, means=_means_if_needed(args, model, tok, probes),
                       out=args.out, progress=not args.quiet)
    written = save_mask_sweep_run(args.out, sweep)
    kmax = max(sweep.ks)
    c = sweep.curve()
    _say(f"{'K':>4} {'top-K':>7} {'random-K (mean ± std)':>24}")
    for k, t, m, s in zip(c["k"], c["top"], c["random_mean"], c["random_std"]):
        _say(f"{k:>4} {t:7.1f} {m:15.1f} ± {s:4.1f}")
    _say(f"top-K drops below 50 at K = {sweep.k_below(50.0)}")
    for ex in sweep.niah.examples(f"top-{kmax}", n=3):
        _say(f"  [{ex['key']}] unmasked: {ex['unmasked'][:80]!r}\n"
             f"  {'':>{len(ex['key']) + 2}} masked:   {ex['masked'][:80]!r}")
    _say("wrote: " + ", ".join(str(p) for p in written.values()))
    return 0


def cmd_cot(args) -> int:
    from rhlens.ablation import Mask
    from rhlens.cot.experiment import CoTConfig, cot_ablation
    from rhlens.cot.tasks import get_task
    from rhlens.niah import sweep_masks
    from rhlens.plotting import plot_cot_bars
    from rhlens.runs import save_figure
    from rhlens.scores import RetrievalScores

    tasks = [get_task(t) for t in args.task]
    if args.n_items:
        tasks = [t.head(args.n_items) for t in tasks]
    if args.k > 0 and not args.scores:
        from rhlens.errors import ConfigError

        raise ConfigError("--k > 0 needs --scores (a detection run or a paper JSON file)")
    model, tok = _load(args)
    if args.k > 0:
        scores = RetrievalScores.from_any(args.scores)
        masks = sweep_masks(scores, ks=[args.k], seeds=args.seeds, mode=args.mode)
    else:
        masks = [Mask.none()]
    config = CoTConfig(max_new_tokens_cot=args.max_new_tokens_cot,
                       max_new_tokens_direct=args.max_new_tokens_direct)
    results = []
    for task in tasks:
        res = cot_ablation(model, task, masks=masks, config=config, tokenizer=tok,
                           out=args.out, progress=not args.quiet)
        res.save(args.out)
        results.append(res)
        _say(f"\n{task.name} ({task.kind}, {len(task)} items)")
        _say(f"  {'mask':>10} {'mode':>6}  accuracy [95% CI]      drop [95% CI]")
        for row in res.table():
            drop = (f"{100 * row['drop']:+6.1f} [{100 * row['drop_low']:+.0f}, "
                    f"{100 * row['drop_high']:+.0f}]") if "drop" in row else ""
            _say(f"  {row['mask']:>10} {row['mode']:>6}  {100 * row['accuracy']:5.1f} "
                 f"[{100 * row['low']:4.0f}, {100 * row['high']:4.0f}]   {drop}")
    save_figure(plot_cot_bars(results), Path(args.out) / "cot_bars.png")
    _say(f"wrote {args.out}/cot_*.json, cot_*.jsonl, cot_bars.png")
    return 0


def _add_mask_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--mode", choices=("uniform", "zero", "mean"), default="uniform",
                   help="uniform: zero the query (the paper's mask); zero: zero z; mean: mean z")
    p.add_argument("--phase", choices=("decode", "all"), default="decode",
                   help="decode: mask only while answering (the paper); all: prefill too")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rhlens", description="Find, knock out and patch retrieval heads (Wu et al., 2024).")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("detect", help="score every head on needle-in-a-haystack probes")
    _add_model_args(p)
    _add_probe_args(p)
    p.add_argument("--mode", choices=("unique", "paper"), default="unique",
                   help="unique: distinct needle tokens copied (<= 1); paper: the authors' count")
    p.add_argument("--prefill-chunk", type=int, default=None,
                   help="prefill long prompts this many tokens at a time")
    p.add_argument("--out", required=True, help="output directory (rerun to resume)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_detect)

    p = sub.add_parser("ask", help="answer one needle-in-a-haystack probe")
    _add_model_args(p)
    p.add_argument("--length", type=int, default=600)
    p.add_argument("--depth", type=float, default=50.0)
    p.set_defaults(func=cmd_ask)
    p = sub.add_parser("niah", help="needle-in-a-haystack scores under head masks")
    _add_model_args(p)
    _add_probe_args(p)
    _add_mask_args(p)
    p.add_argument("--scores", default=None, help="detection run dir or paper-format JSON")
    p.add_argument("--mask", action="append",
                   help="none | top:K | random:K[:seed] | heads:L.H,L.H (repeatable)")
    p.add_argument("--out", required=True)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_niah)

    p = sub.add_parser("mask-sweep", help="NIAH score against K: top-K vs random-K heads masked")
    _add_model_args(p)
    _add_probe_args(p)
    _add_mask_args(p)
    p.add_argument("--scores", required=True, help="detection run dir or paper-format JSON")
    p.add_argument("--ks", type=_ints, default=(0, 2, 5, 10, 20))
    p.add_argument("--seeds", type=int, default=3, help="random masks per K")
    p.add_argument("--out", required=True)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_mask_sweep)

    p = sub.add_parser("cot", help="chain of thought vs direct answers under retrieval-head masks")
    _add_model_args(p)
    p.add_argument("--task", action="append", required=True,
                   help="built-in task name or a GSM8K/MMLU/MuSiQue file (repeatable)")
    p.add_argument("--scores", default=None, help="detection run dir or paper-format JSON")
    p.add_argument("--k", type=int, default=20, help="mask the top-K heads (and K random)")
    p.add_argument("--seeds", type=int, default=3, help="random-K masks")
    p.add_argument("--mode", choices=("uniform", "zero"), default="uniform")
    p.add_argument("--n-items", type=int, default=None, help="only the first N items per task")
    p.add_argument("--max-new-tokens-cot", type=int, default=160)
    p.add_argument("--max-new-tokens-direct", type=int, default=24)
    p.add_argument("--out", required=True)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_cot)

    from rhlens.patching_cli import add_patch_parser

    add_patch_parser(sub)
    _add_report_parser(sub)
    return parser


def _add_report_parser(sub) -> None:
    p = sub.add_parser(
        "report", help="one self-contained HTML report (and a Markdown twin) of run directories",
        description="Gather the saved detection, NIAH, mask-sweep, patching and CoT results of "
                    "run directories, plus paper-format score files, into report.html + report.md.")
    p.add_argument("runs", nargs="*", metavar="RUN_DIR", help="run directories (--out of a command)")
    p.add_argument("--official", nargs="+", action="extend", default=[], metavar="FILE",
                   help="paper-format JSON score files, or folders of them (repeatable)")
    p.add_argument("--out", default="report.html",
                   help="the HTML file (a directory: DIR/report.html); the Markdown twin gets "
                        "the same name with .md (default report.html)")
    p.add_argument("--title", default=None, help="the report's title")
    p.add_argument("--top", type=int, default=20, help="rows of the top-heads tables (default 20)")
    p.set_defaults(func=cmd_report)


def cmd_report(args) -> int:
    """Write ``--out`` (HTML) and its ``.md`` twin, then say where they are."""
    from rhlens.errors import ConfigError
    from rhlens.report import build_report

    if not args.runs and not args.official:
        raise ConfigError("give at least one RUN_DIR or --official FILE")
    names = ", ".join(Path(p).name or str(p) for p in args.runs) or "official scores"
    report = build_report(args.runs, official=args.official, top=args.top,
                          title=args.title or f"rhlens report: {names}")
    out = Path(args.out)
    if out.is_dir():
        out = out / "report.html"
    html_path = out if out.suffix.lower() in (".html", ".htm") else out.with_suffix(".html")
    md_path = html_path.with_suffix(".md")
    report.to_html(html_path)
    report.to_markdown(md_path)
    n_sections = sum(1 for _ in report.walk())
    _say(f"wrote {html_path} ({n_sections} sections, {len(report.images())} figures) "
         f"and {md_path} (figures in {md_path.parent / (md_path.stem + '_files')})")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except RhlensError as exc:
        _say(f"rhlens: error: {exc}")
        return 2
    except FileNotFoundError as exc:
        _say(f"rhlens: error: {exc}")
        return 2
    except KeyboardInterrupt:
        out = getattr(args, "out", None)
        _say("\ninterrupted" + (f"; rerun the same command to resume from {out}" if out else ""))
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
