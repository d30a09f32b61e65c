"""A plain HF greedy loop with eager attention that reads every head's top-1 key, for any family.

Independent of rhlens' engine on purpose: the model is loaded by ``transformers`` with its own
eager attention (each family's ``eager_attention_forward``, softcaps and sliding windows
included), the prompt minus its last token is read in one forward, and every later token is
one cached forward; a wrapper around the family's eager attention takes the argmax of each
head's weights on the step's query and, for the masked heads, zeroes the head's query (the
paper's uniform mask: every visible key gets the same weight) while the model answers.
"""

from __future__ import annotations

import sys

import torch

_IMPL = "rhlens_test_oracle"
_STATE: dict = {"record": None, "masked": {}, "position": 0}


def _attention(module, query, key, value, attention_mask, **kwargs):
    eager = sys.modules[type(module).__module__].eager_attention_forward
    record = _STATE["record"]
    layer = module.layer_idx
    if record is not None and _STATE["masked"].get(layer):
        query = query.clone()
        query[:, _STATE["masked"][layer]] = 0
    out, weights = eager(module, query, key, value, attention_mask, **kwargs)
    if record is not None:  # a decode step: one query; key index -> absolute position
        offset = _STATE["position"] + 1 - key.shape[2]
        record[layer] = [int(i) + offset for i in weights[0, :, -1].argmax(-1)]
    return out, weights


def load_oracle(hf):
    """A plain HF model (a folder, or the model itself) in float32 with the oracle's attention."""
    from transformers import AttentionInterface, AutoModelForCausalLM
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(_IMPL, _attention)
    AttentionMaskInterface.register(_IMPL, eager_mask)
    if not isinstance(hf, torch.nn.Module):
        hf = AutoModelForCausalLM.from_pretrained(str(hf), dtype=torch.float32, attn_implementation="eager")
    for cfg in {id(c): c for c in [hf.config, *(getattr(m, "config", None) for m in hf.modules())]
                if c is not None}.values():
        cfg._attn_implementation = _IMPL
    return hf.eval()


@torch.no_grad()
def oracle_decode(hf, prompt_ids, max_new_tokens, masked=()):
    """``(generated ids, top keys [step][layer][head])``: greedy, no stop but the length;
    ``masked``: (layer, head) pairs whose query is zeroed at every decode step."""
    n_layers = hf.config.get_text_config().num_hidden_layers
    by_layer: dict[int, list[int]] = {}
    for layer, head in masked:
        by_layer.setdefault(layer, []).append(head)
    prompt = torch.tensor([list(prompt_ids)])
    _STATE.update(record=None, masked=by_layer)
    past = hf(input_ids=prompt[:, :-1], use_cache=True).past_key_values
    inp, tokens, tops = prompt[:, -1:], [], []
    for step in range(max_new_tokens):
        record = [None] * n_layers
        _STATE.update(record=record, position=len(prompt_ids) - 1 + step)
        out = hf(input_ids=inp, past_key_values=past, use_cache=True)
        _STATE["record"] = None
        past = out.past_key_values
        token = int(out.logits[0, -1].argmax())
        tokens.append(token)
        tops.append(record)
        inp = torch.tensor([[token]])
    return tokens, tops
