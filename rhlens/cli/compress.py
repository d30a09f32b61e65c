"""``rhlens compress``: NIAH against the KV budget, retrieval heads kept whole vs StreamingLLM and others."""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

from rhlens.cli import prepare
from rhlens.cli.args import (
    add_model_args,
    add_out_args,
    add_probe_args,
    draws,
    float_list,
    niah_config,
    nonnegative_int,
    positive_int,
    repeated,
    resume_note,
    say,
)

__all__ = ["add_parsers", "cmd_compress"]

MASS_FILE = "needle_mass.safetensors"  # the --needle-mass ranking, kept for a resumed run


def _budgets(text: str) -> tuple[float, ...]:
    values = float_list(lo=0.0, hi=1.0)(text)
    if min(values) <= 0:
        raise argparse.ArgumentTypeError(f"every budget is a share of the KV bytes in (0, 1], got {text!r}")
    if len(set(values)) != len(values):
        raise argparse.ArgumentTypeError(f"given twice: {repeated(values)}")
    return values


def _windows(text: str) -> tuple[int, ...]:
    values = [x.strip() for x in text.split(",") if x.strip()]
    if not values or not all(v.isdigit() and int(v) > 0 for v in values):
        raise argparse.ArgumentTypeError(f"windows are positive whole numbers, comma-separated, got {text!r}")
    if len(set(values)) != len(values):
        raise argparse.ArgumentTypeError(f"given twice: {repeated([int(v) for v in values])}")
    return tuple(int(v) for v in values)


def add_parsers(sub) -> None:
    p = sub.add_parser(
        "compress", help="NIAH against the KV budget: retrieval heads kept whole vs StreamingLLM "
                         "and random heads at equal bytes",
        description="Keep the full KV cache only for the best-ranked KV heads (the rest keep sink + "
                    "window tokens) and measure NIAH against the share of the KV bytes kept, "
                    "next to StreamingLLM, random heads and the full cache at the same budgets.")
    add_model_args(p)
    add_probe_args(p, lengths="2000", depths="10,30,50,70,90", max_new_tokens=50)
    p.add_argument("--scores", required=True, metavar="RUN_DIR|FILE",
                   help="the ranking: a detection run's --out, saved scores, or a paper-format JSON "
                        "file; checked against the model's layers x heads")
    p.add_argument("--budgets", type=_budgets, default=(0.1, 0.2, 0.3, 0.5), metavar="B,B,...",
                   help="shares of the full KV bytes at the longest probe's length, each in (0, 1], "
                        "comma-separated (default 0.1,0.2,0.3,0.5); one below the all-streaming "
                        "floor (every head keeping sink + window) is refused")
    p.add_argument("--seeds", type=draws(minimum=0), default=3, metavar="N",
                   help="random policies per budget, seeds 0..N-1 (default 3; 0: none)")
    p.add_argument("--no-streaming", action="store_true", help="leave StreamingLLM out")
    p.add_argument("--needle-mass", action="store_true",
                   help="also rank heads by their attention mass on the needle's answer while "
                        "answering (the 'mass' score family of rhlens scores), measured on the "
                        "detection run's lengths and depths with these needles")
    g = p.add_argument_group("cache policy")
    g.add_argument("--sink", type=nonnegative_int, default=4, metavar="N",
                   help="first tokens a streaming head keeps (default 4)")
    g.add_argument("--window", type=positive_int, default=124, metavar="N",
                   help="recent tokens a streaming head keeps (default 124)")
    g.add_argument("--pool", choices=("max", "mean"), default="max",
                   help="a KV head's score from its query heads' (default max)")
    g.add_argument("--choose-windows", type=_windows, default=None, metavar="W,W,...",
                   help="held out: run these windows on the 'choose' split of the packaged "
                        "needles, choose per budget the one whose ranked policy scores best there, "
                        "and report only it (with StreamingLLM, random heads, the full cache) on "
                        "the 'report' split (out/choose, out/report, out/heldout.json; not with "
                        "--split)")
    add_out_args(p)
    p.set_defaults(func=cmd_compress, interrupted=resume_note("answer"))


def _layout(args: argparse.Namespace):
    """The model's cache layout from its config and ``--dtype``, before any weight is read."""
    import torch

    from rhlens.compress.policy import CacheLayout
    from rhlens.models import hf_config

    itemsize = getattr(torch, args.dtype or "float32").itemsize
    return CacheLayout.from_config(hf_config(args.model, offline=args.offline), itemsize)


