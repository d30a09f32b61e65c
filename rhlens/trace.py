"""What a few heads did while the model answered one probe, step by step: the data of a head view.

:func:`trace_heads` answers a probe greedily (or takes a given answer), re-reads the answer's
attention rows with :func:`rhlens.retrieval.cache_answer_patterns` (the prompt's n x n pattern
is never formed) and keeps, for each chosen head and each decode step, the key it attended to
most, that key's weight, the head's attention on the needle, whether it copied (the engine's
copy rule, :func:`rhlens.retrieval.copy_mask`) and its attention over a window of the context
around the needle. :class:`HeadTrace` is a :class:`~rhlens.results.Result` (saves and loads
like every result); :mod:`rhlens.views` draws it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from rhlens.errors import ConfigError
from rhlens.results import Result

__all__ = ["HeadTrace", "parse_heads", "trace_heads"]


@dataclass
class HeadTrace(Result):
    """Per decode step, what each of ``heads`` attended to while the model answered one probe.

    Attributes:
        model_name: the model.
        probe: the probe's metadata (key, length, depth, needle_id, question, expected answer).
        tokens: every prompt token as text (``tokenizer.decode([id])``).
        answer: every generated token as text, the stopping one included.
        needle_span: ``[start, end)`` of the needle's answer tokens in the prompt.
        window: ``[start, end)`` of the context kept in :attr:`window_attention`.
        heads: ``[[layer, head], ...]``.
        top_position: ``[step, head]`` the key each head attended to most (absolute position).
        top_weight: ``[step, head]`` that key's attention weight.
        needle_mass: ``[step, head]`` the head's attention summed over the needle span.
        copied: ``[step, head]`` whether the head copied at that step (top key in the needle,
            and the token there is the token being generated).
        window_attention: ``[step, head, window]`` the head's attention over :attr:`window`.
        probe_scores: ``[head]`` each head's retrieval score on this probe (distinct needle
            tokens copied / needle length, as :func:`~rhlens.retrieval.detect_retrieval_heads`).
        head_scores: each head's mean score over a detection run's probes, when one was given.
        recall: ROUGE-1 recall of the answer against the expected one.
    """

    model_name: str
    probe: dict[str, Any]
    tokens: list[str]
    answer: list[str]
    needle_span: list[int]
    window: list[int]
    heads: list[list[int]]
    top_position: Int[Tensor, "step head"]
    top_weight: Float[Tensor, "step head"]
    needle_mass: Float[Tensor, "step head"]
    copied: Bool[Tensor, "step head"]
    window_attention: Float[Tensor, "step head window"]
    probe_scores: Float[Tensor, " head"]
    head_scores: list[float] | None = None
    recall: float = 0.0
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def n_steps(self) -> int:
        return int(self.top_position.shape[0])

    def head_index(self, layer: int, head: int) -> int:
        try:
            return self.heads.index([layer, head])
        except ValueError:
            raise ConfigError(f"L{layer}H{head} is not traced; traced: "
                              f"{', '.join(f'L{a}H{b}' for a, b in self.heads)}") from None

    def steps(self, layer: int, head: int) -> list[dict[str, Any]]:
        """One dict per decode step for one head: the token generated, the top key, its weight."""
        i = self.head_index(layer, head)
        out = []
        for s in range(self.n_steps):
            pos = int(self.top_position[s, i])
            out.append({"step": s, "generated": self.answer[s], "top_position": pos,
                        "top_token": self.tokens[pos] if 0 <= pos < len(self.tokens) else "",
                        "top_weight": float(self.top_weight[s, i]),
                        "in_needle": self.needle_span[0] <= pos < self.needle_span[1],
                        "needle_mass": float(self.needle_mass[s, i]),
                        "copied": bool(self.copied[s, i])})
        return out

    def to_dataframe(self):
        """One row per (head, step)."""
        import pandas as pd

        return pd.DataFrame([{"layer": la, "head": h, **row} for la, h in self.heads
                             for row in self.steps(la, h)])

    def _repr_html_(self) -> str:
        from rhlens.views import head_view

        return head_view(self)._repr_html_()


def parse_heads(spec: str | Sequence[Any], scores=None) -> list[tuple[int, int]]:
    """Heads from ``"18.6,3.1"`` / ``"L18H6"`` / ``"top:3"`` / ``"bottom:1"`` / ``"top:2,bottom:1"``
    or a list of ``(layer, head)``; ``top``/``bottom`` rank by ``scores`` (a RetrievalScores)."""
    import re

    if not isinstance(spec, str):
        return [(int(a), int(b)) for a, b in spec]
    out: list[tuple[int, int]] = []
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        m = re.fullmatch(r"(top|bottom):(\d+)", part)
        if m:
            if scores is None:
                raise ConfigError(f"{part!r} needs retrieval scores (a detection run)")
            ranked = scores.ranked()
            k = int(m.group(2))
            picked = ranked[:k] if m.group(1) == "top" else ranked[::-1][:k]
            out += [(int(a), int(b)) for a, b in picked]
            continue
        m = re.fullmatch(r"L?(\d+)[.H](\d+)", part)
        if not m:
            raise ConfigError(f"cannot read head {part!r}: use L.H (e.g. 18.6), L18H6, top:K or bottom:K")
        out.append((int(m.group(1)), int(m.group(2))))
    if not out:
        raise ConfigError("no heads given")
    return list(dict.fromkeys(out))


@torch.no_grad()
def trace_heads(model, probe, heads: str | Sequence[Any], *, answer_ids: Sequence[int] | None = None,
                tokenizer=None, scores=None, context: int = 48,
                max_new_tokens: int = 50) -> HeadTrace:
    """Trace ``heads`` while ``model`` answers ``probe``.

    Args:
        model: a TransformerBridge (``rhlens.load_model``).
        probe: a :class:`~rhlens.probe.Probe`.
        heads: ``[(layer, head), ...]`` or a spec for :func:`parse_heads` (``"top:2,bottom:1"``).
        answer_ids: the answer to trace (default: the model's greedy answer, through the engine).
        tokenizer: defaults to ``model.tokenizer``.
        scores: a :class:`~rhlens.scores.RetrievalScores` to rank ``top:K`` heads and label each
            head with its mean score.
        context: tokens of context kept on each side of the needle.
        max_new_tokens: decode steps at most when the answer is generated here.
    """
    from rhlens.engine import GenerationConfig, generate
    from rhlens.retrieval import cache_answer_patterns, copy_mask, copy_scores
    from rhlens.stats import rouge1_recall

    tokenizer = tokenizer or getattr(model, "tokenizer", None)
    if tokenizer is None:
        raise ConfigError("pass the tokenizer: the model has none attached")
    chosen = parse_heads(heads, scores)
    n_layers, n_heads = int(model.cfg.n_layers), int(model.cfg.n_heads)
    for la, h in chosen:
        if not (0 <= la < n_layers and 0 <= h < n_heads):
            raise ConfigError(f"L{la}H{h} is outside the model's {n_layers} layers x {n_heads} heads")
    if context < 0:
        raise ConfigError(f"context must be >= 0, got {context}")
    if answer_ids is None:
        gen = generate(model, tokenizer, probe.prompt_ids,
                       config=GenerationConfig(max_new_tokens=max_new_tokens))
        answer_ids, response = list(gen.response_ids), gen.response
    else:
        answer_ids = [int(t) for t in answer_ids]
        response = tokenizer.decode(answer_ids, skip_special_tokens=True)
    if not answer_ids:
        raise ConfigError("the answer is empty: nothing to trace")
    prompt = [int(t) for t in probe.prompt_ids]
    n, steps = len(prompt), len(answer_ids)
    tokens = prompt + answer_ids
    cache = cache_answer_patterns(model, tokens, answer_start=n)
    start, end = (int(x) for x in probe.needle_span)
    lo, hi = max(0, start - context), min(n, end + context)
    top_pos, top_w, mass, win = [], [], [], []
    for la, h in chosen:
        rows = cache[f"blocks.{la}.attn.hook_pattern"][0, h].float()  # [step, key]
        offset = (n - 1 + steps - 1) + 1 - rows.shape[-1]  # keys end at the last query row
        if offset > lo:
            raise ConfigError(f"L{la}H{h}'s cached keys start at {offset}, after the window's {lo}")
        w, p = rows.max(-1)
        top_pos.append(p + offset)
        top_w.append(w)
        mass.append(rows[:, start - offset:end - offset].sum(-1))
        win.append(rows[:, lo - offset:hi - offset])
    positions = torch.stack(top_pos, 1).cpu()  # [step, head]
    generated = torch.tensor(answer_ids)
    prompt_t = torch.tensor(prompt)
    copied = copy_mask(positions[:, None], generated, prompt_t, (start, end))[:, 0]
    probe_scores = copy_scores(positions[:, None], generated, prompt_t, (start, end))[0]
    head_scores = None
    if scores is not None:
        mean = scores.mean
        head_scores = [float(mean[la, h]) for la, h in chosen]
    return HeadTrace(
        model_name=getattr(model, "rhlens_name", None) or str(getattr(model.cfg, "model_name", "model")),
        probe={"key": probe.key, "length": probe.length, "depth": probe.depth,
               "needle_id": probe.needle_id, "question": probe.question,
               "expected": probe.real_needle, "response": response},
        tokens=[tokenizer.decode([t]) for t in prompt],
        answer=[tokenizer.decode([t]) for t in answer_ids],
        needle_span=[start, end], window=[lo, hi], heads=[[la, h] for la, h in chosen],
        top_position=positions, top_weight=torch.stack(top_w, 1).cpu(),
        needle_mass=torch.stack(mass, 1).cpu(), copied=copied,
        window_attention=torch.stack(win, 1).cpu(), probe_scores=probe_scores,
        head_scores=head_scores, recall=float(rouge1_recall(probe.real_needle, response)))
