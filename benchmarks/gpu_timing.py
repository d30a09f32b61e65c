"""CUDA timers shared by the small benchmark scripts (one warm-up call each)."""

from __future__ import annotations

import time

import torch


def mean_seconds(fn, repeats: int = 50) -> float:
    """Mean seconds a call over ``repeats`` back-to-back calls, one sync at the end
    (throughput of launches that queue on the GPU)."""
    fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(repeats):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / repeats


def median_seconds(fn, repeats: int) -> float:
    """Median seconds of ``repeats`` calls, each synced (latency of one call)."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]
