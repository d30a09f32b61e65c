"""The flags subcommands share, and the one place where flags become configs.

Every value is checked while parsing (zero, negative, empty and conflicting values are
errors, never a quiet fall-back to a default); :func:`probe_config`, :func:`detect_config`
and friends turn the parsed flags into the library's configs. Nothing here imports torch.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from typing import Any, NoReturn

__all__ = [
    "Parser",
    "Renamed",
    "add_mask_args",
    "add_model_args",
    "add_out_args",
    "add_probe_args",
    "add_prompt_args",
    "cot_config",
    "count_at_most",
    "detect_config",
    "draws",
    "error_line",
    "float_list",
    "int_list",
    "max_memory",
    "needles",
    "niah_config",
    "nonnegative_int",
    "one_line",
    "patch_config",
    "percent",
    "positive_int",
    "probe_config",
    "repeated",
    "resume_note",
    "say",
    "state_defaults",
]


def say(msg: str = "") -> None:
    """Print ``msg`` (under torchrun, on rank 0 only: every rank runs the same command)."""
    if os.environ.get("RANK", "0") == "0":
        print(msg, flush=True)  # noqa: T201 - the CLI's job is to talk


def one_line(text: str) -> str:
    return " ".join(part.strip() for part in str(text).strip().splitlines() if part.strip())


def error_line(msg: str) -> None:
    print(f"rhlens: error: {one_line(msg)}", file=sys.stderr, flush=True)  # noqa: T201


class Parser(argparse.ArgumentParser):
    """``argparse`` that reports a bad flag as one line, ``rhlens: error: ...``, exit 2."""

    def error(self, message: str) -> NoReturn:
        error_line(f"{message} (see '{self.prog} --help')")
        raise SystemExit(2)


class Renamed(argparse.Action):
    """A flag renamed for what it does; its ``old`` spelling still works and says so on stderr."""

    def __init__(self, option_strings, dest, old: tuple[str, ...] = (), **kwargs) -> None:
        self.old = tuple(old)
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        if option_string in self.old:
            new = next(s for s in self.option_strings if s not in self.old)
            print(f"rhlens: warning: {option_string} is deprecated in '{parser.prog}': use {new} "  # noqa: T201
                  "(same values)", file=sys.stderr, flush=True)
        setattr(namespace, self.dest, values)


def state_defaults(parser: argparse.ArgumentParser) -> None:
    """Every optional flag's help ends by saying its default, where it does not already."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                state_defaults(sub)
            continue
        if (not action.option_strings or action.required or action.help in (None, argparse.SUPPRESS)
                or "default" in action.help.lower() or action.nargs == 0):
            continue
        value = action.default
        if value is None or value == []:
            said = "none"
        elif isinstance(value, (tuple, list)):
            said = ",".join(str(v) for v in value)
        else:
            said = str(value)
        action.help = f"{action.help} (default {said})"


# ---- value types (argparse calls them; an ArgumentTypeError names the flag) -----------------
def _number(text: str, kind: type, what: str):
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None


def positive_int(text: str) -> int:
    value = _number(text, int, "a whole number")
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def nonnegative_int(text: str) -> int:
    value = _number(text, int, "a whole number")
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def count_at_most(maximum: int, why: str, *, minimum: int = 1) -> Callable[[str], int]:
    """A whole number in ``[minimum, maximum]``; above it, the message says the real limit
    (``why``) before anything is expanded (argparse names the flag)."""
    def parse(text: str) -> int:
        value = _number(text, int, "a whole number")
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        if value > maximum:
            raise argparse.ArgumentTypeError(f"{value} is above the limit of {maximum:,} ({why})")
        return value
    return parse


def draws(*, minimum: int = 1) -> Callable[[str], int]:
    """A count of random draws (``--seeds``, ``--sequences``): at most :data:`MAX_DRAWS`."""
    from rhlens.validate import DRAWS_WHY, MAX_DRAWS

    return count_at_most(MAX_DRAWS, DRAWS_WHY, minimum=minimum)


def percent(text: str) -> float:
    value = _number(text, float, "a number")
    if not 0 <= value <= 100:
        raise argparse.ArgumentTypeError(f"must lie in [0, 100], got {text}")
    return value


_SIZE_UNITS = ("B", "KB", "MB", "GB", "TB", "KIB", "MIB", "GIB", "TIB")


