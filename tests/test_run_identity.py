"""A run's identity (rhlens.identity) and its folder (rhlens.io): refused resumes name the
difference, cost-only settings are recorded but never block, damage is reported, the folder
is locked, and the progress bar counts work, not items."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest

from rhlens.errors import ConfigError
from rhlens.identity import diff_identity, run_header, split_settings
from rhlens.io import ProbeLog, Records, lock_output, read_jsonl, unlock_output
from rhlens.probe import Probe


@dataclass(frozen=True)
class _Settings:
    max_new_tokens: int = 50
    batch_size: int = 8
    reuse_prefix: bool = True


def _probes(token: int = 5) -> list[Probe]:
    return [Probe(prompt_ids=(1, 2, token, 4), needle_span=(2, 3), real_needle="x", length=10,
                  depth=d, needle_id="n") for d in (0, 100)]


def test_cost_only_settings_are_recorded_not_identity():
    shaping, recorded = split_settings({"max_new_tokens": 50, "batch_size": 8, "reuse_prefix": True,
                                        "kernels": {"expand_kv": True, "rows": 16}})
    assert shaping == {"max_new_tokens": 50, "kernels": {"expand_kv": True}}
    assert recorded == {"batch_size": 8, "reuse_prefix": True,
                        "kernels": {"expand_kv": True, "rows": 16}}


def test_a_resolved_kernel_policy_is_recorded_and_only_expand_kv_is_identity():
    policy = {"type": "KernelPolicy", "rows": "row", "av": "mm", "keys_first": False,
              "expand_kv": False}
    head = run_header({"name": "m"}, None, {"max_new_tokens": 5}, kernel_policy=policy)
    assert head.identity["kernel_policy"] == {"expand_kv": False}
    assert head.recorded["kernel_policy"] == policy
    other_device = run_header({"name": "m"}, None, {"max_new_tokens": 5},
                              kernel_policy={**policy, "rows": "slab", "keys_first": True})
    assert diff_identity(head.identity, other_device.identity) == []
    bf16_copy = run_header({"name": "m"}, None, {"max_new_tokens": 5},
                           kernel_policy={**policy, "expand_kv": True})
    assert diff_identity(head.identity, bf16_copy.identity) == ["kernel_policy.expand_kv: False -> True"]


def test_header_of_a_run(toy_model):
    model, _ = toy_model
    head = run_header(model, _probes(), _Settings(), masks=[{"heads": [[1, 2]]}])
    ident = head.identity
    assert ident["model"]["name"] == model.rhlens_name and len(ident["model"]["weights_sha256"]) == 64
    assert ident["model"]["dtype"] == "float32"
    assert sorted(ident["probes"]["prompts"]) == ["len10-depth0-n", "len10-depth100-n"]
    assert ident["config"] == {"max_new_tokens": 50}
    assert ident["masks"] == [{"heads": [[1, 2]]}]
    assert head.recorded == {"device": "cpu", "config": {"batch_size": 8, "reuse_prefix": True},
                             "grid": {"lengths": [10], "depths": [0.0, 100.0], "needles": ["n"],
                                      "n_probes": 2}}


def test_differences_are_named_most_telling_first():
    a = run_header({"name": "m"}, _probes(5), {"max_new_tokens": 50}).identity
    b = run_header({"name": "m"}, _probes(6), {"max_new_tokens": 60}).identity
    assert diff_identity(a, b) == ["config.max_new_tokens: 50 -> 60"]
    c = run_header({"name": "m"}, _probes(6), {"max_new_tokens": 50}).identity
    assert [d.split(":")[0] for d in diff_identity(a, c)] == \
        ["probes.prompts.len10-depth0-n", "probes.prompts.len10-depth100-n"]
    assert diff_identity(a, a) == []
    # A grid cut to one probe, or extended by another, is the same run.
    assert diff_identity(a, run_header({"name": "m"}, _probes(5)[:1], {"max_new_tokens": 50}).identity) == []


def test_log_refuses_another_identity_and_records_cost_only_changes(tmp_path):
    out = tmp_path / "run"
    log = ProbeLog(out, run_header({"name": "m"}, _probes(), _Settings()))
    log.append({"key": "a", "v": 1})
    again = ProbeLog(out, run_header({"name": "m"}, _probes(), _Settings(batch_size=1)))
    assert again.done == {"a": {"key": "a", "v": 1}}
    run = json.loads((out / "run.json").read_text())
    assert run["recorded"]["config"]["batch_size"] == 8
    assert run["resumes"][0]["config"] == {"batch_size": 1, "reuse_prefix": True}
    with pytest.raises(ConfigError, match=r"other settings \(config\.max_new_tokens: 50 -> 60\)"):
        ProbeLog(out, run_header({"name": "m"}, _probes(), _Settings(max_new_tokens=60)))
    with pytest.raises(ConfigError, match=r"model\.name: 'm' -> 'other'"):
        ProbeLog(out, run_header({"name": "other"}, _probes(), _Settings()))
    with pytest.raises(ConfigError, match=r"probes\.prompts\.len10-depth0-n"):
        ProbeLog(out, run_header({"name": "m"}, _probes(token=9), _Settings()))


def test_library_detection_refuses_other_prompts_under_the_same_keys(toy_model, tmp_path):
    """Hand-made probes carry no haystack name: the hash over the prompts still tells."""
    from rhlens.retrieval import DetectConfig, detect_retrieval_heads

    from toy import make_toy_probe

    model, tok = toy_model

    def probes(seed):
        ids, span, answer = make_toy_probe(tok, n_filler=30, seed=seed)
        return [Probe(prompt_ids=ids, needle_span=span, real_needle=answer, length=40, depth=50)]

    config = DetectConfig(max_new_tokens=8)
    detect_retrieval_heads(model, probes(1), config=config, tokenizer=tok, out=tmp_path)
    rec = read_jsonl(tmp_path / "probes.jsonl")[0]
    assert rec["placed_depth"] == 50.0 and rec["insert_token"] == rec["needle_span"][0]
    with pytest.raises(ConfigError, match=r"probes\.prompts\.len40-depth50-custom"):
        detect_retrieval_heads(model, probes(2), config=config, tokenizer=tok, out=tmp_path)


def test_run_folders_from_older_or_damaged_runs(tmp_path):
    old = tmp_path / "old"
    old.mkdir()
    (old / "run.json").write_text(json.dumps({"model": "m", "config": {}}))
    with pytest.raises(ConfigError, match="started by an earlier rhlens"):
        ProbeLog(old, run_header({"name": "m"}))
    orphan = tmp_path / "orphan"
    orphan.mkdir()
    (orphan / "probes.jsonl").write_text('{"key": "a"}\n')
    with pytest.raises(ConfigError, match=r"run\.json is missing"):
        ProbeLog(orphan, run_header({"name": "m"}))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "run.json").write_text('{"identity": ')
    with pytest.raises(ConfigError, match=r"run\.json is damaged"):
        ProbeLog(broken, run_header({"name": "m"}))


def test_torn_last_line_is_dropped_a_damaged_middle_line_refused(tmp_path):
    header = run_header({"name": "m"})
    log = ProbeLog(tmp_path, header)
    for key in "abc":
        log.append({"key": key})
    path = tmp_path / "probes.jsonl"
    path.write_text(path.read_text() + '{"key": "d", "sco')  # killed while writing
    assert list(ProbeLog(tmp_path, header).done) == ["a", "b", "c"]
    lines = path.read_text().splitlines()
    path.write_bytes(("\n".join([lines[0], "\udcff garbage"[1:], lines[2]]) + "\n").encode())
    with pytest.raises(ConfigError, match=r"probes\.jsonl, line 2 is damaged"):
        ProbeLog(tmp_path, header)


def test_output_folder_checks_and_lock(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="is a file"):
        lock_output(tmp_path / "file")
    out = lock_output(tmp_path / "a" / "b")
    assert out.is_dir() and (out / ".rhlens.lock").read_text().strip().isdigit()
    assert lock_output(out) == out  # this process again: fine
    unlock_output(out)
    unlock_output(out)  # and releasing twice is harmless


def test_progress_counts_prompt_tokens(tmp_path):
    log = ProbeLog(tmp_path, run_header({"name": "m"}))
    log.append({"key": "short"})
    sink = Records(log, progress=True, total=3, desc="t", unit="probe",
                   weights={"short": 100, "mid": 400, "long": 1500})
    assert (sink.bar.total, sink.bar.n) == (2000, 100)
    sink.add({"key": "long"})
    assert sink.bar.n == 1600 and "2/3 probes" in str(sink.bar)
    sink.close()
