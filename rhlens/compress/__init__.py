"""Head-selective KV caches: keep the whole context only for the heads that retrieve.

Detect, then compress with what was detected, then measure against the standard baselines at
equal memory (issue 17):

* :mod:`~rhlens.compress.policy`: :class:`HeadPolicy` (which KV heads keep everything, what the
  others keep), the exact byte accounting of a model's real cache (:class:`CacheLayout`), and
  the policies a budget buys (ranked, random, StreamingLLM, full);
* :mod:`~rhlens.compress.mask`: a policy as a decode-time attention mask on any bridged model
  (:func:`policy_hooks`, :class:`PolicyMask`);
* :mod:`~rhlens.compress.packed`: a packed cache for Llama-family models where streaming heads
  really hold only sink + window keys (:func:`packed_generate`), for memory and time;
* :mod:`~rhlens.compress.sweep`: NIAH score against the KV budget for every policy
  (:func:`compress_sweep`, :class:`CompressSweepResult`);
* the ``rhlens compress`` subcommand lives with the others, in :mod:`rhlens.cli.compress`.
"""

from rhlens.compress.mask import PolicyMask, policy_hooks
from rhlens.compress.policy import (
    CacheLayout,
    CompressConfig,
    HeadPolicy,
    budget_policy,
    full_heads_for_budget,
    full_policy,
    kv_grid,
    random_policy,
    rank_kv_heads,
    streaming_policy,
)
from rhlens.compress.sweep import CompressSweepResult, compress_sweep, sweep_policies

__all__ = [
    "CacheLayout",
    "CompressConfig",
    "CompressSweepResult",
    "HeadPolicy",
    "PolicyMask",
    "budget_policy",
    "compress_sweep",
    "full_heads_for_budget",
    "full_policy",
    "kv_grid",
    "policy_hooks",
    "random_policy",
    "rank_kv_heads",
    "streaming_policy",
    "sweep_policies",
]
