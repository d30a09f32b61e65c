"""The checked-in toy model (tests/data/toy_retrieval_model) loads and solves its task."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from toy import TOY_MODEL_DIR, make_toy_probe


@pytest.fixture(scope="module")
def toy_model():
    torch.set_num_threads(1)
    tokenizer = AutoTokenizer.from_pretrained(TOY_MODEL_DIR)
    model = AutoModelForCausalLM.from_pretrained(TOY_MODEL_DIR, attn_implementation="eager")
    model.eval()
    return model, tokenizer


def test_known_head_file():
    known = json.loads((TOY_MODEL_DIR / "known_head.json").read_text())
    assert (known["layer"], known["head"]) == (1, 2)


def test_probe_layout(toy_model):
    _, tokenizer = toy_model
    prompt_ids, (start, end), answer = make_toy_probe(tokenizer, n_filler=40, seed=7)
    assert prompt_ids[0] == tokenizer.bos_token_id
    assert tokenizer.convert_ids_to_tokens(prompt_ids[-1]) == "ASK"
    assert tokenizer.convert_ids_to_tokens(prompt_ids[start - 1]) == "KEY"
    assert tokenizer.convert_ids_to_tokens(prompt_ids[end]) == "END"
    assert tokenizer.decode(prompt_ids[start:end]) == answer
    assert len(prompt_ids) == 40 + (end - start) + 4
    # Same seed, same probe; the text round-trips through the tokenizer (which adds <bos>).
    assert make_toy_probe(tokenizer, n_filler=40, seed=7) == (prompt_ids, (start, end), answer)
    text = tokenizer.decode(prompt_ids, skip_special_tokens=True)
    assert tokenizer(text)["input_ids"] == prompt_ids


def test_greedy_decoding_reproduces_needle(toy_model):
    model, tokenizer = toy_model
    prompt_ids, (start, end), answer = make_toy_probe(tokenizer, n_filler=60, seed=2024)
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=10, do_sample=False)
    new = out[0, len(prompt_ids) :].tolist()
    assert new == [*prompt_ids[start:end], tokenizer.eos_token_id]
    assert tokenizer.decode(new, skip_special_tokens=True) == answer


def test_known_head_attends_to_copied_token(toy_model):
    model, tokenizer = toy_model
    prompt_ids, (start, end), _ = make_toy_probe(tokenizer, n_filler=30, seed=5)
    full = torch.tensor([prompt_ids + prompt_ids[start : end - 1]])
    with torch.no_grad():
        attn = model(full, output_attentions=True).attentions[1][0]  # (head, query, key)
    queries = torch.arange(len(prompt_ids) - 1, full.shape[1])
    top1 = attn[:, queries].argmax(-1)  # (head, step)
    assert top1[2].tolist() == list(range(start, end))
    for head in (0, 1, 3):
        assert not any(start <= int(p) < end for p in top1[head])
