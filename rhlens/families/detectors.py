"""TransformerLens' head detectors (previous-token, duplicate-token, induction) on repeated random tokens.

``transformer_lens.head_detector.detect_head`` runs on a ``TransformerBridge`` as it is
(it needs ``to_tokens``, ``run_with_cache`` and ``cfg``, which the bridge has), so these
scores are TransformerLens' own: for each head, the share of its attention on the positions
the detection pattern names (``error_measure="mul"``), on the usual synthetic input, a
sequence of random tokens repeated once. On it every definition has a known answer: a
previous-token head attends to position ``i - 1``, a duplicate-token head (in the second
half) to the earlier copy of its token, an induction head to the token after that copy.

Random tokens are drawn from whole words of the vocabulary (tokens that decode to a space and
3+ letters and encode back to themselves), so the text ``detect_head`` re-tokenizes gives the
tokens drawn. One forward per sequence serves all three detectors (its cache is passed in).
"""

from __future__ import annotations

import random
import re
from typing import Literal

import torch
from jaxtyping import Float
from torch import Tensor

from rhlens.errors import ConfigError
from rhlens.validate import DRAWS_WHY, MAX_DRAWS, check_count

__all__ = ["DETECTORS", "detector_scores", "repeated_sequences"]

# family name -> TransformerLens' detection pattern name
DETECTORS: dict[str, str] = {"previous-token": "previous_token_head",
                             "duplicate-token": "duplicate_token_head",
                             "induction": "induction_head"}
_WORD = re.compile(r"^ [A-Za-z]{3,}$")


def _word_ids(tokenizer, limit: int = 20000) -> list[int]:
    """Token ids (among the first ``limit``) that are a space and a 3+ letter word, and that
    encode back to the same single token after another word."""
    out = []
    for i in range(min(limit, len(tokenizer))):
        piece = tokenizer.decode([i])
        if _WORD.match(piece) and tokenizer("x" + piece, add_special_tokens=False)["input_ids"][-1:] == [i]:
            out.append(i)
    return out


def repeated_sequences(tokenizer, *, n: int = 8, length: int = 40, seed: int = 0) -> list[str]:
    """``n`` texts of ``length`` random words, each repeated once (``"w1 .. wL w1 .. wL"``)."""
    if n < 1 or length < 2:
        raise ConfigError(f"need n >= 1 sequences of length >= 2, got n={n}, length={length}")
    check_count(n, "n (sequences)", maximum=MAX_DRAWS, why=DRAWS_WHY)  # before any is drawn
    words = _word_ids(tokenizer)
    if len(words) < 2 * length:
        # A tiny vocabulary (the toy model's): any single-token word.
        words = [i for i in range(len(tokenizer))
                 if tokenizer.decode([i]).strip().isalnum() and i not in tokenizer.all_special_ids]
    if len(words) < length:
        raise ConfigError(f"the tokenizer has {len(words)} usable word tokens, fewer than length={length}")
    rng = random.Random(seed)
    texts = []
    for _ in range(n):
        half = tokenizer.decode(rng.sample(words, length))
        texts.append(f"{half} {half.strip()}" if not half.startswith(" ") else half + half)
    return texts


@torch.no_grad()
def detector_scores(model, texts: list[str], *, which: tuple[str, ...] = tuple(DETECTORS),
                    error_measure: Literal["mul", "abs"] = "mul",
                    ) -> dict[str, Float[Tensor, "sequence layer head"]]:
    """TransformerLens' ``detect_head`` scores of every head on each text, per detector.

    Returns ``{family: [sequence, layer, head]}`` for the families in ``which``
    (keys of :data:`DETECTORS`).
    """
    from transformer_lens.head_detector import detect_head

    unknown = [w for w in which if w not in DETECTORS]
    if unknown:
        raise ConfigError(f"unknown detector(s) {', '.join(unknown)}; known: {', '.join(DETECTORS)}")
    if not texts:
        raise ConfigError("no sequences given")
    out: dict[str, list[Tensor]] = {w: [] for w in which}
    patterns = lambda name: name.endswith("hook_pattern")  # noqa: E731
    for text in texts:
        tokens = model.to_tokens(text)
        _, cache = model.run_with_cache(tokens, names_filter=patterns, remove_batch_dim=True)
        for w in which:
            scores = detect_head(model, text, DETECTORS[w], cache=cache, error_measure=error_measure)
            out[w].append(scores.detach().float().cpu())
    return {w: torch.stack(v) for w, v in out.items()}
