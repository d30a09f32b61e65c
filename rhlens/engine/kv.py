"""KV storage: preallocated per-layer buffers, and the pool of batch rows that reuses shared prompt prefixes.

A decode step writes one position into a buffer instead of re-concatenating the whole cache
(:class:`_BufferLayer`, an HF ``DynamicLayer`` over a preallocated tensor). :class:`KVPool`
holds ``[rows, kv_heads, capacity, head_dim]`` per layer for a batch of prompts and knows
which prompt body each row holds, so that a prompt sharing a prefix with the previous one
(NIAH probes of one haystack) copies that prefix's keys and values instead of computing them.
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Hashable, Sequence

import torch
from torch import Tensor

from rhlens.engine.bridge import attention_shape, layer_devices, new_cache, text_config
from rhlens.engine.native import prefill
from rhlens.errors import ConfigError, ProbeError

# The smallest prefill chunk a probe too long for its GPU is tried with (KVPool.fit) before
# it is refused: below it the per-chunk overhead grows faster than the memory it saves.
MIN_CHUNK = 2048

__all__ = [
    "KVPool",
    "buffer_cache",
    "done_with",
    "forget_pool",
    "kept_pool",
    "plain_cache_layers",
    "reusable",
]


@functools.cache
def _buffer_layer_class():
    from transformers.cache_utils import DynamicLayer

    class _BufferLayer(DynamicLayer):
        """A ``DynamicLayer`` that writes new keys/values into a preallocated buffer.

        ``keys``/``values`` are views of the first ``length`` positions, as HF expects;
        cropping is O(1). ``fixed`` buffers are views of the engine's batch storage and
        never reallocate.
        """

        is_sliding = False
        is_croppable = True

        def __init__(self, keys: Tensor | None = None, values: Tensor | None = None,
                     length: int = 0, reserve: int = 0, fixed: bool = False) -> None:
            super().__init__()
            self._kb, self._vb, self._n = keys, values, 0  # [batch, kv_head, capacity, d_head]
            self.reserve, self.fixed = reserve, fixed
            if keys is not None:
                self.dtype, self.device = keys.dtype, keys.device
                self.is_initialized = True
                self._set_len(length)

        def lazy_initialization(self, key_states, value_states=None) -> None:
            self.dtype, self.device = key_states.dtype, key_states.device
            self.is_initialized = True

        def _set_len(self, n: int) -> None:
            self._n = n
            self.keys = self._kb[:, :, :n]
            self.values = self._vb[:, :, :n]

        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            n0 = self._n
            n1 = n0 + key_states.shape[-2]
            if (self._kb is None or n1 > self._kb.shape[-2]
                    or self._kb.shape[0] != key_states.shape[0]):
                self._grow(key_states, value_states, max(n1, self.reserve))
            if key_states.dtype != self._kb.dtype:
                raise ConfigError(f"KV cache holds {self._kb.dtype}, the model gives {key_states.dtype}")
            self._kb[:, :, n0:n1].copy_(key_states)
            self._vb[:, :, n0:n1].copy_(value_states)
            self._set_len(n1)
            if n0 == 0:  # the same values, contiguous: attention kernels see what HF gives them
                return key_states, value_states
            return self.keys, self.values

        def _grow(self, k: Tensor, v: Tensor, capacity: int) -> None:
            if self.fixed:
                raise RuntimeError("rhlens: a fixed KV buffer is too small (engine bug)")
            b, h, _, d = k.shape
            kb = k.new_empty((b, h, capacity, d))
            vb = v.new_empty((b, v.shape[1], capacity, v.shape[-1]))
            if self._n:
                if self._kb.shape[0] != b:
                    raise RuntimeError("rhlens: cannot change the batch size of a filled KV cache")
                kb[:, :, :self._n].copy_(self._kb[:, :, :self._n])
                vb[:, :, :self._n].copy_(self._vb[:, :, :self._n])
            self._kb, self._vb = kb, vb

        def get_seq_length(self) -> int:
            return self._n

        def crop(self, tokens_to_remove: int) -> None:
            if tokens_to_remove > 0:
                raise ValueError("crop takes a negative number of tokens to remove")
            if tokens_to_remove == 0 or not self.is_initialized:
                return
            self._set_len(max(0, self._n - abs(tokens_to_remove)))

        def reset(self) -> None:
            self._n = 0
            if self._kb is not None:
                self._set_len(0)

        def batch_repeat_interleave(self, repeats: int) -> None:  # pragma: no cover
            raise NotImplementedError("rhlens KV buffers do not support beam search")

        def batch_select_indices(self, indices) -> None:  # pragma: no cover
            raise NotImplementedError("rhlens KV buffers do not support beam search")

    return _BufferLayer


def plain_cache_layers(hf: torch.nn.Module) -> int | None:
    """Number of layers if every layer of the model's cache is a plain DynamicLayer."""
    from transformers.cache_utils import DynamicLayer

    layers = new_cache(hf).layers
    if not layers or any(type(layer) is not DynamicLayer for layer in layers):
        return None  # sliding windows, linear attention, ...: no reuse, no batching
    return len(layers)


