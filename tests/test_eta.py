"""The progress bar's remaining time (rhlens.store.eta), on synthetic schedules with a fake
clock: none until the second batch's first decode step (just after the first probe, batch size
1), then within a factor of 2 of the true remaining time at every update while a quarter of the
run is left (and within a quarter of the run's time after), where tqdm's average rate (the
bar's ETA before) was off by more than 10 times."""

from __future__ import annotations

import random
from dataclasses import dataclass

import pytest

from rhlens.store.eta import Eta
from rhlens.store.logs import Records


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


@dataclass
class Schedule:
    """Batches of items (their weights: prompt tokens), each: a prefill of ``prefill`` seconds
    per token not reused, ``steps`` decode steps of ``step`` seconds, ``record`` seconds per
    item; the first prefill ``warmup`` times slower (a first call's kernels)."""

    batches: list[list[int]]
    steps: list[int]
    reused: list[int]
    max_new: int = 32
    prefill: float = 1e-3
    step: float = 0.1
    record: float = 0.02
    setup: float = 2.0  # before the first prefill (planning, the first call)
    warmup: float = 3.0


def demo_like(seed: int, *, rows: int = 1, step: float = 0.1, prefill: float = 1e-3) -> Schedule:
    """make demo's grid: lengths 500 and 1000 (minus the answer buffer), 3 depths, 2 needles,
    short ones first; each needle's answer takes its own number of steps (give or take 2), and
    two probes fail and run to the end; prefixes reused within a length; a batch holds probes
    of one needle and length (equal token counts)."""
    rng = random.Random(seed)
    answers = (rng.randrange(8, 16), rng.randrange(16, 28))  # each needle's
    extra = (rng.randrange(0, 20), rng.randrange(20, 40))  # each needle's tokens
    failed = set(rng.sample(range(12), 2))
    batches, steps, reused = [], [], []
    for n in (300, 800):
        for needle in (0, 1):
            probes = [(i, n + extra[needle]) for i in range(len(batches) * 3, len(batches) * 3 + 3)]
            for i in range(0, 3, rows):
                chunk = probes[i:i + rows]
                reused.append(0 if not i and not needle else int(0.5 * n))
                batches.append([size for _, size in chunk])
                steps.append(max(32 if j in failed else answers[needle] + rng.randrange(-2, 3)
                                 for j, _ in chunk))
    return Schedule(batches, steps, reused, step=step, prefill=prefill)


def run(schedule: Schedule, records: Records, clock: Clock):
    """Play ``schedule`` through ``records`` (as detect does: an advance per decode step of
    the batch's share, a record per item); yields (time, estimate, n on the bar) after each."""
    clock.t += schedule.setup
    for b, (batch, steps, reused) in enumerate(zip(schedule.batches, schedule.steps, schedule.reused)):
        warm = schedule.warmup if b == 0 else 1.0
        clock.t += warm * schedule.prefill * (sum(batch) - reused * len(batch))
        share = sum(batch) / schedule.max_new
        for _ in range(steps):
            clock.t += schedule.step * (1 + 0.3 * (len(batch) - 1))
            records.advance(share)
            yield b, clock.t, records.eta.remaining(), records.bar.n
        for i in range(len(batch)):
            clock.t += schedule.record
            records.add({"key": f"{b}.{i}"})
            yield b, clock.t, records.eta.remaining(), records.bar.n


def play(schedule: Schedule):
    clock = Clock()
    weights = {f"{b}.{i}": n for b, batch in enumerate(schedule.batches) for i, n in enumerate(batch)}
    records = Records(None, progress=True, total=len(weights), desc="t", unit="probe",
                      weights=weights, clock=clock)
    try:
        points = list(run(schedule, records, clock))
    finally:
        records.close()
    return points, clock.t, sum(weights.values())


