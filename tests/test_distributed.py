"""Data parallel through torchrun (gloo on the CPU): the same files as one process, resume after a
killed rank with any number of processes, the launch's lock, the schedule, shard logs."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import distributed_worker as worker
import numpy as np
import pytest

from rhlens.distributed import (
    DECODE_STEP_TOKENS,
    Sweep,
    engine_plan,
    merge_shards,
    plan_units,
    schedule,
    shard,
)
from rhlens.errors import ConfigError
from rhlens.io import ShardLog, lock_output, merge_logs, read_done, shard_dir, unlock_output

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(worker.__file__)
TIMING = ("seconds",)  # how long a probe took: the one field that differs between runs


def torchrun(n: int, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc-per-node", str(n), *args],
                          capture_output=True, text=True, env=env, timeout=timeout)


def records(path: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING}
            for line in path.read_text().splitlines()]


# ---------------------------------------------------------------------------------------
# torchrun against one process
# ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def one_process_toy(toy_model, tmp_path_factory):
    """The toy workloads run in this process (no group): the reference."""
    out = tmp_path_factory.mktemp("one")
    model, tok = toy_model
    return out, worker.both(model, tok, out)


def test_two_ranks_write_what_one_process_writes_on_the_toy_model(one_process_toy, tmp_path):
    """Detection, a NIAH sweep, a CoT run, head patching and detection without a folder under
    torchrun (2 ranks, gloo): the same head_scores.json byte for byte, the same records in the
    same order, the same results; the shards are merged away, each rank's timings recorded."""
    one, one_results = one_process_toy
    run = torchrun(2, str(WORKER), "both", str(tmp_path))
    assert run.returncode == 0, run.stderr[-3000:]
    two = tmp_path / "detect"
    assert (two / "head_scores.json").read_bytes() == (one / "detect" / "head_scores.json").read_bytes()
    assert records(two / "probes.jsonl") == records(one / "detect" / "probes.jsonl")
    # detection, NIAH, CoT, patching, and detection without a folder (records gathered)
    assert json.loads((tmp_path / "both_result.json").read_text()) == \
        json.loads(json.dumps(one_results))
    for log in ("niah.jsonl", "cot_items.jsonl", "patching.jsonl"):
        assert records(tmp_path / "sweeps" / log) == records(one / "sweeps" / log), log
    for folder in (two, tmp_path / "sweeps"):
        assert not (folder / "shards").exists()
    launch, = json.loads((two / "run.json").read_text())["launches"]
    assert launch["world"] == 2 and [r["rank"] for r in launch["ranks"]] == [0, 1]
    assert sum(r["items"] for r in launch["ranks"]) == 24
    assert all(r["busy_s"] > 0 and r["tokens"] > 0 for r in launch["ranks"])
    # the timings sit beside the identity, which a one-process rerun still accepts
    assert "launches" not in json.loads((two / "run.json").read_text())["identity"]


def test_a_killed_rank_then_a_rerun_with_three_or_one_processes(one_process_toy, toy_model,
                                                                 tmp_path):
    """Rank 1 dies (SIGKILL) after logging one record; torchrun stops the launch. Rerun with 3
    processes, or with 1 (no torchrun): every probe once, the records logged before the kill
    kept as they were (not recomputed), head_scores.json as in one uninterrupted process."""
    one = one_process_toy[0] / "detect"
    killed = tmp_path / "killed"
    run = torchrun(2, str(WORKER), "detect", str(killed), "--die-after", "1")
    assert run.returncode != 0
    logged = [json.loads(line) for path in sorted((killed / "shards").glob("*/r*/probes.jsonl"))
              for line in path.read_text().splitlines()]
    assert logged and len(logged) < 24
    for n in (3, 1):
        out = tmp_path / f"rerun{n}"
        shutil.copytree(killed, out)
        if n > 1:
            run = torchrun(n, str(WORKER), "detect", str(out))
            assert run.returncode == 0, run.stderr[-3000:]
        else:
            worker.detect(*toy_model, out)
        lines = [json.loads(line) for line in (out / "probes.jsonl").read_text().splitlines()]
        assert sorted(r["key"] for r in lines) == sorted(r["key"] for r in records(one / "probes.jsonl"))
        assert len({r["key"] for r in lines}) == 24
        by_key = {r["key"]: r for r in lines}
        assert all(by_key[r["key"]] == r for r in logged)  # byte for byte, seconds too
        assert (out / "head_scores.json").read_bytes() == (one / "head_scores.json").read_bytes()
        assert not (out / "shards").exists()