def buffer_cache(hf: torch.nn.Module, keys: Sequence[Tensor], values: Sequence[Tensor], length: int):
    """A DynamicCache whose layers are (fixed) views of the given buffers."""
    cls = _buffer_layer_class()
    cache = new_cache(hf)
    cache.layers = [cls(k, v, length=length, fixed=True) for k, v in zip(keys, values)]
    return cache


def reusable(common: int, chunk: int) -> int:
    """How much of a prefix of ``common`` tokens shared with the previous prompt is reused:
    whole prefill chunks only, so the rest is prefilled in the chunks the prompt alone is
    prefilled in (same shapes, same kernels, same numbers)."""
    return common // chunk * chunk


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class KVPool:
    """KV buffers ``[rows, kv_heads, capacity, head_dim]`` per layer, and what each row holds.

    Row ``r`` holds the keys/values of ``self.body[r]`` (a prompt minus its last token). A
    new prompt body is prefilled into a row after copying in the prefix it shares with the
    most recently prefilled body (``self.last``), so only the rest is computed.
    """

    def __init__(self, hf: torch.nn.Module, n_layers: int) -> None:
        self._hf = weakref.ref(hf)  # a pool kept with its model (kept_pool) must not keep it alive
        self.n_layers = n_layers
        self.k: list[Tensor] = []
        self.v: list[Tensor] = []
        self.body: list[tuple[int, ...] | None] = []
        self.last: int | None = None
        self.key: Hashable = None
        self.chunk: int | None = None  # the prefill chunk the last filled row was computed in
        p = next(hf.parameters())
        self.device, self.dtype = p.device, p.dtype
        # each layer's keys and values live where the layer runs (a model split over devices)
        self.devices = layer_devices(hf, n_layers) or [self.device] * n_layers
        _, self.n_kv, self.head_dim = attention_shape(hf)
        self.n_heads = attention_shape(hf)[0]
        cfg = text_config(hf)
        self.hidden = int(cfg.hidden_size)
        self.inter = int(getattr(cfg, "intermediate_size", 4 * self.hidden))

    @property
    def hf(self) -> torch.nn.Module:
        hf = self._hf()
        if hf is None:
            raise RuntimeError("rhlens: the model of this KV pool is gone (engine bug)")
        return hf

    def forget(self) -> None:
        """Keep the buffers, trust none of what they hold (another run: other hooks, weights)."""
        self.body = [None] * len(self.body)
        self.last, self.key = None, None

    @property
    def rows(self) -> int:
        return self.k[0].shape[0] if self.k else 0

    @property
    def capacity(self) -> int:
        return self.k[0].shape[2] if self.k else 0

    def nbytes(self, device: torch.device | None = None) -> int:
        """Bytes of the buffers held now (on ``device`` only, if given)."""
        return sum(t.numel() * t.element_size() for t in self.k + self.v
                   if device is None or t.device == device)

    def row_bytes(self, capacity: int) -> int:
        return 2 * self.n_layers * self.n_kv * self.head_dim * capacity * self.dtype.itemsize

    def margin(self, capacity: int, chunk: int | None) -> int:
        """Bytes beside the KV buffers that a row of ``capacity`` tokens needs: one layer's
        prefill activations for a chunk (the residual, q/k/v, the attention's output and the
        projection [tokens, hidden]; the MLP's gate, up and product [tokens, intermediate]),
        the decode step's float32 scores over every key, and 1 GiB for kernel workspaces.
        Nothing else grows with the length: the attention after cached keys copies no K/V
        (:func:`~rhlens.engine.native.attention_lse`)."""
        tokens = min(capacity, chunk or capacity)
        prefill = tokens * (4 * self.inter + 8 * self.hidden) * self.dtype.itemsize
        decode = 4 * self.n_heads * capacity * 4
        return (1 << 30) + prefill + decode

    def fit_rows(self, want: int, capacity: int, chunk: int | None) -> int:
        """How many rows of ``capacity`` tokens fit on the device(s) (at most ``want``); a
        :class:`~rhlens.errors.ProbeError` before any compute if not even one does."""
        return self.fit(want, capacity, chunk)[0]

    def fit(self, want: int, capacity: int, chunk: int | None) -> tuple[int, int | None]:
        """``(rows, chunk)``: how many rows of ``capacity`` tokens fit on the device(s) (at most
        ``want``) with prefill chunks of ``chunk`` tokens; where not even one row fits, the
        chunk halved (down to :data:`MIN_CHUNK`) until one does: at a million tokens the KV is
        most of the card, and what else grows is one chunk's activations. A
        :class:`~rhlens.errors.ProbeError` before any compute if none fits."""
        if self.device.type != "cuda":
            return max(1, want), chunk
        free = {device: self._free(device) for device in dict.fromkeys(self.devices)}
        tried = chunk or capacity
        while True:
            rows, short = self._rows(want, capacity, tried, free)
            if rows:
                return rows, (tried if tried != (chunk or capacity) else chunk)
            if tried <= MIN_CHUNK:
                device, row, margin = short  # what it needs at the smallest chunk
                raise ProbeError(_too_big(capacity, device, row, margin, free[device]))
            tried = max(MIN_CHUNK, tried // 2)

    def _free(self, device) -> int:
        """Bytes this process may still take on ``device``, counting the pool's own buffers."""
        free, total = torch.cuda.mem_get_info(device)
        allocated = torch.cuda.memory_allocated(device)
        free += torch.cuda.memory_reserved(device) - allocated
        fraction = getattr(torch.cuda.memory, "get_per_process_memory_fraction", None)
        if fraction is not None:  # a process capped below the card's memory
            free = min(free, int(total * fraction(device)) - allocated)
        return free + self.nbytes(device)

    def _rows(self, want: int, capacity: int, chunk: int, free: dict) -> tuple[int, tuple | None]:
        rows, short = max(1, want), None
        margin = self.margin(capacity, chunk)
        for device, room in free.items():  # each device holds its layers' share
            layers = sum(d == device for d in self.devices)
            row = self.row_bytes(capacity) * layers // self.n_layers
            if room - margin < row:
                return 0, (device, row, margin)
            rows = min(rows, int((room - margin) // row))
        return rows, short

    def ensure(self, rows: int, capacity: int, first: tuple[int, ...], key: Hashable,
               reuse: bool, chunk: int) -> None:
        """At least ``rows`` rows of ``capacity`` tokens (keeping a reusable prefix of ``first``)."""
        if self.k and self.rows >= rows and self.capacity >= capacity:
            return
        carry = None
        if reuse and self.k and self.last is not None and key == self.key:
            keep = self._reusable(first, chunk)
            if keep:
                r = self.last
                carry = ([k[r:r + 1, :, :keep].clone() for k in self.k],
                         [v[r:r + 1, :, :keep].clone() for v in self.v], first[:keep])
        self.k, self.v, self.body, self.last = [], [], [], None  # free before allocating
        shape = (rows, self.n_kv, capacity, self.head_dim)
        self.k = [torch.empty(shape, dtype=self.dtype, device=d) for d in self.devices]
        self.v = [torch.empty(shape, dtype=self.dtype, device=d) for d in self.devices]
        self.body = [None] * rows
        if carry is not None:
            ks, vs, ids = carry
            for dst, src in zip(self.k + self.v, ks + vs):
                dst[:1, :, :src.shape[2]].copy_(src)
            self.body[0], self.last = ids, 0

    def _reusable(self, body: tuple[int, ...], chunk: int) -> int:
        """Leading tokens of ``body`` whose KV the last filled row holds, exactly as ``body``
        alone computes them: all of them for the same body again (one prompt under several
        decode-time policies), else the shared prefix cut back to whole chunks."""
        last = self.body[self.last]
        if last == body:
            return len(body)
        if self.chunk != chunk:  # its keys were computed in other chunks: other rounding
            return 0
        return reusable(_common_prefix(last, body), chunk)

    def fill(self, model, row: int, body: tuple[int, ...], key: Hashable, reuse: bool,
             chunk: int, attn: str = "lower_right", on_chunk=None) -> int:
        """Prefill ``body`` into ``row``; returns how many leading tokens were reused.

        The reused prefix is cut back to a multiple of ``chunk``, so the rest is prefilled in
        the chunks the body alone is prefilled in: same shapes, same kernels, same numbers.
        ``attn``: how a chunk after cached keys computes its attention (see
        :func:`~rhlens.engine.native.prefill`).
        """
        keep = 0
        if reuse and self.last is not None and key == self.key:
            keep = self._reusable(body, chunk)
        if keep and self.last != row:
            src = self.last
            for t in self.k + self.v:
                t[row, :, :keep].copy_(t[src, :, :keep])
        self.body[row], self.last, self.key = None, None, key
        cache = buffer_cache(self.hf, [k[row:row + 1] for k in self.k],
                             [v[row:row + 1] for v in self.v], keep)
        prefill(model, body[keep:], cache, chunk=chunk, attn=attn, on_chunk=on_chunk)
        self.body[row], self.last, self.chunk = body, row, chunk
        return keep

    def decode_cache(self, rows: int, length: int):
        """A cache over the first ``rows`` rows, ``length`` tokens filled."""
        return buffer_cache(self.hf, [k[:rows] for k in self.k], [v[:rows] for v in self.v], length)


def _too_big(capacity: int, device, row: int, margin: int, free: int) -> str:
    gib = 2 ** 30
    return (f"a prompt of {capacity:,} tokens (with its new tokens) needs {row / gib:.1f} GiB of KV "
            f"cache plus about {margin / gib:.1f} GiB for the prefill on {device}, which has "
            f"{free / gib:.1f} GiB free (even with prefill chunks of {MIN_CHUNK:,} tokens): use "
            "shorter lengths, a GPU with more memory, or spread the model over several GPUs (device_map)")


# A GPU model's pool, kept between runs: the captured decode step's CUDA graphs hold the KV
# buffers' addresses, and a pool made anew per run came back at other addresses on about every
# other call (a 37 ms re-capture of an 8K-token Llama-3-8B probe's 0.6 s, H100: BENCHMARKS.md H).
_KEPT: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _keep_between_runs(device: torch.device) -> bool:
    return device.type == "cuda"  # where graphs are captured


def _keep_cap(device: torch.device) -> int:
    """The largest pool kept after its run: an eighth of the device's memory (a Llama-3-8B row
    of 32K tokens is 4 GiB; a 131K one, 16 GiB, whose prefill takes seconds, is not worth
    holding for a 37 ms capture)."""
    return torch.cuda.get_device_properties(device).total_memory // 8


def kept_pool(hf: torch.nn.Module, n_layers: int, owner: object) -> KVPool:
    """The KV pool for a run of ``hf`` by ``owner``: on a GPU the model's kept pool (its buffers
    reused, their contents forgotten) unless another live run holds it; a new pool elsewhere.
    :func:`release_buffers` frees it."""
    if not _keep_between_runs(next(hf.parameters()).device):
        return KVPool(hf, n_layers)
    got = _KEPT.get(hf)
    if got is not None and got[1]() is not None:  # in use by a live run (e.g. two open generators)
        return KVPool(hf, n_layers)
    pool = got[0] if got is not None and got[0].n_layers == n_layers else KVPool(hf, n_layers)
    pool.forget()
    _KEPT[hf] = (pool, weakref.ref(owner))
    return pool


def done_with(hf: torch.nn.Module, pool: KVPool) -> None:
    """A run has ended: its pool stays kept unless it holds more than :func:`_keep_cap`."""
    got = _KEPT.get(hf)
    if got is None or got[0] is not pool:
        return
    _KEPT[hf] = (pool, lambda: None)  # no live owner now
    if pool.nbytes() > _keep_cap(pool.device):
        del _KEPT[hf]


def forget_pool(hf: torch.nn.Module) -> None:
    """Drop the KV pool kept for the HF model ``hf`` (:func:`rhlens.engine.release_buffers`)."""
    _KEPT.pop(hf, None)
