"""Sharding that keeps the engine's prefix reuse (issue 27): the order that reuses the most, the
prefill each rank really computed, the same prefill summed over 2 and 3 ranks as in one process,
the same results, a killed rank, and a launch over two "nodes" (two torchrun launches on one
host, c10d rendezvous)."""

from __future__ import annotations

import itertools
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import distributed_worker as worker
import numpy as np
import pytest

from rhlens.distributed import DECODE_STEP_TOKENS, engine_plan, plan_units, prefix_order, schedule
from rhlens.engine.kv import reusable
from rhlens.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(worker.__file__)
# What a probe cost, not what it found: its seconds, and the prefix it reused (a unit cut for
# balance prefills a probe whole that one process reuses a prefix for; the numbers are the same).
COST = ("seconds", "reused_prefix")
N_PROBES = 30  # worker.haystack_probes


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def torchrun(n: int, *args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc-per-node", str(n), *args],
                          capture_output=True, text=True, env=_env(), timeout=timeout)


def records(path: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k not in COST}
            for line in path.read_text().splitlines()]


def launches(out: Path) -> list[dict]:
    return json.loads((out / "run.json").read_text())["launches"]


def _common(a, b) -> int:
    m = min(len(a), len(b))
    differ = np.flatnonzero(np.asarray(a[:m]) != np.asarray(b[:m]))
    return int(differ[0]) if differ.size else m


def _reused(prompts, chunk: int) -> int:
    """Tokens the engine reuses answering ``prompts`` in this order (one generate_many)."""
    return sum(reusable(_common(a[:-1], b[:-1]), chunk) for a, b in itertools.pairwise(prompts))


# ---------------------------------------------------------------------------------------
# The order and the plan
# ---------------------------------------------------------------------------------------
def _niah(n_hay: int, depths, needles, rng) -> list[list[int]]:
    hay = rng.integers(10, 1000, n_hay).tolist()
    out = []
    for needle in needles:
        for d in depths:
            at = round(n_hay * d / 100)
            out.append([1, 2, 3, *hay[:at], *needle, *hay[at:], 4, 5])
    return out


@pytest.mark.parametrize("chunk", [1, 4, 16])
def test_prefix_order_reuses_as_much_as_the_best_order(chunk):
    """Two needles x 3 depths of one haystack (720 orders): the tokens-sorted order reuses as
    much as the best of all of them, and more than needle by needle, deepest first (the order
    before issue 27), for any prefill chunk."""
    rng = np.random.default_rng(chunk)
    prompts = _niah(60, (10, 50, 90), [[900, 901, 902], [950, 951]], rng)
    prompts = [p + [7] * (68 - len(p)) for p in prompts]  # equal lengths, as a grid's are
    best = max(_reused([prompts[i] for i in perm], chunk)
               for perm in itertools.permutations(range(len(prompts))))
    order = prefix_order(prompts)
    assert sorted(order) == list(range(len(prompts)))
    assert _reused([prompts[i] for i in order], chunk) == best
    needle_major = [2, 1, 0, 5, 4, 3]  # needle 0 deepest first, then needle 1
    assert _reused([prompts[i] for i in needle_major], chunk) < best


def test_prefix_order_keeps_groups_and_lengths_together():
    rng = np.random.default_rng(0)
    short = _niah(30, (0, 50, 100), [[900, 901]], rng)
    long = _niah(50, (0, 50, 100), [[900, 901]], rng)
    prompts = [*long, *short]
    groups = [("b",)] * 3 + [("a",)] * 3
    order = prefix_order(prompts, groups)
    assert sorted(order[:3]) == [3, 4, 5] and sorted(order[3:]) == [0, 1, 2]
    mixed = prefix_order([long[0], short[0], long[1], short[1]])
    assert sorted(mixed[:2]) == [1, 3]  # the shorter prompts first, together
    with pytest.raises(ConfigError, match="2 groups for 3 prompts"):
        prefix_order(prompts[:3], groups[:2])


def test_a_plan_never_links_two_groups():
    """Two lengths sharing their haystack's start: the engine could reuse it across them, but
    ``groups`` cuts there and the plan counts the second length's first prompt whole."""
    hay = list(range(10, 200))
    a = [1, *hay[:100], 5, 6, *hay[100:150], 9]
    b = [1, *hay[:100], 7, 8, *hay[100:170], 9]
    costs, links = engine_plan([a, b], max_new_tokens=4, chunk=16)
    assert links == [False, True] and costs[1] == len(b) - 1 - 96 + DECODE_STEP_TOKENS * 4
    costs, links = engine_plan([a, b], max_new_tokens=4, chunk=16, groups=[1, 2])
    assert links == [False, False] and costs[1] == len(b) - 1 + DECODE_STEP_TOKENS * 4
    assert len(plan_units(costs, links)) == 2
    with pytest.raises(ConfigError, match="1 groups"):
        engine_plan([a, b], max_new_tokens=4, groups=[1])