@pytest.mark.slow  # the toy-model launches above check the same in make test
def test_the_cli_under_torchrun_on_the_default_model(tmp_path):
    """``torchrun -m rhlens detect`` on a few default-model probes: the same head_scores.json
    and probe records as ``rhlens detect`` in one process, figures and summary written once."""
    from rhlens.cli import main

    args = ["detect", "--lengths", "400", "--depths", "0,100", "--n-needles", "2",
            "--max-new-tokens", "20", "--batch-size", "1", "--quiet"]
    assert main([*args, "--out", str(tmp_path / "one")]) == 0
    run = torchrun(2, "-m", "rhlens", *args, "--out", str(tmp_path / "two"))
    assert run.returncode == 0, run.stderr[-3000:]
    one, two = tmp_path / "one", tmp_path / "two"
    assert (two / "head_scores.json").read_bytes() == (one / "head_scores.json").read_bytes()
    assert records(two / "probes.jsonl") == records(one / "probes.jsonl")
    assert {p.name for p in two.iterdir()} == {p.name for p in one.iterdir()}
    assert run.stdout.count("top heads") == 1  # rank 0 talks, rank 1 does not
    ranks = json.loads((two / "run.json").read_text())["launches"][0]["ranks"]
    assert sorted(r["items"] for r in ranks) == [2, 2]  # 4 probes of one length, one at a time


def test_a_launch_on_a_folder_in_use_is_refused_on_every_rank(tmp_path):
    """The folder's lock is the launch's: held by another process, every rank stops at once."""
    out = tmp_path / "busy"
    lock_output(out)
    try:
        run = torchrun(2, "-m", "rhlens", "detect", "--out", str(out))
    finally:
        unlock_output(out)
    assert run.returncode != 0
    refusals = [line for line in run.stderr.splitlines() if "is in use by another rhlens process" in line]
    # every rank refuses; torchrun may stop the slower one before it writes its line (a loaded machine)
    assert 1 <= len(refusals) <= 2 and f"(pid {os.getpid()})" in refusals[0]
    assert "loading" not in run.stdout


# ---------------------------------------------------------------------------------------
# The plan
# ---------------------------------------------------------------------------------------
def _grid(lengths, depths, needles: int = 1, seed: int = 0) -> list[np.ndarray]:
    """NIAH prompts as the engine sees them: one haystack, the needle moved, deepest first."""
    rng = np.random.default_rng(seed)
    hay = rng.integers(3, 30000, max(lengths), dtype=np.int32)
    out = []
    for n in lengths:
        for _ in range(needles):
            needle = rng.integers(3, 30000, 8, dtype=np.int32)
            body = hay[: n - 25]
            for d in sorted(depths, reverse=True):
                at = round(len(body) * d / 100)
                out.append(np.concatenate([[1], body[:at], needle, body[at:], np.full(16, 7)]))
    return out


def test_the_schedule_balances_a_1k_to_128k_grid_on_8_ranks():
    """20 lengths from 1K to 128K x 10 depths, one needle, the detection defaults (8 probes a
    batch, 50 new tokens, 32K prefill chunks): every rank's predicted cost within 10% of the
    mean, every unit on one rank, and no unit cut where the engine shares work."""
    lengths = np.linspace(1024, 131072, 20).round().astype(int).tolist()
    prompts = _grid(lengths, np.linspace(0, 100, 10))
    costs, links = engine_plan(prompts, max_new_tokens=50, batch_size=8)
    units = plan_units(costs, links)
    ranks = schedule(units, 8)
    assert sorted(u for r in ranks for u in r) == list(range(len(units)))
    load = np.array([sum(units[u].cost for u in r) for r in ranks])
    assert np.abs(load - load.mean()).max() <= 0.10 * load.mean(), load
    # A cut is only where the engine starts afresh: a new batch, and no reused prefix.
    chunk = 32768
    starts = {u.items[0] for u in units}
    for i in range(1, len(prompts)):
        a, b = prompts[i - 1][:-1], prompts[i][:-1]
        m = min(len(a), len(b))
        common = int(np.argmax(a[:m] != b[:m])) if (a[:m] != b[:m]).any() else m
        if common >= chunk:
            assert i not in starts, f"prompt {i} reuses {common // chunk * chunk} tokens of {i - 1}"
    # and the cost is the prefilled tokens plus the decode steps' share
    assert costs[0] == pytest.approx(len(prompts[0]) - 1 + DECODE_STEP_TOKENS * 50 / 8)


def test_the_plan_predicts_what_the_engine_does(toy_model):
    """The links the planner predicts are the engine's own: a prompt runs in the previous one's
    batch, or reuses its prefix (one whole prefill chunk at least), exactly where it says."""
    from rhlens.engine import GenerationConfig, generate_many

    model, tok = toy_model
    base = worker.toy_probes(tok)
    # prompts sharing long prefixes, of equal and unequal lengths
    prompts = [p.prompt_ids for p in base[:6]]
    prompts += [prompts[0][:30] + prompts[1][30:40] + (5,) * k for k in (3, 3, 3, 9)]
    prompts += [prompts[0] + (9,), prompts[0] + (9, 9)]
    for batch_size in (1, 3):
        config = GenerationConfig(max_new_tokens=2, prefill_chunk=8, batch_size=batch_size)
        gens = list(generate_many(model, tok, prompts, config=config))
        engine = [i > 0 and (g.info["batch_row"] > 0 or g.reused_prefix > 0)
                  for i, g in enumerate(gens)]
        _, links = engine_plan(prompts, max_new_tokens=2, batch_size=batch_size, chunk=8)
        assert links == engine, batch_size
        assert any(engine) and not all(engine[1:])


