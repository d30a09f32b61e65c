"""Head ablation: knocking heads out while the model answers (the paper's masking experiments)."""

from __future__ import annotations

import random

from rhlens.errors import ConfigError

__all__ = ["random_heads"]

Head = tuple[int, int]


def random_heads(n_layers: int, n_heads: int, k: int, *, seed: int = 0,
                 exclude: list[Head] | None = None) -> list[Head]:
    """``k`` distinct (layer, head) pairs drawn uniformly from the model's real grid.

    Heads in ``exclude`` (typically the top retrieval heads) are never drawn. The same seed
    gives the same heads. (The paper's code drew from a hard-coded 32 x 32 grid.)
    """
    banned = {tuple(h) for h in (exclude or [])}
    pool = [(la, h) for la in range(n_layers) for h in range(n_heads) if (la, h) not in banned]
    if not 0 <= k <= len(pool):
        raise ConfigError(f"cannot draw {k} random heads: {len(pool)} heads are available "
                          f"({n_layers}x{n_heads} grid, {len(banned)} excluded)")
    return sorted(random.Random(seed).sample(pool, k))
