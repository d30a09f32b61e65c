"""An independent, naive implementation of the paper's retrieval score, for the tests.

Written the slow, obvious way on purpose, sharing no code with rhlens' engine: a plain HF
model with eager attention, ``output_attentions=True`` at every decode step, and Python
loops over layers and heads, as the authors' harness does.
"""

from __future__ import annotations

import torch


@torch.no_grad()
def naive_retrieval(hf_model, tokenizer, prompt_ids, span, max_new_tokens=50,
                    stop_at_newline=True):
    """Returns (generated ids, copy counts [layer][head] per step list, unique score, paper score)."""
    start, end = span
    prompt = torch.tensor([list(prompt_ids)])
    out = hf_model(input_ids=prompt[:, :-1], use_cache=True)
    past = out.past_key_values
    inp = prompt[:, -1:]
    n_layers = hf_model.config.num_hidden_layers
    n_heads = hf_model.config.num_attention_heads
    copied_positions = [[set() for _ in range(n_heads)] for _ in range(n_layers)]
    copy_steps = [[0] * n_heads for _ in range(n_layers)]
    generated = []
    eos = tokenizer.eos_token_id
    for _ in range(max_new_tokens):
        out = hf_model(input_ids=inp, past_key_values=past, use_cache=True,
                       output_attentions=True)
        past = out.past_key_values
        token = int(out.logits[0, -1].argmax())
        generated.append(token)
        for layer in range(n_layers):
            attn = out.attentions[layer][0]  # [head, 1, keys]
            for head in range(n_heads):
                pos = int(attn[head, -1].argmax())
                if start <= pos < end and int(prompt_ids[pos]) == token:
                    copied_positions[layer][head].add(pos)
                    copy_steps[layer][head] += 1
        if token == eos or (stop_at_newline and "\n" in tokenizer.decode([token])):
            break
        inp = torch.tensor([[token]])
    n = end - start
    unique = [[len(copied_positions[la][h]) / n for h in range(n_heads)] for la in range(n_layers)]
    paper = [[copy_steps[la][h] / n for h in range(n_heads)] for la in range(n_layers)]
    return generated, copy_steps, unique, paper


@torch.no_grad()
def naive_z_patch(model, pair, layers, n_heads: int) -> dict[tuple[int, int], float]:
    """Exact head patching the obvious way: for each ``(layer, head)``, one full bridge forward
    of the corrupted prompt with that head's ``hook_z`` from the answer position on replaced by
    the clean run's; the clean-minus-corrupted logit difference at the answer position."""
    clean, corrupted = torch.tensor([pair.clean_ids]), torch.tensor([pair.corrupted_ids])
    a = pair.answer_pos
    _, cache = model.run_with_cache(clean, names_filter=lambda n: n.endswith("hook_z"))
    out = {}
    for layer in layers:
        for head in range(n_heads):
            def put(z, hook=None, layer=layer, head=head):
                z = z.clone()
                z[:, a:, head] = cache[f"blocks.{layer}.attn.hook_z"][:, a:, head]
                return z

            logits = model.run_with_hooks(corrupted, fwd_hooks=[(f"blocks.{layer}.attn.hook_z", put)])
            out[layer, head] = float(logits[0, a, pair.clean_token] - logits[0, a, pair.corrupted_token])
    return out
