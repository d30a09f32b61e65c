"""The HF model inside a bridge: its modules, its attention implementation, and swapping the bridge out."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor

from rhlens.errors import ConfigError

__all__ = ["hf_model", "native_modules"]

Swap = tuple[torch.nn.Module, str, torch.nn.Module, torch.nn.Module]


def hf_model(model) -> torch.nn.Module:
    """The HF model a bridge wraps (the bridge's components live inside it)."""
    hf = getattr(model, "original_model", None)
    if hf is None:
        raise ConfigError("expected a TransformerBridge (from rhlens.load_model)")
    return hf


def text_config(hf: torch.nn.Module):
    """The decoder's config (multimodal models nest it)."""
    cfg = hf.config
    return cfg.get_text_config(decoder=True) if hasattr(cfg, "get_text_config") else cfg


def attention_shape(hf: torch.nn.Module) -> tuple[int, int, int]:
    """``(query heads, key/value heads, head dim)`` of the decoder's attention."""
    return config_attention_shape(text_config(hf))


def config_attention_shape(cfg: Any) -> tuple[int, int, int]:
    """:func:`attention_shape` from a decoder's config (no model needed)."""
    n_heads = int(cfg.num_attention_heads)
    n_kv = int(getattr(cfg, "num_key_value_heads", None) or n_heads)
    head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads)
    return n_heads, n_kv, head_dim


def native(module: torch.nn.Module) -> torch.nn.Module:
    """The HF module a bridge component wraps (the module itself if it is not one)."""
    original = module._modules.get("_original_component") if module is not None else None
    return original if original is not None else module


def linear_weights(module: torch.nn.Module) -> tuple[Tensor, Tensor | None]:
    """``(weight, bias)`` of the ``nn.Linear`` a bridge component wraps."""
    lin = native(module)
    if type(lin) is not torch.nn.Linear:
        raise ConfigError(f"expected nn.Linear, got {type(lin).__name__}")
    return lin.weight, lin.bias


def input_device(hf: torch.nn.Module) -> torch.device:
    """Where the token ids go: the input embedding's device (the first layer's, when the model
    is split over devices)."""
    embed = hf.get_input_embeddings() if hasattr(hf, "get_input_embeddings") else None
    weight = getattr(embed, "weight", None)
    return weight.device if isinstance(weight, Tensor) else next(hf.parameters()).device


def layer_devices(hf: torch.nn.Module, n_layers: int) -> list[torch.device] | None:
    """The device of each decoder layer of a model placed by a device map (accelerate's
    dispatch, possibly over several devices); ``None`` without one, or when its decoder layers
    cannot be found."""
    if not getattr(hf, "hf_device_map", None):
        return None
    layers = getattr(getattr(hf, "model", None), "layers", None)
    if layers is None or len(layers) != n_layers:
        return None
    return [next(layer.parameters()).device for layer in layers]


def new_cache(hf: torch.nn.Module):
    """An empty HF ``DynamicCache`` for ``hf``."""
    from transformers import DynamicCache

    return DynamicCache(config=hf.config)


def set_attn_impl(hf: torch.nn.Module, impl: str) -> None:
    """Set the HF attention implementation on every config of ``hf``."""
    # The configs are found once per model: walking every module costs milliseconds on a 7B
    # bridge, and this runs around every prefill and decode.
    configs = hf.__dict__.get("_rhlens_configs")
    if configs is None:
        found = [hf.config, getattr(hf.config, "text_config", None)]
        found += [getattr(m, "config", None) for m in hf.modules() if hasattr(m, "config")]
        configs = [c for c in {id(c): c for c in found if c is not None}.values()
                   if hasattr(c, "_attn_implementation")]
        hf.__dict__["_rhlens_configs"] = configs
    for cfg in configs:
        cfg._attn_implementation = impl


def attention_slots(model) -> list[tuple[torch.nn.Module, str, torch.nn.Module]]:
    """(HF decoder layer, attribute name, HF attention module) for every block."""
    slots = []
    for block in model.blocks:
        layer = block.original_component
        bridge_attn = block.attn
        module = bridge_attn.original_component
        name = next((n for n, m in layer._modules.items() if m is bridge_attn), None)
        if name is None or module is None:
            raise ConfigError(f"cannot find the attention module of {type(layer).__name__}")
        slots.append((layer, name, module))
    return slots


def bridge_swaps(hf: torch.nn.Module) -> list[Swap]:
    """(parent, name, bridge component, HF module it wraps) for every bridge component
    (found once per model: the walk costs milliseconds, and every prefill swaps)."""
    # Kept on the model itself: a module-level cache keyed by the model would hold it through
    # the parents listed here (the model is one of them), and a model once prefilled would
    # never be freed.
    cached = hf.__dict__.get("_rhlens_swaps")
    if cached is not None and all(parent._modules.get(name) is bridge for parent, name, bridge, _ in cached):
        return cached
    hf.__dict__["_rhlens_swaps"] = swaps = _walk_bridge(hf)
    return swaps


def _walk_bridge(hf: torch.nn.Module) -> list[Swap]:
    from transformer_lens.model_bridge.generalized_components.base import GeneralizedComponent

    out = []

    def walk(parent: torch.nn.Module) -> None:
        for name, child in list(parent._modules.items()):
            if child is None:
                continue
            if isinstance(child, GeneralizedComponent):
                original = child._modules.get("_original_component")
                if original is None:
                    raise ConfigError(f"bridge component {name} wraps no HF module")
                out.append((parent, name, child, original))
                walk(original)
            else:
                walk(child)

    walk(hf)
    return out


@contextlib.contextmanager
def swapped(hf: torch.nn.Module, replacement: Callable[[torch.nn.Module, torch.nn.Module], torch.nn.Module],
            impl: str) -> Iterator[None]:
    """Every bridge component replaced by ``replacement(bridge, original)``, attention ``impl``."""
    swaps = bridge_swaps(hf)
    old_impl = hf.config._attn_implementation
    try:
        for parent, name, bridge, original in swaps:
            parent._modules[name] = replacement(bridge, original)
        set_attn_impl(hf, impl)
        yield
    finally:
        for parent, name, bridge, _ in reversed(swaps):
            parent._modules[name] = bridge
        set_attn_impl(hf, old_impl)


@contextlib.contextmanager
def native_modules(model, impl: str = "sdpa") -> Iterator[torch.nn.Module]:
    """The plain HF model: every bridge component swapped for the module it wraps.

    No TransformerLens hook fires inside; used to time HF's own ``generate`` against the
    engine on the same weights. Yields the HF model.
    """
    hf = hf_model(model)
    with swapped(hf, lambda bridge, original: original, impl):
        yield hf
