"""Engine settings: every GenerationConfig / KernelPolicy field is validated, the kernel policy is
resolved per device and recorded in run.json, and no kernel choice is global state."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from engine_runs import assert_same, decode_all

from rhlens.engine import GenerationConfig, KernelPolicy, current_phase
from rhlens.errors import ConfigError
from rhlens.probe import Probe
from rhlens.retrieval import DetectConfig, detect_retrieval_heads

from toy import make_toy_probe

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("kwargs", [
    {"max_new_tokens": 0}, {"max_new_tokens": -3}, {"batch_size": 0}, {"batch_size": -1},
    {"prefill_chunk": 0},
])
def test_out_of_range_generation_settings_are_refused(kwargs):
    name = next(iter(kwargs))
    with pytest.raises(ConfigError, match=name):
        GenerationConfig(**kwargs)


def test_batch_size_zero_is_refused_where_detection_starts():
    # It used to pass GenerationConfig and fail later with an IndexError.
    with pytest.raises(ConfigError, match="batch_size"):
        DetectConfig(batch_size=0)


@pytest.mark.parametrize("kwargs", [{"slab": 0}, {"split_from": -1}, {"av_block": 0}])
def test_out_of_range_kernel_settings_are_refused(kwargs):
    with pytest.raises(ConfigError, match=next(iter(kwargs))):
        KernelPolicy(**kwargs)


# Wrong types are caught by the test-time type checker before __post_init__ runs; a user has no
# such checker, so the one-line errors are checked in a plain interpreter.
_WRONG_TYPES = """
from rhlens.engine import GenerationConfig, KernelPolicy
from rhlens.errors import ConfigError
cases = [(GenerationConfig, {"batch_size": "2"}), (GenerationConfig, {"max_new_tokens": 2.5}),
         (GenerationConfig, {"prefill_chunk": "64"}), (GenerationConfig, {"stop_at_eos": 1}),
         (GenerationConfig, {"stop_at_newline": "no"}), (GenerationConfig, {"reuse_prefix": None}),
         (GenerationConfig, {"lean_decode": 0}), (GenerationConfig, {"policy": "fast"}),
         (GenerationConfig, {"policy": {"rows": "row"}}), (KernelPolicy, {"rows": "rowz"}),
         (KernelPolicy, {"av": "flash"}), (KernelPolicy, {"slab": 2.0}), (KernelPolicy, {"slab": True}),
         (KernelPolicy, {"keys_first": "yes"}), (KernelPolicy, {"expand_kv": 1}),
         (KernelPolicy, {"decode": "graph"}), (KernelPolicy, {"compile": "yes"}),
         (KernelPolicy, {"bucket": 0}), (KernelPolicy, {"bucket": 2.0}),
         (KernelPolicy, {"prefill_attn": "flash"})]
for cls, kwargs in cases:
    try:
        cls(**kwargs)
    except ConfigError as exc:
        print("refused", next(iter(kwargs)), "|", exc)
    else:
        print("ACCEPTED", cls.__name__, kwargs)
