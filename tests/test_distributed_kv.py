"""Score families and the KV budget sweep under torchrun (gloo, 2 ranks): on the one resumable
loop, they write what one process writes and every rank returns every record."""

from __future__ import annotations

import json

import distributed_worker as worker
from test_distributed import WORKER, records, torchrun


def test_families_and_compress_under_torchrun_write_what_one_process_writes(toy_model, tmp_path):
    model, tok = toy_model
    one = tmp_path / "one"
    expected = worker.kv(model, tok, one)
    two = tmp_path / "two"
    run = torchrun(2, str(WORKER), "kv", str(two))
    assert run.returncode == 0, run.stderr[-3000:]
    assert json.loads((two / "kv_result.json").read_text()) == json.loads(json.dumps(expected))
    for log in ("families/families.jsonl", "compress/compress.jsonl"):
        assert records(two / log) == records(one / log), log  # the same records, the same order
        assert not (two / log).parent.joinpath("shards").exists()
    launch, = json.loads((two / "families" / "families.run.json").read_text())["launches"]
    n_probes = len(records(one / "families" / "families.jsonl"))
    assert launch["world"] == 2 and sum(r["items"] for r in launch["ranks"]) == n_probes
