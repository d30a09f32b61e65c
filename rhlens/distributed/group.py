"""The launch a process belongs to: its torch.distributed group, its folder lock, its devices."""

from __future__ import annotations

import datetime
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rhlens.errors import ConfigError, RhlensError
from rhlens.store.logs import lock_output

__all__ = ["Group", "current_group", "is_main", "lock_launch", "on_main", "rank_device",
           "rank_max_memory", "shutdown"]


@dataclass
class Group:
    """This process' place in a launch: ``rank`` of ``world`` (``local_rank`` on its node),
    the ``launch`` id rank 0 drew (it names the shard folders), the gloo group used to pass
    small objects and the store that holds the work queues."""

    rank: int
    world: int
    local_rank: int
    launch: str
    pg: Any = None  # None: the default group (gloo)
    store: Any = None
    owned: bool = False  # initialised here (and destroyed by shutdown())
    sweeps: int = 0  # sweeps opened so far: every rank opens the same ones in the same order

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        import torch.distributed as dist

        dist.barrier(group=self.pg)

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj``, on every rank."""
        import torch.distributed as dist

        box = [obj if self.main else None]
        dist.broadcast_object_list(box, src=0, group=self.pg)
        return box[0]

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order, on every rank."""
        import torch.distributed as dist

        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj, group=self.pg)
        return out


_GROUP: Group | None = None


def _launched() -> bool:
    """Started by torchrun (or another launcher that sets torch's env:// variables)."""
    env = os.environ
    return all(k in env for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


def current_group() -> Group | None:
    """The launch this process is part of: the process group already initialised (a user's
    own ``init_process_group``), or one initialised here (gloo, env://) when torchrun started
    this process; ``None`` for a plain single process."""
    global _GROUP
    if _GROUP is None and "torch" not in sys.modules and not _launched():
        return None  # nothing can have started a group, and a lock check need not load torch
    try:
        import torch.distributed as dist
    except ImportError:  # pragma: no cover - torch without distributed
        return None
    if not dist.is_available():  # pragma: no cover
        return None
    if _GROUP is not None and dist.is_initialized():
        return _GROUP
    owned = False
    if not dist.is_initialized():
        if not _launched():
            return None
        dist.init_process_group("gloo", timeout=datetime.timedelta(hours=4))
        owned = True
    # Objects travel through gloo; a user's NCCL group gets a gloo twin for them.
    pg = None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    group = Group(rank=rank, world=world, local_rank=int(os.environ.get("LOCAL_RANK", rank)),
                  launch="", pg=pg, owned=owned)
    group.launch = group.broadcast(f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}")
    try:
        group.store = dist.distributed_c10d._get_default_store()
    except (AttributeError, RuntimeError, ValueError):  # pragma: no cover - no store: static split
        group.store = None
    _GROUP = group
    return group


def is_main() -> bool:
    """Whether this process writes a run's final outputs: rank 0 of a launch, or the only one."""
    group = current_group()
    return group is None or group.main


def shutdown() -> None:
    """Destroy the process group if it was initialised here (the CLI calls it at exit)."""
    global _GROUP
    if _GROUP is not None and _GROUP.owned:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
    _GROUP = None


def rank_device(device: str | None) -> str | None:
    """``cuda`` (or the default device) as this rank's GPU, ``cuda:LOCAL_RANK``, inside a
    torchrun launch; anything else as given."""
    if "LOCAL_RANK" not in os.environ or device not in (None, "cuda"):
        return device
    import torch

    if not torch.cuda.is_available():
        return device
    local = int(os.environ["LOCAL_RANK"])
    if local >= torch.cuda.device_count():
        raise ConfigError(f"this is process {local} on its machine, which has "
                          f"{torch.cuda.device_count()} GPU(s): start at most that many per node")
    return f"cuda:{local}"


def rank_max_memory() -> dict[int, int] | None:
    """This process' share of the node's GPUs as a ``max_memory`` (their free memory), when a
    torchrun launch puts several processes on one machine and each spreads a model over
    several GPUs: process ``r`` of ``n`` takes GPUs ``r*m .. r*m+m-1``, ``m`` = GPUs // ``n``.
    ``None`` (every visible GPU) otherwise."""
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if local_world <= 1 or "LOCAL_RANK" not in os.environ:
        return None
    import torch

    if not torch.cuda.is_available():
        return None
    n = torch.cuda.device_count()
    per = n // local_world
    if per < 1:
        raise ConfigError(f"{local_world} processes on a machine with {n} GPU(s) cannot each "
                          "spread a model over GPUs: start fewer, or give --max-memory")
    local = int(os.environ["LOCAL_RANK"])
    return {g: int(torch.cuda.mem_get_info(g)[0]) for g in range(local * per, (local + 1) * per)}


def on_main(group: Group | None, fn, *, share: bool = False) -> Any:
    """``fn()`` on rank 0 (in this process when there is no group), and its error on every
    rank (a ConfigError when it was one of rhlens' errors), so that no rank waits for a rank
    that failed. Returns ``fn()``'s value on rank 0, and on the other ranks too with
    ``share`` (it is then sent to them; else they get ``None``)."""
    if group is None:
        return fn()
    value, error = None, None
    if group.main:
        try:
            value = fn()
        except Exception as exc:  # every rank must hear of it, or they would wait forever
            error = exc
    failure = None if error is None else (isinstance(error, RhlensError), f"{error}")
    failure, shared = group.broadcast((failure, value if share and error is None else None))
    if error is not None:
        raise error
    if failure is not None:
        ours, message = failure
        raise (ConfigError if ours else RuntimeError)(message if ours else
                                                      f"rank 0 failed: {message}")
    return value if group.main else shared


def lock_launch(out: str | Path) -> Path:
    """Take ``out`` for this launch (:func:`rhlens.io.lock_output` on rank 0; every rank gets
    its refusal), or for this process when it is not part of one."""
    return Path(on_main(current_group(), lambda: lock_output(out)) or out)


