"""The remaining time a sweep's progress bar shows, its prefill and its decode estimated apart.

A sweep's items run in batches: a batch prefills its prompts (time growing with their tokens),
then decodes step by step (time per step, whatever the prompts' length), then its items finish
together. A bar that spreads an item's whole cost over its decode steps, as tqdm's average
rate does, credits the first step with a sliver of the work after the whole prefill has run:
its first estimate extrapolates the prefill to every step of the sweep (3 h 20 for a 7-minute
run). :class:`Eta` times the two phases apart instead:

* the first decode step of a batch comes after the batch's prefill, so the time from the end
  of the previous batch (or the start) to it is the prefill plus one step; the batch's later
  steps time a step;
* from the batches finished so far: decode seconds per batch, items per batch; from every batch
  begun but the first: prefill seconds per unit of weight (prompt tokens);
* remaining = prefill rate x the weight not yet started + decode time per batch x the batches
  not yet started + what is left of the running batch.

No estimate (``None``, the bar shows ``?``) before the second batch's first decode step: until
the first batch finishes, the number of decode steps a batch takes (answers stop early) and its
weight are unknown, and its prefill holds the run's set-up and the first call's warm-up (a
compile, on a GPU), which the second batch's prefill does not. Items that finish with no decode
step (an analysis without one) are timed whole, from the second on. Items other
processes finish (:meth:`Eta.elsewhere`) run in parallel with this one: the estimate is then
the weight left over the sweep's throughput since the start.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["Eta"]


@dataclass
class _Batch:
    weight: float = 0.0  # the weight of its items
    items: int = 0
    steps: int = 0  # decode steps timed
    first_amount: float = 0.0  # its first step's share of its weight
    gap: float = 0.0  # from the previous batch's end to its first step (or its end, if none)
    first_step: float = 0.0  # when its first step ended
    end: float = 0.0  # when its last item finished
    last_step: float = 0.0  # when its last step ended


class Eta:
    """Remaining seconds of a sweep (see the module's description).

    ``left_weight`` / ``left_items``: what the sweep has still to do at the start; ``clock``:
    seconds (tests pass a fake one)."""

    def __init__(self, left_weight: int | float, left_items: int, *,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        self.clock = clock
        self.left_weight, self.left_items = float(left_weight), int(left_items)
        self.t0 = self.mark = clock()  # mark: the end of the previous batch
        self.done: list[_Batch] = []  # finished batches
        self.running: _Batch | None = None  # a batch whose steps have begun
        self.step_time, self.step_count = 0.0, 0  # decode steps after a batch's first
        self.last_step = 0.0
        self.finished_weight = 0.0  # here, since the start
        self.elsewhere_weight = 0.0

    # -- events
    def step(self, amount: int | float) -> None:
        """A decode step of the running batch ended; ``amount``: its share of the batch's weight."""
        now = self.clock()
        if self.running is None:
            self.running = _Batch(steps=1, first_amount=float(amount), gap=now - self.mark,
                                  first_step=now)
        else:
            self.running.steps += 1
            self.step_time += now - self.last_step
            self.step_count += 1
        self.last_step = now

    def finish(self, weight: int | float) -> None:
        """An item of weight ``weight`` finished here."""
        now = self.clock()
        batch = self.running
        if batch is None:  # another row of the batch that just finished, or an item with no step
            batch = self.done.pop() if self.done and self.done[-1].steps else _Batch(gap=now - self.mark)
        self.running = None
        if batch.steps and not batch.items:
            batch.last_step = self.last_step
        batch.weight += float(weight)
        batch.items += 1
        batch.end = self.mark = now
        self.done.append(batch)
        self.finished_weight += float(weight)
        self.left_weight -= float(weight)
        self.left_items -= 1

    def elsewhere(self, items: int, weight: int | float) -> None:
        """``items`` of summed weight ``weight`` finished in other processes."""
        self.elsewhere_weight += float(weight)
        self.left_weight -= float(weight)
        self.left_items -= int(items)

    # -- the estimate
    def remaining(self) -> float | None:
        """Seconds left, or None while there is no honest estimate yet."""
        now = self.clock()
        left_w, left_i = max(0.0, self.left_weight), max(0, self.left_items)
        if left_i == 0:
            return 0.0
        if self.elsewhere_weight:
            finished = self.finished_weight + self.elsewhere_weight
            return left_w * (now - self.t0) / finished if finished > 0 else None
        run = self.running
        if not self.done or (run is None and len(self.done) < 2):
            return None  # the first batch's times hold the run's set-up: one more is needed
        step = self.step_time / self.step_count if self.step_count else 0.0
        weight = sum(b.weight for b in self.done)
        items = sum(b.items for b in self.done)
        stepped = [b for b in self.done if b.steps]
        tail = sum(b.end - b.last_step for b in stepped) / len(stepped) if stepped else 0.0
        rows = items / len(self.done)  # items per batch
        # a batch's weight from its first step's share (their ratio is the same for every batch)
        # (the largest: a batch whose rows are still arriving shows less)
        ratio = max((b.weight / b.first_amount for b in stepped if b.first_amount > 0), default=None)
        last = self.done[-1]
        # steps per batch: the mean of the batches done and of one that runs to the end (a
        # failed answer does; so early on, the estimate errs long)
        counts = [b.steps for b in self.done] + ([ratio] if ratio else [])
        per_batch = sum(counts) / len(counts) * step + tail  # decode s per batch (and its records)
        run_w = run_i = 0.0
        if run is not None:
            run_w = min(left_w, run.first_amount * ratio if ratio else weight / len(self.done))
            run_i = min(left_i, max(1, round(run_w * items / weight))) if weight > 0 else 1
        # prefill s per unit of weight, from every batch begun but the first (its gap holds the
        # set-up and the first call's warm-up)
        begun = [(b.gap - (step if b.steps else 0.0), b.weight) for b in self.done[1:]]
        if run is not None:
            begun.append((run.gap - step, run_w))
        per_weight = max(0.0, sum(g for g, _ in begun)) / max(1e-12, sum(w for _, w in begun))
        if run is not None:
            new_w, new_i = left_w - run_w, left_i - run_i
            # its decode left: as long as the batches that ran as far ran on, else to the end
            # (a batch's bar is full after `ratio` steps: the steps it may take)
            longer = [b.steps for b in stepped if b.steps > run.steps]
            to_go = (sum(longer) / len(longer) if longer else max(ratio or 0, run.steps + 1)) - run.steps
            rest = max(0.0, to_go * step - (now - self.last_step)) + tail
        elif last.steps and ratio and last.weight < 0.999 * last.first_amount * ratio:
            # the batch that just finished has rows still to come (at once)
            pending = min(left_w, last.first_amount * ratio - last.weight)
            new_w, new_i = left_w - pending, left_i - max(1, round(pending * items / weight))
            rest = 0.0
        else:
            # between batches: the next one's prefill may have begun
            new_w, new_i = left_w, left_i
            rest = -min(now - self.mark, per_weight * weight / len(self.done))
        return max(0.0, per_weight * new_w + per_batch * new_i / rows + rest)
