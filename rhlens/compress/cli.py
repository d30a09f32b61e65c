"""``rhlens compress``: NIAH against the KV budget for head-selective caches, from the command line.

To be wired into the ``rhlens`` command with ``add_compress_parser(sub)``; ``cmd_compress(args)``
only parses into configs, calls :mod:`rhlens.compress`, saves and reports::

    rhlens compress --scores runs/detect --budgets 0.1,0.2,0.3,0.5 --out runs/compress
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

__all__ = ["add_compress_parser", "cmd_compress"]


def _say(msg: str) -> None:
    print(msg, flush=True)  # noqa: T201 - the CLI's job is to talk


def _numbers(kind: type, what: str):
    def parse(text: str) -> tuple:
        try:
            return tuple(kind(x) for x in text.split(",") if x.strip())
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"expected comma-separated {what}, got {text!r}") from exc

    return parse


def add_compress_parser(sub) -> argparse.ArgumentParser:
    """Add the ``compress`` subcommand to ``sub`` (what ``add_subparsers`` returns)."""
    p = sub.add_parser(
        "compress", help="NIAH against the KV budget: retrieval heads kept whole vs StreamingLLM "
                         "and random heads at equal bytes",
        description="Keep the full KV cache only for the best-ranked KV heads (the rest keep sink + "
                    "window tokens) and measure NIAH against the share of the KV bytes kept, "
                    "next to StreamingLLM, random heads and the full cache at the same budgets.")
    p.add_argument("--model", default=None,
                   help="packaged model (default: smollm2-135m; or gemma-3-270m), a .gguf file, "
                        "a local HF folder, or a hub id")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--dtype", default=None, help="float32 (default), bfloat16, float16")
    p.add_argument("--scores", required=True, help="detection run dir or paper-format JSON (the ranking)")
    p.add_argument("--budgets", type=_numbers(float, "shares"), default=(0.1, 0.2, 0.3, 0.5),
                   help="shares of the full KV bytes, comma-separated (default 0.1,0.2,0.3,0.5)")
    p.add_argument("--seeds", type=int, default=3, help="random policies per budget (0: none)")
    p.add_argument("--no-streaming", action="store_true", help="leave StreamingLLM out")
    p.add_argument("--needle-mass", action="store_true",
                   help="also rank heads by their attention on the needle while answering, measured "
                        "on the detection grid's lengths and depths (built-in needles)")
    p.add_argument("--sink", type=int, default=4, help="sink tokens a streaming head keeps (default 4)")
    p.add_argument("--window", type=int, default=124,
                   help="recent tokens a streaming head keeps (default 124)")
    p.add_argument("--pool", choices=("max", "mean"), default="max",
                   help="a KV head's score from its query heads' (default max)")
    p.add_argument("--lengths", type=_numbers(int, "integers"), default=(2000,),
                   help="probe lengths in tokens, comma-separated (default 2000)")
    p.add_argument("--depths", type=_numbers(float, "numbers"), default=(10.0, 30.0, 50.0, 70.0, 90.0),
                   help="needle depths in percent, comma-separated (default 10,30,50,70,90)")
    p.add_argument("--needles", default=None, help="JSONL file of {needle, question, real_needle}")
    p.add_argument("--n-needles", type=int, default=None, help="use only the first N needles")
    p.add_argument("--haystack", default=None,
                   help="directory of .txt files, 'stdlib' (default) or 'synthetic'")
    p.add_argument("--max-new-tokens", type=int, default=50)
    p.add_argument("--out", required=True, help="output directory (rerun to resume)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_compress)
    return p


def _probes(args, tok, model, lengths, depths):
    from rhlens.probes import BUILTIN_NEEDLES, ProbeConfig, build_probes, load_needles

    needles = load_needles(args.needles) if args.needles else list(BUILTIN_NEEDLES)
    if args.n_needles:
        needles = needles[: args.n_needles]
    return build_probes(tok, config=ProbeConfig(lengths=tuple(lengths), depths=tuple(depths)),
                        needles=needles, haystack=args.haystack,
                        max_length=getattr(model.cfg, "n_ctx", None))


def cmd_compress(args) -> int:
    from rhlens.compress import CompressConfig
    from rhlens.compress.policy import CacheLayout
    from rhlens.compress.sweep import compress_sweep, needle_attention_mass, sweep_policies
    from rhlens.errors import ConfigError
    from rhlens.models import load_model
    from rhlens.niah import NIAHConfig
    from rhlens.runs import save_compress_run
    from rhlens.scores import RetrievalScores

    config = CompressConfig(sink=args.sink, window=args.window, pool=args.pool)
    niah = NIAHConfig(max_new_tokens=args.max_new_tokens)
    if args.seeds < 0:
        raise ConfigError(f"--seeds must be >= 0, got {args.seeds}")
    scores = RetrievalScores.from_any(args.scores)
    _say(f"loading {args.model or 'the default model (SmolLM2-135M-Instruct)'} ...")
    model, tok = load_model(args.model, device=args.device, dtype=args.dtype)
    probes = _probes(args, tok, model, args.lengths, args.depths)
    rankings = {"retrieval": scores}
    layout = CacheLayout.of(model)
    context = max(p.n_tokens for p in probes)
    # Every policy (a budget below the floor, scores of another model) is checked before any compute.
    sweep_policies(layout, context, rankings, args.budgets, args.seeds, config=config,
                   streaming=not args.no_streaming)
    if args.needle_mass:
        mass_path = Path(args.out) / "needle_mass.safetensors"
        if mass_path.exists():
            from safetensors.torch import load_file

            mass = load_file(mass_path)["mass"]
        else:
            lengths = sorted({int(p["length"]) for p in scores.probes if "length" in p}) or [1000]
            depths = sorted({float(p["depth"]) for p in scores.probes if "depth" in p}) or [50.0]
            _say(f"measuring needle attention on {len(lengths)} lengths x {len(depths)} depths ...")
            mass = needle_attention_mass(model, _probes(args, tok, model, lengths, depths),
                                         niah=niah, tokenizer=tok)
            from safetensors.torch import save_file

            mass_path.parent.mkdir(parents=True, exist_ok=True)
            save_file({"mass": mass.contiguous()}, mass_path)
        rankings["needle-mass"] = mass
    _say(f"sweeping {len(args.budgets)} budgets over {len(probes)} probes ({context} tokens) -> {args.out}")
    t = time.perf_counter()
    result = compress_sweep(model, probes, rankings, budgets=args.budgets, seeds=args.seeds,
                            streaming=not args.no_streaming, config=config, niah=niah,
                            tokenizer=tok, out=args.out, progress=not args.quiet)
    written = save_compress_run(args.out, result)
    _say(f"\nfull cache: NIAH {result.score('full'):.1f} ({time.perf_counter() - t:.0f} s this run)")
    names = list(result.rankings)
    head = f"{'budget':>6} {'share':>6} {'heads':>7}" + "".join(f" {n:>11}" for n in names)
    head += " {:>10}".format("streaming") if result.has_streaming else ""
    head += " {:>13}".format("random") if result.seeds else ""
    _say(head)
    for r in result.table():
        line = f"{r['budget']:6.2f} {r['share']:6.3f} {r['full_kv_heads']:>3}/{r['of_kv_heads']:<3}"
        line += "".join(f" {r[n]:11.1f}" for n in names)
        if result.has_streaming:
            line += f" {r['streaming']:10.1f}"
        if result.seeds:
            line += f" {r['random_mean']:6.1f} ± {r['random_std']:4.1f}"
        _say(line)
    _say("wrote: " + ", ".join(str(p) for p in written.values()))
    return 0
