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
    width = 3 * pool.inter + 12 * pool.hidden
    margin = 2 * GIB + capacity * width * 2 * pool.dtype.itemsize
    # computed here by hand: (free - margin) // row, capped at the wanted rows
    assert pool.fit_rows(10 ** 9, capacity, chunk=None) == (3 * GIB - margin) // row
    assert pool.fit_rows(3, capacity, chunk=None) == 3