def _size(text: str) -> str | int:
    text = text.strip()
    if text.isdigit():
        return int(text)
    number = text.rstrip("BbKkMmGgTtIi")
    unit = text[len(number):].upper()
    try:
        ok = float(number) > 0 and unit in _SIZE_UNITS
    except ValueError:
        ok = False
    if not ok:
        raise argparse.ArgumentTypeError(f"expected a size like 70GiB or 500MB, got {text!r}")
    return text


def max_memory(text: str) -> str | int | dict:
    """``SIZE`` (every GPU of this process) or ``DEV=SIZE,...`` (DEV a GPU index, cpu or mps)."""
    if "=" not in text:
        return _size(text)
    budget: dict = {}
    for item in text.split(","):
        dev, sep, size = item.partition("=")
        dev = dev.strip()
        if not sep or not dev:
            raise argparse.ArgumentTypeError(f"expected DEV=SIZE items, got {item!r}")
        key: int | str = int(dev) if dev.isdigit() else dev.lower()
        if not isinstance(key, int) and key not in ("cpu", "mps"):
            raise argparse.ArgumentTypeError(f"{dev!r} is not a device (a GPU index, cpu or mps)")
        if key in budget:
            raise argparse.ArgumentTypeError(f"device {dev} given twice")
        budget[key] = _size(size)
    return budget


Bound = float | int | None


def _number_list(kind: type, what: str, lo: Bound, hi: Bound) -> Callable[[str], tuple]:
    """A parser of ``"a,b,c"`` into numbers of ``kind``, each in ``[lo, hi]``; nothing empty."""
    def parse(text: str) -> tuple:
        items = [x.strip() for x in text.split(",")]
        if not any(items):
            raise argparse.ArgumentTypeError(f"expected comma-separated {what}, got {text!r}")
        if not all(items):
            raise argparse.ArgumentTypeError(f"empty item in {text!r}")
        values = tuple(_number(x, kind, f"comma-separated {what}") for x in items)
        if lo is not None and hi is not None and not lo <= min(values) <= max(values) <= hi:
            raise argparse.ArgumentTypeError(f"every value must lie in [{lo:g}, {hi:g}], got {text!r}")
        if lo is not None and min(values) < lo:
            raise argparse.ArgumentTypeError(f"every value must be >= {lo:g}, got {text!r}")
        return values
    return parse


def int_list(*, minimum: int | None = None) -> Callable[[str], tuple]:
    """Comma-separated whole numbers, each >= ``minimum``."""
    return _number_list(int, "integers", minimum, None)


def float_list(*, lo: float | None = None, hi: float | None = None) -> Callable[[str], tuple]:
    """Comma-separated numbers, each in ``[lo, hi]``."""
    return _number_list(float, "numbers", lo, hi)


# ---- flag groups ---------------------------------------------------------------------------
def add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", default=None,
                   help="packaged model (default: smollm2-135m; or gemma-3-270m), a .gguf file, "
                        "a local Hugging Face folder, or a hub id")
    g.add_argument("--device", default=None,
                   help="cpu, cuda, cuda:N or mps (default: cuda when available, else cpu)")
    g.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"),
                   help="weights' dtype (default float32)")
    g.add_argument("--offline", action="store_true",
                   help="never use the network: a hub id must already be in the local Hugging "
                        "Face cache (fails at once instead of retrying)")
    g.add_argument("--device-map", default=None,
                   choices=("auto", "balanced", "balanced_low_0", "sequential"),
                   help="spread a model too large for one GPU over several (HF's planner, through "
                        "TransformerLens' multi-device loading); not with --device. Under torchrun "
                        "with N processes per machine, process r uses GPUs r*M..r*M+M-1 (M = "
                        "GPUs / N)")
    g.add_argument("--max-memory", type=max_memory, default=None, metavar="SIZE|DEV=SIZE,...",
                   help="with --device-map: memory each device may hold, e.g. 70GiB (every GPU "
                        "this process uses) or 0=70GiB,1=40GiB,cpu=100GiB")


def add_prompt_args(g) -> None:
    """What the needle hides in and how the prompt is wrapped (probes and ``ask``)."""
    g.add_argument("--haystack", default=None, metavar="DIR|stdlib|synthetic",
                   help="directory of .txt files, 'stdlib' (default: Python's docstrings) or "
                        "'synthetic'")
    g.add_argument("--no-chat-template", action="store_true",
                   help="plain prompt ending in 'Answer:', no chat template")