def test_shard_for_a_notebook_and_merge(toy_model, one_process_toy, tmp_path):
    """Without torchrun: each share (shard) logs into its own shard of the folder, merge_shards
    folds them in, and a rerun over every probe finds nothing left to do and writes the same
    head_scores.json as one process."""
    from rhlens.retrieval import DetectConfig, detect_retrieval_heads
    from rhlens.runs import save_detection_run

    model, tok = toy_model
    probes = worker.toy_probes(tok)
    parts = [shard(probes, r, 3) for r in range(3)]
    assert sorted(p.key for part in parts for p in part) == sorted(p.key for p in probes)
    by_length = {}
    for r, part in enumerate(parts):
        for p in part:
            assert by_length.setdefault(p.length, r) == r  # one length's probes on one process
    out = tmp_path / "nb"
    config = DetectConfig(**worker.CONFIG)
    for part in parts[:2]:
        got = detect_retrieval_heads(model, part, config=config, out=out)
        assert [p["key"] for p in got.probes] == [p.key for p in part]
    assert not (out / "probes.jsonl").exists()
    assert merge_shards(out) == {"probes.jsonl": len(parts[0]) + len(parts[1])}
    assert not (out / "shards").exists()
    calls = []
    import rhlens.retrieval.detect as retrieval  # where detection calls generate_many

    real = retrieval.generate_many

    def counting(model, tok, prompts, **kw):
        calls.append(len(prompts))
        return real(model, tok, prompts, **kw)

    retrieval.generate_many = counting
    try:
        scores = detect_retrieval_heads(model, probes, config=config, out=out)
    finally:
        retrieval.generate_many = real
    assert sum(calls) == len(parts[2])  # only the third share was left
    save_detection_run(out, scores, figures=False)
    one = one_process_toy[0] / "detect"
    assert (out / "head_scores.json").read_bytes() == (one / "head_scores.json").read_bytes()
    with pytest.raises(ConfigError, match="rank must be"):
        shard(probes, 3, 3)
    with pytest.raises(ConfigError, match="world must be"):
        shard(probes, 0, 0)


# ---------------------------------------------------------------------------------------
# Shard logs
# ---------------------------------------------------------------------------------------
def test_merge_logs_orders_dedupes_and_survives_torn_tails(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "probes.jsonl").write_text('{"key": "a", "v": 1}\n')
    one = ShardLog(shard_dir(out, "L1", 0) / "probes.jsonl")
    two = ShardLog(shard_dir(out, "L1", 1) / "probes.jsonl")
    one.append({"key": "c", "v": 3})
    one.append({"key": "a", "v": 99})  # already in the log: the log's record stays
    two.append({"key": "b", "v": 2})
    with (two.path).open("a") as fh:
        fh.write('{"key": "d", "v"')  # a rank killed mid-line
    assert set(read_done(out)) == {"a", "b", "c"}
    merged = merge_logs(out, order=["b", "c"])
    assert [json.loads(x)["key"] for x in (out / "probes.jsonl").read_text().splitlines()] == ["a", "b", "c"]
    assert merged["a"]["v"] == 1 and not (out / "shards").exists()
    # a shard reopened after a crash drops its torn tail and appends on a fresh line
    log = ShardLog(shard_dir(out, "L2", 0) / "probes.jsonl")
    log.path.write_text('{"key": "e"}\n{"key": "f", "v')
    log = ShardLog(log.path)
    log.append({"key": "g"})
    assert list(read_done(out)) == ["a", "b", "c", "e", "g"]


def test_a_shard_still_written_is_merged_but_kept(tmp_path):
    """merge_shards never deletes the shard of a process still writing it (it holds its folder)."""
    out = tmp_path / "run"
    out.mkdir()
    folder = shard_dir(out, "nb", 0)
    log = ShardLog(folder / "probes.jsonl")
    log.append({"key": "x"})
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    holder = subprocess.Popen([sys.executable, "-c", f"import sys; from rhlens.io import lock_output; "
                               f"lock_output({str(folder)!r}); print('held', flush=True); sys.stdin.read()"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert merge_shards(out) == {"probes.jsonl": 1}
        assert log.path.exists()
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
    merge_shards(out)
    assert not (out / "shards").exists() and list(read_done(out)) == ["x"]


def test_a_sweep_without_a_folder_or_a_group_is_the_plain_loop():
    sweep = Sweep(None, None, total=3, desc="t")
    seen = []
    for unit in sweep.run(["a", "b", "c"], [1, 5, 1], [False, True, False]):
        seen.append(unit)
        for i in unit:
            sweep.add({"key": "abc"[i]})
    assert seen == [[0, 1], [2]]  # one process: the caller's order, units kept whole
    assert list(sweep.finish()) == ["a", "b", "c"]
