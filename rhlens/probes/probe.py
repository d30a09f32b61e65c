"""The ``Probe``: one needle-in-a-haystack prompt, as exact token ids, with its needle located."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from rhlens.errors import ProbeError

__all__ = ["Probe"]


@dataclass(frozen=True)
class Probe:
    """One needle-in-a-haystack prompt.

    Attributes:
        prompt_ids: the exact token ids fed to the model.
        needle_span: ``[start, end)`` in ``prompt_ids`` of the answer tokens (the paper's
            ``real_needle`` inside the needle sentence): the positions a retrieval head copies from.
        real_needle: the expected answer; ROUGE-1 recall of the response is taken against it.
        length: target context length in tokens (the grid coordinate).
        depth: requested needle depth in percent of the haystack (the grid coordinate);
            where the needle really went is :attr:`placed_depth`.
        needle_id: which needle was inserted.
        question: the question asked.
        meta: anything else worth keeping with results (haystack source, seed, ...).
    """

    prompt_ids: Sequence[int]
    needle_span: Sequence[int]
    real_needle: str
    length: int = 0
    depth: float | int = 0.0
    needle_id: str = "custom"
    question: str = ""
    meta: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "prompt_ids", tuple(int(t) for t in self.prompt_ids))
        object.__setattr__(self, "needle_span", tuple(int(x) for x in self.needle_span))
        object.__setattr__(self, "depth", float(self.depth))
        start, end = self.needle_span
        if not self.prompt_ids:
            raise ProbeError("a probe needs a non-empty prompt")
        if not 0 <= start < end <= len(self.prompt_ids):
            raise ProbeError(
                f"needle span [{start}, {end}) does not lie inside the {len(self.prompt_ids)}-token "
                "prompt; the needle could not be located"
            )
        if not self.real_needle.strip():
            raise ProbeError("real_needle (the expected answer) is empty")

    @property
    def key(self) -> str:
        """A stable identifier for resuming runs: length, depth and needle."""
        return f"len{self.length}-depth{self.depth:g}-{self.needle_id}"

    @property
    def placed_depth(self) -> float:
        """The needle's actual depth: haystack tokens before it, in percent of the haystack
        (``depth`` when the probe was made by hand and does not say)."""
        return float(self.meta.get("placed_depth", self.depth))

    @property
    def placement(self) -> dict[str, Any]:
        """Where the needle really is, for records: ``placed_depth`` and ``insert_token``."""
        return {"placed_depth": self.placed_depth,
                "insert_token": int(self.meta.get("insert_token", self.needle_span[0]))}

    @property
    def n_tokens(self) -> int:
        return len(self.prompt_ids)

    @property
    def needle_len(self) -> int:
        return self.needle_span[1] - self.needle_span[0]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["prompt_ids"] = list(self.prompt_ids)
        d["needle_span"] = list(self.needle_span)
        return d