def resume_note(what: str) -> Callable[[argparse.Namespace], str]:
    """What a resumable command says when Ctrl-C stops it."""
    return lambda args: (f"interrupted; every finished {what} is saved in {args.out}: rerun the "
                         "same command to resume")


def add_probe_args(p: argparse.ArgumentParser, *, lengths: str = "500,1000,1500,2000",
                   depths: str = "0,25,50,75,100", answer_buffer: int = 200,
                   max_new_tokens: int | None = 50) -> None:
    g = p.add_argument_group("probes (needle in a haystack)")
    length = g.add_mutually_exclusive_group()
    length.add_argument(
        "--lengths", type=int_list(minimum=1), default=None, metavar="N,N,...",
        help=f"context lengths in tokens, comma-separated (default {lengths}). Each length "
             f"includes the --answer-buffer ({answer_buffer} tokens by default) kept free for "
             "the answer, so the prompt gets LENGTH minus that; a length too short for the "
             "template, question and needle is refused with the smallest one that fits (315 "
             "for the default model and needles)")
    length.add_argument("--length-range", type=positive_int, nargs=3, metavar=("MIN", "MAX", "COUNT"),
                        help="COUNT lengths evenly spaced from MIN to MAX tokens (the paper's "
                             "grid); whole numbers")
    depth = g.add_mutually_exclusive_group()
    depth.add_argument("--depths", type=float_list(lo=0.0, hi=100.0), default=None, metavar="D,D,...",
                       help=f"needle depths in percent of the haystack, comma-separated "
                            f"(default {depths})")
    depth.add_argument("--depth-count", type=positive_int, default=None, metavar="COUNT",
                       help="COUNT depths evenly spaced from 0 to 100")
    g.add_argument("--placement", choices=("sentence", "token"), default="sentence",
                   help="sentence: the needle goes after the last sentence end at or before the "
                        "depth (the paper's rule; records keep the depth it really got); token: "
                        "exactly at the depth's token")
    g.add_argument("--needles", default=None, metavar="FILE.jsonl",
                   help="JSONL file of {needle, question, real_needle[, id]} (default: the 4 "
                        "built-in needles)")
    g.add_argument("--n-needles", type=positive_int, default=None, metavar="N",
                   help="use only the first N needles (built-in or from --needles)")
    g.add_argument("--split", choices=("choose", "report"), default=None,
                   help="held-out probes: the packaged needles of this split (rhlens/data/"
                        "needles.jsonl; or --needles' with a 'split' field) in the split's own "
                        "haystack; recorded in run.json. Choose settings on 'choose', report on "
                        "'report'")
    add_prompt_args(g)
    g.add_argument("--answer-buffer", type=nonnegative_int, default=answer_buffer, metavar="N",
                   help=f"tokens of each length kept free for the answer (default {answer_buffer})")
    g.set_defaults(default_lengths=lengths, default_depths=depths)
    if max_new_tokens is None:
        return
    paper = "as in the paper" if max_new_tokens == 50 else "the paper: 50"
    p.add_argument("--max-new-tokens", type=positive_int, default=max_new_tokens, metavar="N",
                   help=f"tokens the model may answer with, at most (default {max_new_tokens}, "
                        f"{paper}); answers stop at a newline")


def add_mask_args(p: argparse.ArgumentParser, *, modes=("uniform", "zero", "mean"),
                  phase: bool = True) -> None:
    p.add_argument("--knockout", "--mode", dest="mode", action=Renamed, old=("--mode",),
                   choices=modes, default="uniform",
                   help="how a masked head is knocked out: uniform: zero its query, so it attends "
                        "uniformly (the paper's mask); zero: zero its output z"
                        + ("; mean: its mean z over the first probes" if "mean" in modes else "")
                        + " (default uniform; --mode is the deprecated spelling)")
    if phase:
        p.add_argument("--phase", choices=("decode", "all"), default="decode",
                       help="decode: mask only while answering (the paper); all: the prompt's "
                            "prefill too (default decode)")


def add_out_args(p: argparse.ArgumentParser, *, resumable: bool = True) -> None:
    p.add_argument("--out", required=True, metavar="DIR",
                   help="output directory, created if needed"
                        + ("; rerun the same command with the same --out to resume (a changed "
                           "setting is refused, naming it)" if resumable else ""))
    p.add_argument("--quiet", action="store_true", help="no progress bar")


