"""Models spread over devices: accelerate's hooks on every layer (a device map), the lean decode
step through them, the bridge's own multi-device loading, and the planned placement."""

from __future__ import annotations

import json

import pytest
import torch

from rhlens.cli import main
from rhlens.engine import KernelPolicy
from rhlens.engine.kv import KVPool
from rhlens.engine.lean import LeanDecoder, lean_ok
from rhlens.errors import ConfigError
from rhlens.models import check_device_map, load_hf, load_model, plan_device_map
from rhlens.retrieval import DetectConfig, detect_retrieval_heads

N_LAYERS = 30  # the default model's


def _layer_map(device) -> dict:
    return {"model.embed_tokens": device, "model.rotary_emb": device,
            **{f"model.layers.{i}": device for i in range(N_LAYERS)},
            "model.norm": device, "lm_head": device}


@pytest.fixture(scope="module")
def dispatched():
    """The default model with accelerate's device hooks on every module (an all-"cpu" map,
    dispatched as a multi-device one is), booted into a bridge."""
    from accelerate import dispatch_model
    from transformer_lens.model_bridge import TransformerBridge

    hf, tok = load_hf(None)
    hf = dispatch_model(hf, _layer_map("cpu"), force_hooks=True)
    bridge = TransformerBridge.boot_transformers("dispatched", hf_model=hf, tokenizer=tok)
    bridge.eval()
    return bridge, tok


def test_a_dispatched_model_decodes_through_the_lean_step_as_the_plain_one(dispatched,
                                                                          default_model,
                                                                          short_probes):
    """Every layer behind an accelerate hook: the lean step still runs (moving the residual
    stream to each layer's device, each layer's KV on its own), and detection gives the same
    answers and per-head scores, batched, as the plain model."""
    model, tok = dispatched
    hf = model.original_model
    assert sum(hasattr(m, "_hf_hook") for m in hf.modules()) > N_LAYERS
    assert lean_ok(model)
    step = LeanDecoder(model, KernelPolicy().resolve("cpu", model))
    assert step.devices == [torch.device("cpu")] * N_LAYERS
    assert KVPool(hf, N_LAYERS).devices == [torch.device("cpu")] * N_LAYERS
    config = DetectConfig(max_new_tokens=16, batch_size=2)
    got = detect_retrieval_heads(model, short_probes[:2], config=config, tokenizer=tok)
    want = detect_retrieval_heads(default_model[0], short_probes[:2], config=config)
    assert [p["response_ids"] for p in got.probes] == [p["response_ids"] for p in want.probes]
    assert torch.equal(got.per_probe, want.per_probe)
    # A hook that offloads weights (they live elsewhere until the module runs): the lean
    # step, which reads weights directly, is not taken.
    hook = hf.model.layers[3]._hf_hook
    hook.offload = True
    try:
        assert not lean_ok(model)
    finally:
        hook.offload = False


def test_load_model_through_the_bridges_own_device_map(default_model, short_probes):
    """``load_model(device_map=...)`` loads through ``boot_transformers(device_map=)`` and
    answers as the model loaded on one device."""
    model, tok = load_model(None, device_map=_layer_map("cpu"))
    assert model.rhlens_identity == default_model[0].rhlens_identity
    config = DetectConfig(max_new_tokens=16)
    got = detect_retrieval_heads(model, short_probes[:1], config=config, tokenizer=tok)
    want = detect_retrieval_heads(default_model[0], short_probes[:1], config=config)
    assert got.probes[0]["response_ids"] == want.probes[0]["response_ids"]
    assert torch.equal(got.per_probe, want.per_probe)


def test_the_planned_placement_splits_the_layers_within_the_budgets():
    """HF's planner on an empty model, for two GPUs this machine need not have: every layer on
    exactly one of them, in order, neither over its budget (counted here from the config)."""
    from transformers import AutoConfig

    from rhlens.models.load import _resolve

    budget = 400 * 2**20
    plan = plan_device_map(None, device_map="balanced", max_memory={0: budget, 1: budget})
    layers = [plan[f"model.layers.{i}"] for i in range(N_LAYERS)]
    assert set(layers) == {0, 1} and layers == sorted(layers)  # a prefix on 0, the rest on 1
    cfg = AutoConfig.from_pretrained(str(_resolve(None)[1]))
    d, inter = cfg.hidden_size, cfg.intermediate_size
    kv = cfg.num_key_value_heads * (d // cfg.num_attention_heads)
    layer_bytes = 4 * (2 * d * d + 2 * d * kv + 3 * d * inter + 2 * d)  # fp32
    embed_bytes = 4 * cfg.vocab_size * d  # tied with lm_head: counted once
    on0 = layers.count(0) * layer_bytes + embed_bytes * (plan["model.embed_tokens"] == 0)
    on1 = layers.count(1) * layer_bytes + embed_bytes * (plan["model.embed_tokens"] == 1)
    assert on0 <= budget and on1 <= budget
    seq = plan_device_map(None, device_map="sequential", max_memory={0: budget, 1: budget})
    assert [seq[f"model.layers.{i}"] for i in range(N_LAYERS)].count(0) >= layers.count(0)


def test_device_map_arguments_are_checked():
    assert check_device_map("auto", {0: "70GiB", "cpu": 10**9}) == ("auto", {0: "70GiB", "cpu": 10**9})
    for bad, match in (({"device_map": "everywhere"}, "device_map must be"),
                       ({"device_map": "auto", "max_memory": {"gpu0": "1GiB"}}, "not a device"),
                       ({"device_map": "auto", "max_memory": {0: 1.5}}, "must be bytes"),
                       ({"device_map": None, "max_memory": {0: "1GiB"}}, "give device_map too")):
        with pytest.raises(ConfigError, match=match):
            check_device_map(bad["device_map"], bad.get("max_memory"))
    with pytest.raises(ConfigError, match="not both"):
        load_model(None, device="cpu", device_map="auto")


@pytest.mark.parametrize("argv, message", [
    (["--device", "cpu", "--device-map", "auto"], "--device and --device-map: give one of them"),
    (["--max-memory", "10GiB"], "give --device-map too"),
    (["--device-map", "auto", "--max-memory", "lots"], "expected a size like 70GiB"),
    (["--device-map", "auto", "--max-memory", "gpu=1GiB"], "is not a device"),
    (["--device-map", "everywhere"], "invalid choice"),
])
def test_cli_device_map_flags_are_refused_before_loading(argv, message, tmp_path, capsys):
    code = main(["detect", *argv, "--out", str(tmp_path / "out")])
    out, err = capsys.readouterr()
    assert code == 2 and message in err and "loading" not in out, err
    assert "Traceback" not in err


def test_cli_max_memory_parses_per_device_budgets():
    from rhlens.cli.args import max_memory

    assert max_memory("0=70GiB,1=60GiB,cpu=100GB") == {0: "70GiB", 1: "60GiB", "cpu": "100GB"}
    assert max_memory("123456") == 123456
    assert json.dumps(max_memory("70GiB")) == '"70GiB"'
