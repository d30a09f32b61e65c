"""Data parallel over torch.distributed: a sweep split across ranks, a shard log each, merged at the end.

Launch any command under ``torchrun`` (one process per GPU; several nodes through its
rendezvous; the same on CPUs with gloo)::

    torchrun --nproc-per-node 8 -m rhlens detect ... --out DIR

Every analysis that runs a list of independent items (detection probes, NIAH answers under
masks, CoT answers, patching pairs) runs them through a :class:`Sweep`:

* **the folder**: the launch takes ``DIR``'s lock (rank 0 holds it, the other ranks wait for
  its word), folds in the shards of earlier launches that died, and checks the run's identity
  (``run.json``), so every rank resumes from the same records;
* **the split**: items that share work in the engine (a haystack prefix it reuses, probes of
  one length it decodes together) form one *unit*, in the order that reuses the most
  (:func:`prefix_order`: one length's probes of one haystack, needles and depths mixed,
  sorted by their tokens); each unit's cost is predicted (prompt tokens prefilled after the
  reuse, plus :data:`DECODE_STEP_TOKENS` per decode step of its batches) and the units are
  taken longest first from a queue, the torch.distributed store's atomic counter:
  a rank that finishes early takes the next unit, so the ranks finish together even when
  the model of the cost is off (attention's share of long prompts, a slower GPU);
* **the logs**: each rank appends its records to its own ``DIR/shards/<launch>/r<rank>/<log>``
  (:class:`~rhlens.io.ShardLog`); when every rank is done, rank 0 merges them into the log a
  one-process run writes, in the order it writes it, and records each rank's busy time,
  items, prompt tokens prefilled (``prefill_tokens``) and reused (``reused_tokens``) and
  tokens generated in the log's header (``launches``, beside the identity, with their sums
  under ``total``; a one-process run records itself as a launch of one). A rerun with any
  number of processes (one, without torchrun) reads the log and every shard, so nothing is
  lost or computed twice;
* **progress**: one bar on rank 0, fed by every rank through the store.

Results do not depend on the split: each item's record is what it gets alone (the engine's
batched = alone guarantee), and results are assembled from the records in the caller's order.

Without torchrun: :func:`shard` gives one process' share of a work list (the same planning,
assigned statically), an analysis given that share logs into its own shard of ``out``, and
:func:`merge_shards` folds the shards into the run's logs.
"""

from rhlens.distributed.group import (
    Group,
    current_group,
    is_main,
    lock_launch,
    rank_device,
    rank_max_memory,
    shutdown,
)
from rhlens.distributed.plan import (
    DECODE_STEP_TOKENS,
    Shard,
    Unit,
    decode_step_tokens,
    engine_plan,
    plan_units,
    prefix_order,
    schedule,
    shard,
    shard_of,
)
from rhlens.distributed.sweep import Sweep, merge_shards

__all__ = [
    "DECODE_STEP_TOKENS",
    "Group",
    "Shard",
    "Sweep",
    "Unit",
    "current_group",
    "decode_step_tokens",
    "engine_plan",
    "is_main",
    "lock_launch",
    "merge_shards",
    "plan_units",
    "prefix_order",
    "rank_device",
    "rank_max_memory",
    "schedule",
    "shard",
    "shard_of",
    "shutdown",
]
