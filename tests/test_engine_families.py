"""Every model family against a plain HF eager loop: greedy tokens and each head's top-1 key.

For each family a tiny random-weight fp32 model (``tests/tiny_families.py``: 2 layers, hidden
64, GQA where the family has it, sliding windows shorter than the prompts) decodes three
prompts through the engine with the retrieval recorder on, unmasked and under the paper's
uniform mask, alone and batched, on the CPU's default step and on the captured step (run
eagerly here); the tokens and the top-1 key of every head at every step equal
``tests/family_oracle.py``'s (transformers' own eager attention, no rhlens code). The decode
step each family takes is the one ``docs/FAMILIES.md`` lists.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from family_oracle import load_oracle, oracle_decode
from tiny_families import FAMILIES, tiny_models

from rhlens.ablation import ablation_hooks
from rhlens.engine import GenerationConfig, KernelPolicy, StepState, generate_many
from rhlens.retrieval import TopKeyRecorder

DOCS = Path(__file__).resolve().parents[1] / "docs" / "FAMILIES.md"
N_PROMPT, N_NEW = 40, 6
MASKED = ((0, 1), (1, 3))  # a head of each layer; under GQA one query head of a KV pair
POLICIES = {"cpu": KernelPolicy(), "captured": KernelPolicy(decode="captured")}
# OLMo-2 normalises q over all heads together, after q_proj; the bridge's hook_q (where
# ablate_heads' uniform mask zeroes a head's query) comes before that norm, so zeroing one head
# rescales the other heads' queries. The head itself still attends uniformly.
MASK_DIFFERS = {"olmo2": "uniform mask before OLMo-2's all-head q norm rescales the other heads"}


@pytest.fixture(scope="module")
def tokenizer():
    from rhlens.models import load_tokenizer

    return load_tokenizer()


@pytest.fixture(scope="module")
def prompts(tokenizer):
    g = torch.Generator().manual_seed(0)
    words = torch.randint(200, 20000, (2, N_PROMPT), generator=g)
    words[:, N_PROMPT // 2:N_PROMPT // 2 + 6] = words[0, 5:11]  # a repeat: something to copy
    return [row.tolist() for row in words]


def engine_decode(model, tok, prompts, policy, batch_size, masked):
    """``[(tokens, top keys [step, layer, head], info["decode"])]`` per prompt."""
    config = GenerationConfig(max_new_tokens=N_NEW, stop_at_eos=False, stop_at_newline=False,
                              batch_size=batch_size, policy=policy)
    state = StepState()
    rec = TopKeyRecorder(model.cfg.n_layers, model.cfg.n_heads, N_NEW, state, max_batch=batch_size)
    hooks = [*rec.hooks(), *(ablation_hooks(model, list(masked), mode="uniform") if masked else [])]
    out = []
    for gen in generate_many(model, tok, prompts, config=config, hooks=hooks, state=state,
                             on_start=lambda i: rec.reset()):
        out.append((gen.response_ids, rec.row(gen.info["batch_row"])[:gen.n_steps].clone(),
                    gen.info["decode"]))
    return out


def documented_paths() -> dict[str, tuple[str, str]]:
    """family -> (CPU step, GPU step) from docs/FAMILIES.md's table."""
    rows = {}
    for line in DOCS.read_text().splitlines():
        cells = [c.strip().strip("`") for c in line.strip().strip("|").split("|")]
        if len(cells) >= 4 and cells[0] in FAMILIES:
            rows[cells[0]] = (cells[2], cells[3])
    return rows


