"""Tiny random-weight models of the Hugging Face families rhlens serves, for the tests and
``scripts/families_table.py``: 2 layers, hidden 64, fp32, SmolLM2's tokenizer, saved as local
folders (seconds each)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

# Sizes every family shares: 2 layers, hidden 64, 4 query heads of 16 over 2 KV heads.
_COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=4096, tie_word_embeddings=False)


def _configs() -> dict[str, tuple[str, dict[str, Any]]]:
    """family -> (transformers config class name, its arguments beyond ``_COMMON``)."""
    return {
        "llama": ("LlamaConfig", {}),
        "mistral": ("MistralConfig", {"sliding_window": None}),
        "qwen2": ("Qwen2Config", {}),
        "qwen3": ("Qwen3Config", {"head_dim": 16}),
        "qwen3_moe": ("Qwen3MoeConfig", {"head_dim": 16, "num_experts": 4, "num_experts_per_tok": 2,
                                         "moe_intermediate_size": 32, "decoder_sparse_step": 1,
                                         "norm_topk_prob": True}),
        "gemma2": ("Gemma2Config", {"head_dim": 16, "sliding_window": 16, "query_pre_attn_scalar": 16,
                                    "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0}),
        "gemma3": ("Gemma3TextConfig", {"head_dim": 16, "sliding_window": 16, "query_pre_attn_scalar": 16,
                                        "layer_types": ["sliding_attention", "full_attention"]}),
        "phi3": ("Phi3Config", {"pad_token_id": 0}),
        "mixtral": ("MixtralConfig", {"num_local_experts": 4, "num_experts_per_tok": 2}),
        "olmo2": ("Olmo2Config", {}),
        "granite": ("GraniteConfig", {"embedding_multiplier": 2.0, "residual_multiplier": 0.5,
                                      "attention_multiplier": 0.2, "logits_scaling": 4.0}),
        "gpt_neox": ("GPTNeoXConfig", {"rotary_pct": 0.5, "use_parallel_residual": True}),
    }


FAMILIES: tuple[str, ...] = tuple(_configs())


def tiny_config(family: str, vocab_size: int, **overrides):
    import transformers

    cls_name, extra = _configs()[family]
    kwargs = {**_COMMON, **extra, "vocab_size": vocab_size, **overrides}
    if family == "gpt_neox":
        kwargs.pop("num_key_value_heads")
    return getattr(transformers, cls_name)(**kwargs)


def make_tiny_model(family: str, out: Path | str, tokenizer, seed: int = 0) -> Path:
    """A random-weight fp32 model of ``family`` saved with ``tokenizer`` in ``out``."""
    import torch
    from transformers import AutoModelForCausalLM

    out = Path(out)
    if (out / "config.json").exists():
        return out
    torch.manual_seed(seed)
    cfg = tiny_config(family, len(tokenizer))
    hf = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():  # bigger weights than the default init: peaked, varied attention
        for name, p in hf.named_parameters():
            if p.ndim >= 2 and "embed" not in name:
                p.normal_(0, 0.15)
    hf.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def tiny_models(family: str, tokenizer, seed: int = 0, experts_implementation: str | None = None,
                **overrides):
    """``(bridge, HF model)`` of ``family``: the same random weights twice, built in memory (no
    files): the bridge as ``rhlens.load_model`` makes it, the HF model left plain (for an oracle,
    which sets its own attention). ``overrides``: config arguments beyond the family's tiny ones;
    ``experts_implementation``: an MoE's (transformers' default if ``None``)."""
    import copy

    import torch
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = tiny_config(family, len(tokenizer), **overrides)
    extra = {"experts_implementation": experts_implementation} if experts_implementation else {}
    hf = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32, attn_implementation="eager", **extra)
    hf.config.architectures = [type(hf).__name__]
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if p.ndim >= 2 and "embed" not in name:
                p.normal_(0, 0.15)
    plain = copy.deepcopy(hf).eval()
    bridge = TransformerBridge.boot_transformers(family, hf_model=hf, tokenizer=tokenizer)
    bridge.eval()
    return bridge, plain
