"""Shared fixtures: the packaged default model and the toy model, each loaded once."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

TESTS = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS))  # tests/oracle.py and tests/toy.py

from toy import TOY_MODEL_DIR  # noqa: E402

# Two cores: one thread per process keeps CI from oversubscribing them.
torch.set_num_threads(int(os.environ.get("RHLENS_TEST_THREADS", "2")))


@pytest.fixture(scope="session")
def default_model():
    """(bridge, tokenizer) of SmolLM2-135M-Instruct, from the packaged GGUF (cached)."""
    from rhlens.models import load_model

    return load_model(device="cpu")


@pytest.fixture(scope="session")
def default_hf_eager():
    """The same weights as a plain HF model with eager attention (the oracle's model)."""
    from rhlens.models import load_hf

    return load_hf(attn_implementation="eager")


@pytest.fixture(scope="session")
def toy_model():
    """(bridge, tokenizer) of the 2-layer toy model whose copy head is layer 1, head 2."""
    from rhlens.models import load_model

    return load_model(str(TOY_MODEL_DIR), device="cpu")


@pytest.fixture(scope="session")
def short_probes(default_model):
    """Three ~300-token NIAH probes the default model answers (built once)."""
    from rhlens.probes import ProbeConfig, build_probes

    _, tok = default_model
    config = ProbeConfig(lengths=(500,), depths=(40.0,), answer_buffer=200)
    return build_probes(tok, config=config).probes[:3]