def _mass_probes(args: argparse.Namespace, tok, shape, scores, max_new_tokens: int):
    """The probes ``--needle-mass`` is measured on: the detection run's lengths and depths."""
    from rhlens.cli.args import needles, probe_config
    from rhlens.probes import build_probes
    from rhlens.retrieval import check_probes

    lengths = sorted({int(p["length"]) for p in scores.probes if "length" in p}) or [1000]
    depths = sorted({float(p["depth"]) for p in scores.probes if "depth" in p}) or [50.0]
    config = dataclasses.replace(probe_config(args), lengths=tuple(lengths), depths=tuple(depths))
    built = build_probes(tok, config=config, needles=needles(args), haystack=args.haystack,
                         max_length=shape.n_ctx)
    check_probes(built.probes, shape.n_ctx, max_new_tokens, name="--max-new-tokens")
    return built


def _check_mass_file(path: Path, grid: tuple[int, int]) -> None:
    """The kept ``--needle-mass`` ranking of a resumed run: one finite ``[layer, head]`` tensor."""
    from rhlens.errors import ConfigError
    from rhlens.validate import check_finite, input_file

    input_file(path, "the kept needle-mass ranking", hint="remove it or choose another --out")
    try:
        from safetensors.torch import load_file

        mass = load_file(path).get("mass")
    except Exception as exc:  # safetensors' own error for a damaged file
        raise ConfigError(f"{path} is damaged ({type(exc).__name__}: "
                          f"{str(exc).splitlines()[0] if str(exc) else ''}); remove it to measure "
                          "the needle mass again") from None
    if mass is None or tuple(mass.shape) != tuple(grid) or mass.dtype.is_floating_point is False:
        found = "no 'mass' tensor" if mass is None else f"a {tuple(mass.shape)} {mass.dtype} tensor"
        raise ConfigError(f"{path} holds {found}, expected a {grid[0]} x {grid[1]} float [layer, "
                          "head] tensor; remove it to measure the needle mass again")
    try:
        check_finite(mass, f"{path}: 'mass'")
    except ConfigError as exc:
        raise ConfigError(f"{exc}; remove the file to measure the needle mass again") from None


def _needle_mass(model, tok, probes, niah, out: Path):
    path = out / MASS_FILE
    if path.exists():
        from safetensors.torch import load_file

        return load_file(path)["mass"]
    from safetensors.torch import save_file

    from rhlens.compress.sweep import needle_attention_mass

    lengths = sorted({p.length for p in probes})
    depths = sorted({p.depth for p in probes})
    say(f"measuring needle attention mass on {len(lengths)} lengths x {len(depths)} depths ...")
    mass = needle_attention_mass(model, probes, niah=niah, tokenizer=tok)
    from rhlens.store.files import atomic_write

    atomic_write(path, lambda tmp: save_file({"mass": mass.contiguous()}, tmp))
    return mass


def cmd_compress(args: argparse.Namespace) -> int:
    import torch

    from rhlens.compress import CompressConfig
    from rhlens.compress.sweep import compress_sweep, sweep_policies
    from rhlens.report.runs import save_compress_run
    from rhlens.store.layout import COMPRESS_LOG

    config = CompressConfig(sink=args.sink, window=args.window, pool=args.pool)
    niah = niah_config(args)
    if args.choose_windows:
        return _heldout(args, config, niah)
    out = prepare.take_output(args)
    shape = prepare.model_facts(args)
    scores = prepare.scores(args.scores, shape)
    tok = prepare.tokenizer(args)
    probes = prepare.probes(args, tok, shape, max_new_tokens=niah.generation.max_new_tokens)
    context = max(p.n_tokens for p in probes)
    rankings = {"retrieval": scores}
    mass_probes = None
    if args.needle_mass:
        mass_probes = _mass_probes(args, tok, shape, scores, niah.generation.max_new_tokens)
        rankings["needle-mass"] = torch.zeros(shape.grid)  # a stand-in of its shape, for the checks
    # Every policy (a budget below the floor, a ranking that does not fit) is checked now.
    sweep_policies(_layout(args), context, rankings, args.budgets, args.seeds, config=config,
                   streaming=not args.no_streaming)
    prepare.check_resume(args, out, COMPRESS_LOG, probes, niah, compress=config.to_dict())
    if mass_probes is not None and (Path(out) / MASS_FILE).exists():
        _check_mass_file(Path(out) / MASS_FILE, shape.grid)  # a resume's ranking, before the weights
    model, tok = prepare.load(args)
    if mass_probes is not None:
        rankings["needle-mass"] = _needle_mass(model, tok, mass_probes, niah, out)
    say(f"sweeping {len(args.budgets)} budgets over {len(probes)} probes ({context} tokens) -> {out}")
    t = time.perf_counter()
    result = compress_sweep(model, probes, rankings, budgets=args.budgets, seeds=args.seeds,
                            streaming=not args.no_streaming, config=config, niah=niah,
                            tokenizer=tok, out=out, progress=not args.quiet)
    written = save_compress_run(out, result)
    prepare.record_split(args, out, probes, "the KV budget sweep")
    say(f"\nfull cache: NIAH {result.score('full'):.1f} ({time.perf_counter() - t:.0f} s this run)")
    _table(result)
    say("wrote: " + ", ".join(str(p) for p in written.values()))
    return 0


