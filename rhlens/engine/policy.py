"""KernelPolicy: the lean decode step's kernels, fixed for a run, resolved per device, recorded with the run.

Every choice here computes the same dot products; they differ in cost and, below float32,
in rounding (a different kernel may round a score differently in its last bit, which can
flip an argmax between near-tied keys). So the policy that ran belongs in a run's header:
``GenerationConfig.describe(model)`` gives it, resolved.

``None`` fields mean "the default for this device"; :meth:`KernelPolicy.resolve` replaces
them with concrete choices (the defaults measured in BENCHMARKS.md):

================  =====================================  ==========================
field             CUDA                                   elsewhere
================  =====================================  ==========================
``rows``          ``"slab"``                             ``"row"``
``av``            ``"split"`` under GQA (else ``"mm"``)  ``"mm"``
``keys_first``    ``True``                               ``False``
``decode``        ``"captured"``                         ``"lean"``
``compile``       ``True`` (with ``decode="captured"``)   ``False``
``bucket``        1024                                   64
``prefill_attn``  ``"split"``                            ``"lower_right"``
================  =====================================  ==========================

``decode`` resolves to the fastest step the model and the hooks attached now allow (a model
the lean step does not reproduce: ``"bridge"``; a hook the captured step cannot express, i.e.
anything but the retrieval recorder and ``ablate_heads`` masks: ``"lean"``); a hook attached
later downgrades the step of that decode only, and each :class:`~rhlens.engine.Generation`
says in ``info["decode"]`` which step ran.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Literal

import torch

from rhlens.engine.bridge import attention_shape, hf_model
from rhlens.engine.captured import decode_path
from rhlens.errors import ConfigError
from rhlens.store.results import Config

__all__ = ["KernelPolicy"]

RowsMode = Literal["slab", "row", "batch"]
AvMode = Literal["mm", "split", "sdpa"]
DecodeMode = Literal["captured", "lean", "bridge"]
PrefillAttn = Literal["lower_right", "flash_gqa", "split"]
_PREFILL_ATTN = ("lower_right", "flash_gqa", "split")


@dataclass(frozen=True)
class KernelPolicy(Config):
    """How the lean decode step computes its products (``None``: the device's default).

    Attributes:
        rows: how the prompts of a batch share a step's weight products. BLAS libraries pick
            a kernel, and so the rounding of every row, from a product's shape. ``"slab"``:
            every product runs on blocks of exactly ``slab`` rows (the batch padded with zero
            rows, a lone prompt too), so a row rounds as it does alone, one product per
            block (on a GPU 16 rows cost what one costs: benchmarks/batch_invariance.py).
            ``"row"``: row by row, also exact (on a CPU, where a product costs by the row,
            the cheaper way). ``"batch"``: one product for the batch (rows may round
            differently from alone). In both exact modes each row's attention products (over
            its own keys) run row by row.
        slab: rows per block in ``"slab"`` mode.
        av: how pattern @ V is computed. ``"mm"``: one batched product, as the bridge does
            (bit-identical to it in float32). ``"split"``: from ``split_from`` keys on, sums of
            blocks of ``av_block`` keys with float32 partial sums (under GQA the one product's
            ``[group, keys] @ [keys, d_head]`` shape gets slow cuBLAS kernels on long contexts:
            1 ms a layer at 32K keys on an H200). ``"sdpa"``: the output from SDPA itself, used
            only while no hook edited the scores or the pattern (resolved to ``"mm"`` where
            SDPA has no flash / memory-efficient kernel for the model).
        split_from: ``"split"`` takes one product below this many keys (default 0: blocks
            at every length, so that a slab's rows share one blocked product, which rounds
            each row as alone; one product a row made a batch of 8 rows at 8K keys spend 3.5 of
            its 18.1 ms on 256 launches of it, H100, BENCHMARKS.md H).
        av_block: keys per block in ``"split"``.
        keys_first: grouped-query scores as ``[keys, d] @ [d, group]`` instead of
            ``[group, d] @ [d, keys]``: the same dot products; cuBLAS runs the tiny-M shape
            slowly at many key counts (156 us against 36 us a layer at 32799 keys on an H100:
            benchmarks/decode_scores.py).
        expand_kv: copy K/V for every query head under grouped-query attention, as the
            bridge does: bit-for-bit agreement with the bridge at any precision, at the cost
            of the copy (without it the single query of a step is folded into its KV group).
        decode: the decode step. ``"captured"``: :mod:`~rhlens.engine.captured`, every
            operation on static buffers with the KV position on the device, replayed as one
            CUDA graph per step on a GPU (run eagerly elsewhere), the built-in hooks run as
            tensor ops; ``"lean"``: :mod:`~rhlens.engine.lean`, hooks called from Python;
            ``"bridge"``: TransformerLens' own forward.
        compile: the captured step's per-layer functions through ``torch.compile`` (fused
            element-wise kernels, rounding where eager rounds where inductor can emulate it;
            the first decode of a process compiles, seconds). Default: on where the captured
            step runs on a GPU; if compiling fails there the step runs uncompiled, with a
            warning and ``Generation.info["decode"]`` saying so.
        bucket: the captured step attends over the KV buffer up to the prompt + new tokens
            rounded up to a multiple of this (the keys past the current one masked), so that
            one graph serves every step of a decode.
        prefill_attn: a prefill chunk that follows cached keys (a long prompt's later chunks,
            the rest of a prompt after a reused prefix). ``"lower_right"``: SDPA with a
            lower-right causal bias, K/V copied per query head under GQA (PyTorch's flash
            kernel); ``"flash_gqa"``: that flash kernel called on the grouped K/V directly;
            ``"split"``: the chunk against the cached keys (no mask) and against itself
            (causal, square) as two SDPA calls whose outputs are merged by their
            log-sum-exp.
    """

    rows: RowsMode | None = None
    slab: int = 16
    av: AvMode | None = None
    split_from: int = 0
    av_block: int = 1024
    keys_first: bool | None = None
    expand_kv: bool = False
    decode: DecodeMode | None = None
    compile: bool | None = None
    bucket: int | None = None
    prefill_attn: PrefillAttn | None = None

    def __post_init__(self) -> None:
        if self.rows not in (None, "slab", "row", "batch"):
            raise ConfigError(f"KernelPolicy.rows must be 'slab', 'row', 'batch' or None, got {self.rows!r}")
        if self.av not in (None, "mm", "split", "sdpa"):
            raise ConfigError(f"KernelPolicy.av must be 'mm', 'split', 'sdpa' or None, got {self.av!r}")
        for name, low in (("slab", 1), ("split_from", 0), ("av_block", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(f"KernelPolicy.{name} must be an integer >= {low}, got {value!r}")
        if not isinstance(self.keys_first, (bool, type(None))):
            raise ConfigError(f"KernelPolicy.keys_first must be True, False or None, got {self.keys_first!r}")
        if not isinstance(self.expand_kv, bool):
            raise ConfigError(f"KernelPolicy.expand_kv must be True or False, got {self.expand_kv!r}")
        if self.decode not in (None, "captured", "lean", "bridge"):
            raise ConfigError(f"KernelPolicy.decode must be 'captured', 'lean', 'bridge' or None, "
                              f"got {self.decode!r}")
        if not isinstance(self.compile, (bool, type(None))):
            raise ConfigError(f"KernelPolicy.compile must be True, False or None, got {self.compile!r}")
        if self.bucket is not None and (isinstance(self.bucket, bool) or not isinstance(self.bucket, int)
                                        or self.bucket < 1):
            raise ConfigError(f"KernelPolicy.bucket must be an integer >= 1 or None, got {self.bucket!r}")
        if self.prefill_attn not in (None, *_PREFILL_ATTN):
            raise ConfigError(f"KernelPolicy.prefill_attn must be one of {', '.join(_PREFILL_ATTN)} "
                              f"or None, got {self.prefill_attn!r}")

    @property
    def resolved(self) -> bool:
        """Every choice is concrete (no device default left)."""
        return None not in (self.rows, self.av, self.keys_first, self.decode, self.compile,
                            self.bucket, self.prefill_attn)

    def resolve(self, device: torch.device | str, model) -> KernelPolicy:
        """The concrete policy for ``model`` on ``device`` (explicit choices are kept)."""
        cuda = torch.device(device).type == "cuda"
        hf = hf_model(model)
        n_heads, n_kv, head_dim = attention_shape(hf)
        gqa = n_kv != n_heads
        av = self.av or ("split" if cuda and gqa and not self.expand_kv else "mm")
        if av == "sdpa":
            dtype = next(hf.parameters()).dtype
            if not _sdpa_runs(torch.device(device), dtype, n_heads, n_kv, head_dim):
                av = "mm"
        policy = dataclasses.replace(
            self, rows=self.rows or ("slab" if cuda else "row"), av=av,
            keys_first=cuda if self.keys_first is None else self.keys_first,
            decode=self.decode or ("captured" if cuda else "lean"),
            compile=self.compile,
            bucket=self.bucket or (1024 if cuda else 64),
            prefill_attn=self.prefill_attn or ("split" if cuda else "lower_right"))
        decode = decode_path(model, policy.decode)
        # compiled by default where the captured step runs on a GPU (fused element-wise kernels:
        # BENCHMARKS.md E/H); the first decode of a process compiles (seconds)
        compile = (cuda and decode == "captured") if self.compile is None else self.compile
        return dataclasses.replace(policy, decode=decode, compile=compile)

    def batch_mode(self, rows: int) -> RowsMode:
        """How a step of ``rows`` prompts runs its weight products (a resolved policy)."""
        if self.rows is None:
            raise ConfigError("resolve the KernelPolicy for a device first (KernelPolicy.resolve)")
        return self.rows if rows > 1 or self.rows == "slab" else "batch"


@functools.cache
def _sdpa_runs(device: torch.device, dtype: torch.dtype, n_heads: int, n_kv: int, head_dim: int) -> bool:
    """Whether SDPA's flash or memory-efficient kernel takes a decode step of this shape here
    (a fact of the device and the torch build, found once)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q = torch.zeros(1, n_heads, 1, head_dim, device=device, dtype=dtype)
    kv = torch.zeros(1, n_kv, 8, head_dim, device=device, dtype=dtype)
    gqa = {"enable_gqa": True} if n_kv != n_heads else {}
    try:
        with torch.no_grad(), sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]):
            torch.nn.functional.scaled_dot_product_attention(q, kv, kv, **gqa)
    except RuntimeError:
        return False
    return True
