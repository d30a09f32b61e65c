"""The synthetic needle-copy task behind ``tests/data/toy_retrieval_model``.

A prompt is ``<bos> f.. f.. KEY v.. v.. v.. v.. END f.. f.. ASK`` (4-6 distinct value words
in the needle, filler words around it); the model answers with the needle's value words and
then ``<eos>``. ``scripts/make_toy_model.py`` trains on exactly these sequences, so this file
is the single definition of the format.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

TOY_MODEL_DIR = Path(__file__).parent / "data" / "toy_retrieval_model"

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
KEY, END, ASK = "KEY", "END", "ASK"
N_FILLER_WORDS = 24
N_VALUE_WORDS = 24
FILLER_WORDS: tuple[str, ...] = tuple(f"f{i}" for i in range(N_FILLER_WORDS))
VALUE_WORDS: tuple[str, ...] = tuple(f"v{i}" for i in range(N_VALUE_WORDS))
MIN_VALUES, MAX_VALUES = 4, 6
# The range of n_filler the toy model was trained on; it is reliable inside it.
MIN_FILLER, MAX_FILLER = 8, 150

# Token order of the vocabulary: id = index.
VOCAB: tuple[str, ...] = (PAD, BOS, EOS, UNK, KEY, END, ASK, *FILLER_WORDS, *VALUE_WORDS)


def sample_toy_words(rng: random.Random, n_filler: int) -> tuple[list[str], tuple[int, int], list[str]]:
    """Draw one prompt as words.

    Returns ``(prompt_words, needle_span, values)``: ``prompt_words`` starts with ``<bos>``
    and ends with ``ASK``; ``needle_span`` is the half-open ``(start, end)`` of the value words
    inside ``prompt_words``; ``values`` are those words, i.e. the expected answer.
    """
    if n_filler < 0:
        raise ValueError(f"n_filler must be >= 0, got {n_filler}")
    n_values = rng.randint(MIN_VALUES, MAX_VALUES)
    values = rng.sample(VALUE_WORDS, n_values)
    n_before = rng.randint(0, n_filler)
    filler = [rng.choice(FILLER_WORDS) for _ in range(n_filler)]
    words = [BOS, *filler[:n_before], KEY, *values, END, *filler[n_before:], ASK]
    start = 1 + n_before + 1
    return words, (start, start + n_values), values


def make_toy_probe(tokenizer: Any, n_filler: int, seed: int) -> tuple[list[int], tuple[int, int], str]:
    """One deterministic probe for the toy model.

    Returns ``(prompt_ids, needle_span, answer_text)``: ``prompt_ids`` begins with the BOS id
    and ends with the id of ``ASK`` (feed it as is, add no special tokens); ``needle_span`` is
    the half-open ``(start, end)`` of the needle's value tokens in ``prompt_ids``, so
    ``prompt_ids[start:end]`` is the answer; ``answer_text`` is those words joined by spaces,
    which equals ``tokenizer.decode(answer_ids, skip_special_tokens=True)``. The prompt has
    ``n_filler + n_values + 4`` tokens, with ``n_values`` in 4..6.
    """
    words, span, values = sample_toy_words(random.Random(seed), n_filler)
    ids = [int(i) for i in tokenizer.convert_tokens_to_ids(words)]
    return ids, span, " ".join(values)