SCHEDULES = {
    "demo, decode-heavy": demo_like(0),
    "demo, prefill-heavy": demo_like(1, step=0.02, prefill=4e-3),
    "batches of 2": demo_like(2, rows=2),
    "batches of 3, fast decode": demo_like(3, rows=3, step=0.03),
}


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_eta_after_the_first_batch_is_within_a_factor_of_2(name):
    schedule = SCHEDULES[name]
    points, end, _ = play(schedule)
    first = sum(1 for b, *_ in points if b == 0)
    assert all(eta is None for _, _, eta, _ in points[:first])  # nothing during the first batch
    checked = 0
    for _, t, eta, _ in points[first:]:  # from the second batch's first step on
        true = end - t
        assert eta is not None
        if true >= end / 4:
            assert true / 2 <= eta <= 2 * true, (t, eta, true)
            checked += 1
        else:  # the last batches: when each will stop is what is left to know
            assert abs(eta - true) <= end / 4, (t, eta, true)
    assert checked > 20


def test_tqdm_average_rate_was_far_off_on_these_schedules():
    """The schedules are hard enough to tell: the rule the bar used before (elapsed x work
    left / work done, the work spread over the decode steps) gives a first estimate more than
    10 times the truth after the first decode step."""
    for schedule in SCHEDULES.values():
        points, end, total = play(schedule)
        _, t, _, n = points[0]
        assert t * (total - n) / n > 10 * (end - t)


def test_the_bar_shows_the_estimate():
    clock = Clock()
    records = Records(None, progress=True, total=3, desc="t", unit="probe",
                      weights={"a": 100, "b": 100, "c": 100}, clock=clock)
    try:
        clock.t = 5.0  # set-up and the first prefill
        records.advance(50)
        assert "<?" in str(records.bar)  # no estimate yet
        clock.t = 8.0  # 3 s a step
        records.advance(50)
        records.add({"key": "a"})
        assert "<?" in str(records.bar)  # the first batch's prefill held the set-up
        clock.t = 13.0  # the second: 2 s of prefill and a step
        records.advance(50)
        # b: 3 s of decode left (a decoded for 6 s); c: 2 s of prefill, 6 s of decode
        assert records.eta.remaining() == pytest.approx(11.0)
        assert "<00:11" in str(records.bar)
    finally:
        records.close()


def test_items_without_decode_steps_are_timed_whole():
    clock = Clock()
    eta = Eta(40, 4, clock=clock)
    clock.t = 5.0  # set-up and the first item
    eta.finish(10)
    assert eta.remaining() is None
    clock.t = 8.0
    eta.finish(10)
    assert eta.remaining() == pytest.approx(6.0)  # the second took 3 s
    clock.t = 9.0  # a second into the next item
    assert eta.remaining() == pytest.approx(5.0)


def test_items_finished_elsewhere_count_as_throughput():
    clock = Clock()
    eta = Eta(100, 10, clock=clock)
    clock.t = 10.0
    eta.elsewhere(2, 20)
    eta.elsewhere(3, 30)
    assert eta.remaining() == pytest.approx(10.0)  # 50 left at 5 a second


def test_resumed_and_unweighted_bars():
    clock = Clock()
    records = Records(None, progress=True, total=4, desc="t", initial=2, clock=clock)
    try:
        assert records.eta.left_items == 2 and records.eta.left_weight == 2
        for key in "xy":
            clock.t += 1.0
            records.advance(0.5)
            clock.t += 1.0
            records.advance(0.5)
            records.add({"key": key})
        assert records.eta.remaining() == 0.0
        assert records.bar.n == 4
    finally:
        records.close()


def test_prefill_chunks_move_the_bar_without_counting_as_decode_steps():
    """A prefill chunk (StepState.spread's advance(tokens, prefill=True)) moves the bar, so a
    prefill of minutes shows progress, but times no decode step: the same estimate as above."""
    clock = Clock()
    records = Records(None, progress=True, total=3, desc="t", unit="probe",
                      weights={"a": 100, "b": 100, "c": 100}, clock=clock)
    try:
        clock.t = 2.0
        records.advance(30, prefill=True)  # a prefill chunk, mid-way through the first prefill
        assert records.bar.n == 30 and records.eta.running is None
        clock.t = 5.0
        records.advance(10, share=50)  # the first step: the bar moves by what is left, spread
        clock.t = 8.0
        records.advance(60, share=50)
        records.add({"key": "a"})
        clock.t = 12.0
        records.advance(40, prefill=True)
        clock.t = 13.0
        records.advance(30, share=50)
        assert records.eta.remaining() == pytest.approx(11.0)  # as with decode-only advances
    finally:
        records.close()