@pytest.mark.parametrize("family", FAMILIES)
def test_family_equals_hf_eager_loop(family, tokenizer, prompts):
    """Unmasked prompts alone and masked prompts batched, on the CPU's step and the captured
    step: tokens and top keys equal the HF loop's (so batched = alone = HF)."""
    model, hf = tiny_models(family, tokenizer)
    hf = load_oracle(hf)
    want = {masked: [oracle_decode(hf, p, N_NEW, masked) for p in prompts] for masked in ((), MASKED)}
    assert want[()] != want[MASKED]  # the mask changes what the model does
    documented = documented_paths().get(family)
    assert documented is not None, f"{family} is missing from docs/FAMILIES.md"
    ran = []
    for policy in POLICIES:
        if policy == "captured" and ran[0][1] == "bridge":
            continue  # the bridge's forward again: the same step as above
        for masked, rows in (((), 1), (MASKED, len(prompts))):
            got = engine_decode(model, tokenizer, prompts, POLICIES[policy], rows, masked)
            ran.append((policy, got[0][2]))
            if masked and family in MASK_DIFFERS:
                assert [g[0] for g in got] != [w[0] for w in want[masked]], "OLMo-2's mask: fixed?"
                continue
            for (tokens, tops, _), (w_tokens, w_tops) in zip(got, want[masked]):
                assert tokens == w_tokens, (family, policy, masked)
                assert tops.tolist() == w_tops, (family, policy, masked)
    for policy, path in ran:
        doc = documented[0 if policy == "cpu" else 1]
        assert path == doc, f"docs/FAMILIES.md is stale ({family}, {policy}: {path} runs, {doc} listed): " \
                            "python scripts/families_table.py"


def test_every_family_is_documented():
    assert set(documented_paths()) == set(FAMILIES)


# Variants of a family's layout that its default tiny config leaves out, each on the step the
# family takes (the CPU's and the captured one): (family, config overrides, experts impl).
VARIANTS = {
    # GPT-NeoX with a sequential residual (Pythia's is parallel): h + attn, then + mlp
    "gpt_neox-sequential": ("gpt_neox", {"use_parallel_residual": False}, None),
    # Phi-3 with a partial rotary embedding (Phi-4-mini: 0.75) and a sliding window shorter
    # than the prompts (Phi-3-mini's configs set one): one prompt at a time, HF's window cache
    "phi3-partial-window": ("phi3", {"partial_rotary_factor": 0.5, "sliding_window": 16}, None),
    # Mixtral under transformers' eager experts loop (experts added in ascending order)
    "mixtral-eager-experts": ("mixtral", {}, "eager"),
    "qwen3_moe-eager-experts": ("qwen3_moe", {}, "eager"),
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_family_variant_equals_hf_eager_loop(variant, tokenizer, prompts):
    """As above, for layouts the families' default tiny configs do not reach: unmasked alone and
    masked batched, on the CPU's step and the captured one, equal to the HF loop, and on the
    step the family's row of docs/FAMILIES.md names."""
    family, overrides, experts = VARIANTS[variant]
    model, hf = tiny_models(family, tokenizer, experts_implementation=experts, **overrides)
    hf = load_oracle(hf)
    want = {masked: [oracle_decode(hf, p, N_NEW, masked) for p in prompts] for masked in ((), MASKED)}
    assert want[()] != want[MASKED]
    documented = documented_paths()[family]
    for i, policy in enumerate(POLICIES):
        for masked, rows in (((), 1), (MASKED, len(prompts))):
            got = engine_decode(model, tokenizer, prompts, POLICIES[policy], rows, masked)
            for (tokens, tops, path), (w_tokens, w_tops) in zip(got, want[masked]):
                assert path == documented[i], (variant, policy)
                assert tokens == w_tokens, (variant, policy, masked)
                assert tops.tolist() == w_tops, (variant, policy, masked)


@pytest.mark.parametrize("family, point", [("olmo2", "hook_q_normed"), ("gpt_neox", "hook_rot_q"),
                                           ("phi3", "hook_rot_k")])
def test_adapted_family_unfired_hook_takes_the_bridge(family, point, tokenizer):
    """A hook on a point the adapted lean step does not fire as the bridge does (OLMo-2's normed
    query; the fused-qkv bridge's unfired rotary points) sends the decode to the bridge."""
    from rhlens.engine.captured import decode_path

    model, _ = tiny_models(family, tokenizer)
    assert decode_path(model, "lean") == "lean"
    hook_point = getattr(model.blocks[1].attn, point)
    hook_point.add_hook(lambda x, hook: x)
    try:
        assert decode_path(model, "lean") == "bridge"
    finally:
        hook_point.remove_hooks("fwd")
    assert decode_path(model, "lean") == "lean"