"""


def test_wrong_types_are_refused_with_a_config_error():
    out = subprocess.run([sys.executable, "-c", _WRONG_TYPES], capture_output=True, text=True,
                         cwd=ROOT, check=True).stdout.splitlines()
    assert len(out) == 20
    for line in out:
        assert line.startswith("refused"), line
        field = line.split()[1]
        assert field in line.split("|", 1)[1]  # the message names the setting


def test_auto_policy_is_the_default_and_survives_a_round_trip():
    assert GenerationConfig().policy == KernelPolicy() == GenerationConfig(policy="auto").policy
    config = GenerationConfig(batch_size=4, policy=KernelPolicy(rows="batch", expand_kv=True))
    assert GenerationConfig.from_dict(config.to_dict()) == config


def test_policy_resolves_per_device(toy_model, default_model):
    toy, default = toy_model[0], default_model[0]  # 4 heads / 4 KV heads; 9 heads on 3 KV heads
    cpu = {"rows": "row", "av": "mm", "keys_first": False, "decode": "lean", "compile": False,
           "bucket": 64, "prefill_attn": "lower_right"}
    for model in (toy, default):
        got = KernelPolicy().resolve("cpu", model)
        assert {k: getattr(got, k) for k in cpu} == cpu and got.resolved
    # On CUDA (resolving needs no GPU): slab products, keys-first scores, pattern @ V summed
    # in key blocks under grouped-query attention only, and the captured decode step.
    cuda = dict(keys_first=True, decode="captured", compile=True, bucket=1024, prefill_attn="split")
    assert KernelPolicy().resolve("cuda", toy) == KernelPolicy(rows="slab", av="mm", **cuda)
    assert KernelPolicy().resolve("cuda", default) == KernelPolicy(rows="slab", av="split", **cuda)
    # compiled only where the captured step runs; an explicit choice wins
    assert KernelPolicy(decode="lean").resolve("cuda", default).compile is False
    assert KernelPolicy(compile=False).resolve("cuda", default).compile is False
    # K/V copied per head: no groups left to split by
    assert KernelPolicy(expand_kv=True).resolve("cuda", default).av == "mm"
    # explicit choices are kept
    mine = KernelPolicy(rows="batch", av="mm", keys_first=False, slab=4, decode="lean", compile=True,
                        bucket=256, prefill_attn="split")
    assert mine.resolve("cuda", default) == mine
    with pytest.raises(ConfigError, match="resolve"):
        KernelPolicy().batch_mode(2)
    # the prefill chunk: smaller on a GPU, where a chunk after cached keys costs what one pass does
    config = GenerationConfig()
    assert (config.chunk_for("cuda"), config.chunk_for("cpu"), config.chunk) == (16384, 32768, 32768)
    assert GenerationConfig(prefill_chunk=512).chunk_for("cuda") == 512


def _toy_probes(tok, n=2):
    out = []
    for i in range(n):
        ids, span, answer = make_toy_probe(tok, 40 + 10 * i, seed=i)
        out.append(Probe(ids, span, answer, length=len(ids), depth=float(i), needle_id="toy"))
    return out


def test_run_json_records_the_resolved_policy(toy_model, tmp_path):
    model, tok = toy_model
    probes = _toy_probes(tok)
    detect_retrieval_heads(model, probes, config=DetectConfig(max_new_tokens=4), out=tmp_path / "auto")
    header = json.loads((tmp_path / "auto" / "run.json").read_text())
    assert header["recorded"]["kernel_policy"] == {
        "type": "KernelPolicy", "rows": "row", "slab": 16, "av": "mm", "split_from": 0,
        "av_block": 1024, "keys_first": False, "expand_kv": False, "decode": "lean",
        "compile": False, "bucket": 64, "prefill_attn": "lower_right"}
    exact = DetectConfig(max_new_tokens=4, policy=KernelPolicy(expand_kv=True, rows="batch"))
    detect_retrieval_heads(model, probes, config=exact, out=tmp_path / "exact")
    header = json.loads((tmp_path / "exact" / "run.json").read_text())
    assert header["recorded"]["kernel_policy"]["expand_kv"] is True
    assert header["recorded"]["kernel_policy"]["rows"] == "batch"
    # Resuming a run with other kernels would blend two experiments: refused.
    with pytest.raises(ConfigError, match="other settings"):
        detect_retrieval_heads(model, probes, config=exact, out=tmp_path / "auto")
    described = GenerationConfig(max_new_tokens=4).describe(model)
    assert described["generation"]["max_new_tokens"] == 4 and "policy" not in described["generation"]
    assert described["kernel_policy"]["rows"] == "row"


def test_a_failing_sdpa_kernel_falls_back_for_that_run_only(toy_model, monkeypatch):
    """No kernel for SDPA: pattern @ V instead, in that decode only; the next run tries again."""
    from rhlens.engine.attention import LeanAttention

    model, tok = toy_model
    prompts = [p.prompt_ids for p in _toy_probes(tok)]
    bridge = decode_all(model, tok, prompts, GenerationConfig(max_new_tokens=6, lean_decode=False))
    broken, calls = [True], []
    real = torch.nn.functional.scaled_dot_product_attention

    def flaky(*args, **kwargs):
        if current_phase() == "decode":
            calls.append(broken[0])
            if broken[0]:
                raise RuntimeError("no kernel for this layout")
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", flaky)
    config = GenerationConfig(max_new_tokens=6, policy=KernelPolicy(av="sdpa"))
    assert_same(decode_all(model, tok, prompts, config), bridge)
    n_layers = model.cfg.n_layers
    assert calls == [True] * n_layers * len(prompts)  # one failed try per layer and decode
    broken[0], calls[:] = False, []
    assert_same(decode_all(model, tok, prompts, config), bridge)
    assert len(calls) >= n_layers * len(prompts) * 2 and not any(calls)  # SDPA at every step again
    for name in ("rows", "slab", "av", "split_from", "av_block", "keys_first", "expand_kv", "_sdpa_failed"):
        assert not hasattr(LeanAttention, name)  # nothing module-wide to flip or to stick
