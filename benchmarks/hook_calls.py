"""What one hook call costs the lean decode step: through the hook point vs called straight.

The lean step calls an :class:`rhlens.engine.EngineHook` that only reads (the retrieval
recorder) or carries a ``flat`` head edit (``ablate_heads``' masks) without the hook point's
module call, TransformerLens wrapper and reshape. This times one call each way on the toy
model's shapes (minimum over repeats, so a loaded machine inflates it least):

    python benchmarks/hook_calls.py
"""

from __future__ import annotations

import sys
import timeit
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from rhlens.ablation import ablation_hooks  # noqa: E402
from rhlens.engine import StepState, phase  # noqa: E402
from rhlens.engine.attention import direct_hooks  # noqa: E402
from rhlens.models import load_model  # noqa: E402
from rhlens.retrieval import TopKeyRecorder  # noqa: E402

from toy import TOY_MODEL_DIR  # noqa: E402


def main() -> None:
    torch.set_num_threads(1)
    model, _ = load_model(str(TOY_MODEL_DIR), device="cpu")
    n_heads, d_head = model.cfg.n_heads, model.cfg.d_head
    state = StepState()
    state.step, state.n_seen = 0, 100
    rec = TopKeyRecorder(model.cfg.n_layers, n_heads, 4, state)
    pattern = torch.softmax(torch.randn(1, n_heads, 1, 100), -1)  # [batch, head, 1, keys]
    z = torch.randn(1, 1, n_heads * d_head)  # [batch, 1, head * d_head]
    hooks = rec.hooks() + ablation_hooks(model, [(1, 0)], mode="zero")
    with model.hooks(fwd_hooks=hooks), phase("decode", state):
        attn = model.blocks[1].attn
        straight = direct_hooks(attn.hook_pattern, n_heads, d_head, False)
        flat = direct_hooks(attn.o.hook_in, n_heads, d_head, True)
        cases = (("recorder via hook_pattern", attn.hook_pattern, pattern),
                 ("recorder called straight", straight, pattern),
                 ("zero mask via hook_z", attn.o.hook_in, z), ("zero mask, flat edit", flat, z))
        for name, fn, x in cases:
            seconds = min(timeit.repeat(lambda fn=fn, x=x: fn(x), number=2000, repeat=7)) / 2000
            print(f"{name}: {seconds * 1e6:.1f} us")


if __name__ == "__main__":
    main()
