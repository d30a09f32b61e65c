"""A probe that cannot fit on the GPU is refused before its prefill (issue 26), with the memory
it needs and what is free; rows of a batch are sized by what fits."""

import pytest
import torch

from rhlens.engine import hf_model
from rhlens.engine.kv import KVPool
from rhlens.errors import ProbeError

GIB = 2 ** 30


def _gpu_pool(toy_model, monkeypatch, free: int) -> KVPool:
    model, _ = toy_model
    hf = hf_model(model)
    pool = KVPool(hf, len(model.blocks))
    cuda = torch.device("cuda", 0)
    pool.device, pool.devices = cuda, [cuda] * pool.n_layers
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free, 80 * GIB))
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 0)
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 0)
    monkeypatch.setattr(torch.cuda.memory, "get_per_process_memory_fraction", lambda device=None: 1.0)
    return pool


def test_a_row_that_does_not_fit_is_refused_with_what_it_needs_and_what_is_free(toy_model, monkeypatch):
    pool = _gpu_pool(toy_model, monkeypatch, free=3 * GIB)
    capacity = (2 * GIB) // (pool.row_bytes(1)) + 1  # a KV row of just over 2 GiB
    with pytest.raises(ProbeError) as err:
        pool.fit_rows(1, capacity, chunk=1024)
    msg = str(err.value)
    assert f"{capacity:,} tokens" in msg and "GiB free" in msg and "3.0 GiB free" in msg


def test_rows_are_what_fits_beside_the_prefill_margin(toy_model, monkeypatch):
    pool = _gpu_pool(toy_model, monkeypatch, free=3 * GIB)
    capacity = 1024
    row = pool.row_bytes(capacity)
    # by hand: 1 GiB, one chunk's activations (4 [tokens, inter] + 8 [tokens, hidden]) and the
    # decode step's float32 scores (4 of [heads, keys])
    margin = GIB + capacity * (4 * pool.inter + 8 * pool.hidden) * pool.dtype.itemsize
    margin += 4 * pool.n_heads * capacity * 4
    # computed here by hand: (free - margin) // row, capped at the wanted rows
    assert pool.fit_rows(10 ** 9, capacity, chunk=None) == (3 * GIB - margin) // row
    assert pool.fit_rows(3, capacity, chunk=None) == 3


def test_grouped_attention_over_cached_keys_copies_no_keys_and_matches_a_dense_reference(monkeypatch):
    """The prefill's attention of a chunk over cached keys (grouped-query heads) folds each K/V
    head's query heads into one run of queries: no K/V copied per query head (15 GiB at a
    million tokens), the same output and log-sum-exp as a dense float64 reference."""
    from rhlens.engine import native

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, h, n, 16, generator=g) for h, n in ((8, 24), (2, 300), (2, 300)))

    def no_copy(x, heads):
        if x.shape[1] != heads:
            raise AssertionError(f"K/V of {x.shape[2]} keys copied for {heads} heads")
        return x

    monkeypatch.setattr(native, "_expand", no_copy)
    out, lse = native.attention_lse(q, k, v, False, 0.25)
    kk, vv = k.repeat_interleave(4, 1).double(), v.repeat_interleave(4, 1).double()
    scores = q.double() @ kk.transpose(2, 3) * 0.25
    ref = torch.softmax(scores, -1) @ vv
    assert out.shape == (2, 8, 24, 16) and lse.shape == (2, 8, 24)
    assert float((out.double() - ref).abs().max()) < 1e-5
    assert float((lse.double() - torch.logsumexp(scores, -1)).abs().max()) < 1e-5


def test_a_row_too_long_for_the_default_chunk_fits_with_a_smaller_one(toy_model, monkeypatch):
    """A million-token probe on an 80 GB card: the KV is most of the card, so the prefill chunk
    shrinks (halving, not below MIN_CHUNK) until one row fits, instead of a refusal."""
    from rhlens.engine.kv import MIN_CHUNK

    pool = _gpu_pool(toy_model, monkeypatch, free=3 * GIB)
    capacity = 4096
    row = pool.row_bytes(capacity)
    big, small = pool.margin(capacity, 4096), pool.margin(capacity, MIN_CHUNK)
    assert small < big  # what the chunk's activations add
    room = row + (small + big) // 2  # fits with the small chunk only
    pool = _gpu_pool(toy_model, monkeypatch, free=room)
    assert pool.fit(10 ** 6, capacity, 4096) == ((room - small) // row, MIN_CHUNK)
    pool = _gpu_pool(toy_model, monkeypatch, free=row + big)  # the chunk asked for fits: kept
    assert pool.fit(1, capacity, 4096) == (1, 4096)
    with pytest.raises(ProbeError, match="even with prefill chunks"):
        _gpu_pool(toy_model, monkeypatch, free=row + small - 1).fit(1, capacity, 4096)


def test_the_progress_of_a_batch_moves_with_its_prefill_and_never_past_its_cost():
    from rhlens.engine.hooks import StepState

    state, moved, calls = StepState(), [], []

    def advance(amount, **kw):
        moved.append(amount)
        calls.append(kw)

    state.spread(1000, 4, advance)
    for tokens in (256, 256, 256):  # three prefill chunks of a 768-token body
        state.on_prefill(tokens)
    assert moved == [256, 256, 256] and calls == [{"prefill": True}] * 3
    for _ in range(6):  # more decode steps than announced (several batches): nothing past the cost
        state.on_step()
    assert sum(moved) == pytest.approx(1000) and moved[3:7] == [58, 58, 58, 58]
    assert calls[3:] == [{"share": 250.0}] * 4  # each step's even share, for the ETA


def test_a_prefix_is_reused_only_from_a_row_prefilled_in_the_same_chunks(toy_model):
    """A long prompt may be prefilled in smaller chunks than a short one (Runner.chunk_of): its
    keys must not start from a prefix computed in other chunks (other rounding than alone)."""
    from rhlens.engine.kv import KVPool

    model, _ = toy_model
    pool = KVPool(hf_model(model), len(model.blocks))
    vocab = model.cfg.d_vocab
    body = tuple(3 + i % (vocab - 3) for i in range(300))
    other = body[:256] + tuple(3 + (i * 7) % (vocab - 3) for i in range(44))
    pool.ensure(1, 400, body, None, True, 64)
    assert pool.fill(model, 0, body, None, True, 64) == 0
    assert pool.fill(model, 0, other, None, True, 64) == 256  # same chunks: the prefix is reused
    assert pool.fill(model, 0, body, None, True, 128) == 0  # other chunks: computed anew