def _prefill(prompts, links, chunk: int) -> int:
    """Tokens the engine prefills running each unit of ``links`` apart."""
    total = 0
    for i, p in enumerate(prompts):
        reused = reusable(_common(prompts[i - 1][:-1], p[:-1]), chunk) if i and links[i] else 0
        total += len(p) - 1 - reused
    return total


def _span(costs, links, world: int) -> float:
    units = plan_units(costs, links)
    return max(sum(units[u].cost for u in r) for r in schedule(units, world))


@pytest.mark.parametrize("world", [2, 3, 4])
def test_a_plan_for_several_ranks_cuts_units_where_it_costs_least(world):
    """Two lengths (the shorter a third of the work) x 2 needles x 5 depths, 16 a batch: one
    unit per length is too coarse for 2-4 ranks. The plan for ``world`` ranks cuts only where
    the units were linked, evens the schedule out, and prefills at most 2.5% more tokens than
    the plan of one process (which cuts nothing)."""
    rng = np.random.default_rng(world)
    prompts, groups = [], []
    for n in (60, 180):
        grid = _niah(n, (0, 25, 50, 75, 100), [[900, 901, 902], [950, 951, 952]], rng)
        order = prefix_order(grid)
        prompts += [grid[i] for i in order]
        groups += [n] * len(grid)
    plan = {"max_new_tokens": 8, "batch_size": 16, "chunk": 4, "groups": groups, "step_tokens": 27}
    costs1, links1 = engine_plan(prompts, **plan)
    assert engine_plan(prompts, **plan, world=1) == (costs1, links1)
    assert len(plan_units(costs1, links1)) == 2
    costs, links = engine_plan(prompts, **plan, world=world)
    assert all(a or not b for a, b in zip(links1, links))  # cuts only, where linked
    assert len(plan_units(costs, links)) > 2
    assert _span(costs, links, world) < _span(costs1, links1, world)
    alone = _prefill(prompts, links1, 4)
    assert alone <= _prefill(prompts, links, 4) <= 1.025 * alone
    with pytest.raises(ConfigError, match="world must be"):
        engine_plan(prompts, **plan, world=0)


def test_the_engine_counts_what_the_plan_predicts(toy_model):
    """Generation.info["prefill_tokens"]: the tokens the prefill computed, the prompt minus
    its last token and the reused prefix; summed over a unit, the plan's predicted prefill."""
    from rhlens.engine import GenerationConfig, generate_many

    model, tok = toy_model
    probes = worker.haystack_probes(tok)
    prompts = [p.prompt_ids for p in probes if p.length == 80]
    prompts = [prompts[i] for i in prefix_order(prompts)]
    config = GenerationConfig(max_new_tokens=2, prefill_chunk=8, batch_size=1)
    gens = list(generate_many(model, tok, prompts, config=config))
    assert all(g.info["prefill_tokens"] + g.reused_prefix == len(p) - 1
               for g, p in zip(gens, prompts))
    costs, _ = engine_plan(prompts, max_new_tokens=2, chunk=8)
    assert [c - 2 * DECODE_STEP_TOKENS for c in costs] == [g.info["prefill_tokens"] for g in gens]
    assert sum(g.reused_prefix for g in gens) == _reused(prompts, 8) > 0


# ---------------------------------------------------------------------------------------
# torchrun against one process
# ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def one_process(toy_model, tmp_path_factory):
    """The toy haystack grid detected in this process: the reference."""
    out = tmp_path_factory.mktemp("one") / "reuse"
    result = worker.reuse(*toy_model, out)
    return out, result


def _same_as_one(one: Path, out: Path) -> None:
    assert (one / "head_scores.json").exists()  # some probe answered: scores to compare
    assert (out / "head_scores.json").read_bytes() == (one / "head_scores.json").read_bytes()
    for name in ("result.json", "tensors.safetensors"):
        assert (out / "scores" / name).read_bytes() == (one / "scores" / name).read_bytes()
    assert records(out / "probes.jsonl") == records(one / "probes.jsonl")
    assert not (out / "shards").exists()