# ---- flags -> configs (the one place) -------------------------------------------------------
def probe_config(args: argparse.Namespace):
    from rhlens.probes import ProbeConfig

    def parse(text: str, kind):
        return tuple(kind(x) for x in text.split(","))

    if args.length_range:
        lo, hi, n = args.length_range
        if lo > hi:
            raise _config_error(f"--length-range: MIN {lo} is above MAX {hi}")
        if n > hi - lo + 1:
            raise _config_error(f"--length-range {lo} {hi} {n}: only {hi - lo + 1} whole-number "
                                f"lengths lie from {lo} to {hi}; use COUNT <= {hi - lo + 1}")
        lengths = ProbeConfig.linspace(lo, hi, n)
    else:
        lengths = args.lengths or parse(args.default_lengths, int)
    if args.depth_count and args.depth_count > max(lengths):
        raise _config_error(f"--depth-count {args.depth_count}: a probe of at most {max(lengths)} "
                            f"tokens has fewer than {max(lengths)} positions for the needle, so "
                            f"more depths would coincide; use COUNT <= {max(lengths)}")
    if args.depth_count:
        depths = ProbeConfig.linspace(0, 100, args.depth_count, integer=False)
    else:
        depths = args.depths or parse(args.default_depths, float)
    return ProbeConfig(lengths=lengths, depths=depths, answer_buffer=args.answer_buffer,
                       chat_template=not args.no_chat_template, placement=args.placement)


def needles(args: argparse.Namespace) -> list:
    from rhlens.probes import BUILTIN_NEEDLES, load_needles

    if getattr(args, "split", None):
        from rhlens.needlesets import NEEDLES_FILE, packaged_needles

        found = packaged_needles(args.split, path=args.needles or NEEDLES_FILE)
    else:
        found = load_needles(args.needles) if args.needles else list(BUILTIN_NEEDLES)
    if args.n_needles and args.n_needles > len(found):
        raise _config_error(f"--n-needles {args.n_needles}: only {len(found)} needles are "
                            f"available{' in ' + args.needles if args.needles else ''}")
    return found[: args.n_needles] if args.n_needles else found


def detect_config(args: argparse.Namespace):
    from rhlens.retrieval import DetectConfig

    return DetectConfig(mode=args.mode).with_generation(**detect_generation(args))


def detect_generation(args: argparse.Namespace) -> dict[str, Any]:
    """The generation settings a detection pass takes from the command line: --max-new-tokens,
    --prefill-chunk and --batch-size (when given; else DetectConfig's, 8)."""
    kw: dict[str, Any] = {"max_new_tokens": args.max_new_tokens, "prefill_chunk": args.prefill_chunk}
    if args.batch_size is not None:
        kw["batch_size"] = args.batch_size
    return kw


def niah_config(args: argparse.Namespace):
    from rhlens.niah import NIAHConfig

    return NIAHConfig().with_generation(max_new_tokens=args.max_new_tokens)


def cot_config(args: argparse.Namespace):
    from rhlens.cot.experiment import CoTConfig

    return CoTConfig(max_new_tokens_cot=args.max_new_tokens_cot,
                     max_new_tokens_direct=args.max_new_tokens_direct,
                     chat_template=not args.no_chat_template)


def patch_config(args: argparse.Namespace):
    from rhlens.patching import PatchConfig

    heads = None
    if getattr(args, "heads", None):
        if args.layers:
            raise _config_error("--heads and --layers: give one of them")
        try:
            heads = tuple(tuple(int(x) for x in item.split(".")) for item in args.heads.split(","))
        except ValueError:
            heads = ()
        if not heads or any(len(h) != 2 for h in heads):
            raise _config_error(f"--heads {args.heads!r}: heads are written layer.head (e.g. 3.1,10.4)")
    return PatchConfig(mode=args.mode, direction=args.direction, positions=args.positions,
                       metric=args.metric, layers=args.layers, heads=heads,
                       activation=getattr(args, "activation", "z"), batch_size=args.batch_size)


def repeated(values) -> str:
    """The values given more than once, for an error message."""
    values = list(values)
    return ", ".join(sorted({str(v) for v in values if values.count(v) > 1}))


def _config_error(msg: str):
    from rhlens.errors import ConfigError

    return ConfigError(msg)