def _table(result) -> None:
    names = list(result.rankings)
    head = f"{'budget':>6} {'share':>6} {'heads':>7}" + "".join(f" {n:>11}" for n in names)
    head += " {:>10}".format("streaming") if result.has_streaming else ""
    head += " {:>13}".format("random") if result.seeds else ""
    say(head)
    for r in result.table():
        line = f"{r['budget']:6.2f} {r['share']:6.3f} {r['full_kv_heads']:>3}/{r['of_kv_heads']:<3}"
        line += "".join(f" {r[n]:11.1f}" for n in names)
        if result.has_streaming:
            line += f" {r['streaming']:10.1f}"
        if result.seeds:
            line += f" {r['random_mean']:6.1f} ± {r['random_std']:4.1f}"
        say(line)


def _heldout(args: argparse.Namespace, config, niah) -> int:
    """``--choose-windows``: choose the window per budget on one split, report on the other."""
    from rhlens.compress.heldout import heldout_compress
    from rhlens.compress.sweep import sweep_policies
    from rhlens.errors import ConfigError

    if args.split:
        raise ConfigError("--choose-windows chooses on the 'choose' split and reports on the 'report' "
                          "split: drop --split")
    if args.needle_mass:
        raise ConfigError("--choose-windows ranks by --scores only: drop --needle-mass")
    out = prepare.take_output(args)
    shape = prepare.model_facts(args)
    scores = prepare.scores(args.scores, shape)
    tok = prepare.tokenizer(args)
    built = {s: prepare.probes(argparse.Namespace(**{**vars(args), "split": s}), tok, shape,
                               max_new_tokens=niah.generation.max_new_tokens) for s in ("choose", "report")}
    layout = _layout(args)
    for probes in built.values():
        context = max(p.n_tokens for p in probes)
        for w in args.choose_windows:  # every window fits every budget, before any compute
            sweep_policies(layout, context, {"retrieval": scores}, args.budgets, args.seeds,
                           config=dataclasses.replace(config, window=w))
    model, tok = prepare.load(args)
    say(f"choosing the window ({', '.join(map(str, args.choose_windows))}) per budget on "
        f"{len(built['choose'])} probes, reporting on {len(built['report'])} -> {out}")
    records = {s: {"needles": sorted({p.needle_id for p in b}), "haystack": b.haystack,
                   "n_probes": len(b)} for s, b in built.items()}
    doc = heldout_compress(model, built["choose"].probes, built["report"].probes, {"retrieval": scores},
                           budgets=args.budgets, windows=args.choose_windows, seeds=args.seeds,
                           config=config, out=out, splits=records, niah=niah, tokenizer=tok,
                           progress=not args.quiet)
    say(f"{'budget':>6} {'window':>6} {'choose: x full':>15} {'report: x full':>15} {'streaming':>9} "
        f"{'random':>7}")
    for r in doc["rows"]:
        say(f"{r['budget']:6.2f} {r['window']:>6} {r['choose']['vs_full']:15.3f} "
            f"{r['report']['vs_full']:15.3f} {r['report'].get('streaming', float('nan')):9.1f} "
            f"{r['report'].get('random_mean', float('nan')):7.1f}")
    say(f"wrote: {Path(out) / 'heldout.json'}")
    return 0