def check_counts(one: Path, out: Path, world: int, items: int, working: int | None = None) -> dict:
    """Each rank's prefill in run.json and their sums under ``total``; the sum over the ranks
    within 3% of one process's (never less); at least ``working`` ranks (default: all) had
    work. Returns the launch's entry."""
    single, = launches(one)
    launch = launches(out)[-1]
    assert single["world"] == 1 and launch["world"] == world
    assert [r["rank"] for r in launch["ranks"]] == list(range(world))
    for key in ("items", "prefill_tokens", "reused_tokens", "decode_tokens"):
        assert launch["total"][key] == sum(r[key] for r in launch["ranks"]), key
    for key in ("items", "decode_tokens"):
        assert launch["total"][key] == single["total"][key], key
    assert single["total"]["items"] == items and single["total"]["reused_tokens"] > 0
    ranks, alone = launch["total"]["prefill_tokens"], single["total"]["prefill_tokens"]
    assert alone <= ranks <= 1.03 * alone, (ranks, alone)
    # every prompt token is either prefilled or reused, in both
    assert ranks + launch["total"]["reused_tokens"] == alone + single["total"]["reused_tokens"]
    working = world if working is None else working
    assert sum(r["items"] > 0 and r["prefill_tokens"] > 0 for r in launch["ranks"]) >= working
    # and the probes' own records say the same
    recs = [json.loads(line) for line in (out / "probes.jsonl").read_text().splitlines()]
    assert sum(r["reused_prefix"] for r in recs) == launch["total"]["reused_tokens"]
    assert sum(r["n_tokens"] - 1 - r["reused_prefix"] for r in recs) == ranks
    return launch


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_prefill_what_one_process_prefills_on_the_toy_model(one_process, world, tmp_path):
    """2 and 3 ranks (gloo) on 3 lengths x 5 depths x 2 needles of one haystack: the prefill
    tokens computed, summed over the ranks, within 3% of one process's; the same records
    (answers, scores) and head_scores.json byte for byte."""
    one, result = one_process
    out = tmp_path / "reuse"
    run = torchrun(world, str(WORKER), "reuse", str(out))
    assert run.returncode == 0, run.stderr[-3000:]
    _same_as_one(one, out)
    check_counts(one, out, world, N_PROBES)
    assert json.loads((out / "reuse_result.json").read_text()) == json.loads(json.dumps(result))


def test_a_killed_rank_then_a_rerun_with_three_processes_prefills_each_probe_once(one_process,
                                                                                   tmp_path):
    """Rank 1 dies after logging 2 probes of the haystack grid; the rerun with 3 processes
    computes the rest: every probe once (none recomputed: the dead launch's records kept as
    they were), the same head_scores.json as one process, and the rerun's counts cover only
    what was left."""
    one = one_process[0]
    out = tmp_path / "killed"
    run = torchrun(2, str(WORKER), "reuse", str(out), "--die-after", "2")
    assert run.returncode != 0
    logged = [json.loads(line) for path in sorted((out / "shards").glob("*/r*/probes.jsonl"))
              for line in path.read_text().splitlines()]
    assert 2 <= len(logged) < N_PROBES
    run = torchrun(3, str(WORKER), "reuse", str(out))
    assert run.returncode == 0, run.stderr[-3000:]
    lines = [json.loads(line) for line in (out / "probes.jsonl").read_text().splitlines()]
    assert len(lines) == N_PROBES == len({r["key"] for r in lines})
    by_key = {r["key"]: r for r in lines}
    assert all(by_key[r["key"]] == r for r in logged)  # byte for byte, seconds too
    assert (out / "head_scores.json").read_bytes() == (one / "head_scores.json").read_bytes()
    launch = launches(out)[-1]  # the dead launch never wrote one
    assert launch["world"] == 3 and launch["total"]["items"] == N_PROBES - len(logged)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_through_the_c10d_rendezvous(one_process, tmp_path):
    """Two torchrun launches, ``--nnodes 2 --node-rank 0/1 --rdzv-backend c10d`` on one
    rendezvous endpoint (two machines, played on one host): one run of 2 ranks, the same
    records, head_scores.json and prefill as one process."""
    one = one_process[0]
    out = tmp_path / "nodes"
    endpoint = f"127.0.0.1:{_free_port()}"
    nodes = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
         "--node-rank", str(rank), "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint,
         "--rdzv-id", "rhlens-two-nodes", str(WORKER), "reuse", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env()) for rank in (0, 1)]
    try:
        done = [node.communicate(timeout=900) for node in nodes]
    finally:
        for node in nodes:
            if node.poll() is None:
                node.kill()
    for node, (_, err) in zip(nodes, done):
        assert node.returncode == 0, err[-3000:]
    _same_as_one(one, out)
    check_counts(one, out, 2, N_PROBES)


DEFAULT_ARGS = ["detect", "--lengths", "400,500", "--depths", "0,100", "--n-needles", "2",
                "--max-new-tokens", "16", "--prefill-chunk", "32", "--quiet"]


@pytest.fixture(scope="module")
def default_one(tmp_path_factory):
    """The default model's grid below detected in this process (shared by both launches)."""
    from rhlens.cli import main

    one = tmp_path_factory.mktemp("default") / "one"
    assert main([*DEFAULT_ARGS, "--out", str(one)]) == 0
    return one


@pytest.mark.slow  # the toy-model tests above check the same in make test; this runs in make test-slow
@pytest.mark.parametrize("world", [2, 3])
def test_ranks_prefill_what_one_process_prefills_on_the_default_model(default_one, world, tmp_path):
    """``torchrun -m rhlens detect`` on the default model, 400 and 500 tokens x 2 depths x 2
    needles with 32-token prefill chunks (so that the haystack is reused on this CPU): per rank
    and in total in run.json; the sum over 2 or 3 ranks within 3% of one process's (a third
    rank may find no unit worth cutting for it); the same results."""
    out = tmp_path / "ranks"
    run = torchrun(world, "-m", "rhlens", *DEFAULT_ARGS, "--out", str(out))
    assert run.returncode == 0, run.stderr[-3000:]
    _same_as_one(default_one, out)
    check_counts(default_one, out, world, 8, working=2)
