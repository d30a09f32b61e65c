"""Scores from chosen query rows of one forward: the question's rows (query) and a teacher-forced answer's.

Only the rows asked for are ever formed: the prompt before the first of them is prefilled
through the model's own SDPA attention (no pattern), then the rows run through the bridge
against that KV cache (:func:`rhlens.retrieval.cache_answer_patterns`), so each layer's
pattern is ``[head, rows, keys]``, never ``[keys, keys]``.

* **query** (QRHead-style, Zhang et al. 2025, who score heads by the attention from a query
  to the gold passage): a head's attention on the needle sentence (or the answer) from the
  question's tokens at the end of the prompt, averaged over those tokens. No calibration
  against a null query is made (QRHead subtracts one): ranking heads of one model needs none.
* **copy / copy-paper / mass under a given answer**: the answer teacher-forced after the
  prompt; the row that writes answer token ``s`` is position ``n - 1 + s``, as at the
  engine's decode step ``s``. With the model's own answer this equals the decode pass
  (:mod:`rhlens.families.recorder`); with the reference answer (the needle's answer tokens)
  it scores probes the model gets wrong, the heads that would carry the answer if it wrote it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from jaxtyping import Float
from torch import Tensor

from rhlens.errors import ConfigError, ProbeError
from rhlens.families.recorder import span_mass
from rhlens.probes.probe import Probe
from rhlens.retrieval import cache_answer_patterns, copy_scores, pattern_layers

__all__ = ["Span", "forced_scores", "needle_sentence_span", "probe_query_scores", "probe_span",
           "question_span", "row_patterns"]

Span = Literal["answer", "needle"]
_PLACED = ("insert_token", "haystack_position", "haystack_tokens", "needle_tokens")


def _placed(probe: Probe) -> dict[str, int]:
    missing = [k for k in _PLACED if k not in probe.meta]
    if missing:
        raise ConfigError(f"probe {probe.key} does not record where its needle and context are "
                          f"(meta lacks {', '.join(missing)}): build it with rhlens.probes.build_probes, "
                          "or pass the question's rows and the span yourself")
    return {k: int(probe.meta[k]) for k in _PLACED}


def needle_sentence_span(probe: Probe) -> tuple[int, int]:
    """``[start, end)`` of the whole needle sentence in the prompt (the answer lies inside)."""
    meta = _placed(probe)
    return meta["insert_token"], meta["insert_token"] + meta["needle_tokens"]


def probe_span(probe: Probe, span: Span | Sequence[int]) -> tuple[int, int]:
    """The probe's answer span (``"answer"``), its needle sentence (``"needle"``), or an
    explicit ``(start, end)``."""
    if span == "answer":
        return int(probe.needle_span[0]), int(probe.needle_span[1])
    if span == "needle":
        return needle_sentence_span(probe)
    if isinstance(span, str):
        raise ConfigError(f"span must be 'answer', 'needle' or (start, end), got {span!r}")
    start, end = (int(x) for x in span)
    return start, end


def question_span(probe: Probe, tokenizer) -> tuple[int, int]:
    """``[start, end)`` of the question's tokens in the prompt, after the context.

    Found in the tokens that follow the context (template, question, chat markup): the
    question's text is located in their decoded text and mapped back to the tokens that
    overlap it (a token merging the question's edge with its neighbour is included).
    """
    meta = _placed(probe)
    ctx_end = (meta["insert_token"] - meta["haystack_position"] + meta["haystack_tokens"]
        + meta["needle_tokens"])
    suffix = list(probe.prompt_ids[ctx_end:])
    question = probe.question.strip()
    if not question or not suffix:
        raise ProbeError(f"probe {probe.key} has no question after its context")
    text = tokenizer.decode(suffix)
    c0 = text.rfind(question)
    if c0 < 0:
        raise ProbeError(f"probe {probe.key}: the question {question!r} is not found in the "
                         "prompt's tokens after the context")
    c1 = c0 + len(question)
    ends = [len(tokenizer.decode(suffix[:i + 1])) for i in range(len(suffix))]
    inside = [i for i, end in enumerate(ends) if end > c0 and (ends[i - 1] if i else 0) < c1]
    return ctx_end + inside[0], ctx_end + inside[-1] + 1


def row_patterns(model, tokens: Sequence[int], rows: tuple[int, int], *,
                 prefill_chunk: int | None = None) -> list[tuple[Tensor, int]]:
    """Each layer's attention at query rows ``[r0, r1)`` of ``tokens``: ``(pattern, offset)``
    with ``pattern`` ``[head, row, key]`` and key ``k`` at absolute position ``offset + k``
    (``offset > 0`` where a sliding-window layer dropped early keys)."""
    r0, r1 = rows
    if not 1 <= r0 < r1 <= len(tokens):
        raise ConfigError(f"rows ({r0}, {r1}) must lie inside the {len(tokens)} tokens, after the first")
    # cache_answer_patterns runs rows [answer_start - 1, n - 1): rows [r0, r1) when the
    # sequence is tokens[:r1] plus one token that is never fed.
    seq = [*tokens[:r1], int(tokens[-1])]
    cache = cache_answer_patterns(model, seq, answer_start=r0 + 1, prefill_chunk=prefill_chunk)
    out = []
    for name in pattern_layers(cache):
        pattern = cache[name][0]  # [head, row, key]; keys end at the last row
        out.append((pattern, r1 - pattern.shape[-1]))
    return out


def _rows_mass(layers: list[tuple[Tensor, int]], lo: int, hi: int,
               span: tuple[int, int]) -> Float[Tensor, "layer head"]:
    """Mean over rows ``[lo, hi)`` (indices into the patterns' rows) of the mass on ``span``."""
    return torch.stack([span_mass(p[:, lo:hi], span, off).mean(-1) for p, off in layers]).cpu()


@torch.no_grad()
def probe_query_scores(model, probe: Probe, *, tokenizer=None, span: Span | Sequence[int] = "needle",
                       rows: Sequence[int] | None = None,
                       prefill_chunk: int | None = None) -> Float[Tensor, "layer head"]:
    """Each head's attention on ``span`` from the question's rows, averaged over those rows.

    Args:
        model: a TransformerBridge.
        probe: a probe from :func:`rhlens.probes.build_probes` (its meta locates the needle and
            the context's end); a hand-made probe needs ``rows`` and a ``(start, end)`` span.
        tokenizer: to find the question's tokens (default ``model.tokenizer``).
        span: ``"needle"`` (the needle sentence), ``"answer"`` or ``(start, end)``.
        rows: ``(start, end)`` of the query rows (default: :func:`question_span`).
        prefill_chunk: the prefill's chunk (the engine's default when ``None``).
    """
    return forced_scores(model, probe, tokenizer=tokenizer, query_span=span, rows=rows,
                         prefill_chunk=prefill_chunk)["query"]


@torch.no_grad()
def forced_scores(model, probe: Probe, *, answer_ids: Sequence[int] | None = None,
                  tokenizer=None, query_span: Span | Sequence[int] | None = "needle",
                  mass_span: Span | Sequence[int] = "answer", rows: Sequence[int] | None = None,
                  prefill_chunk: int | None = None) -> dict[str, Float[Tensor, "layer head"]]:
    """``query`` scores, and with ``answer_ids`` the ``copy``, ``copy-paper`` and ``mass``
    scores of that answer teacher-forced, from one forward over the rows from the question on.

    ``answer_ids``: every answer token (the model's, with its stopping token, gives the decode
    pass's scores; the needle's answer tokens give reference scores). Copy scores use the
    probe's answer span (:func:`rhlens.retrieval.copy_scores`); ``mass`` is the attention on
    ``mass_span`` averaged over the answer's steps. ``query_span=None``: no ``query`` scores
    (the rows then start at the answer).
    """
    n = probe.n_tokens
    answer = [int(t) for t in (answer_ids or ())]
    if query_span is None:
        if not answer:
            raise ConfigError("nothing to score: no query_span and no answer_ids")
        rows = (n - 1, n)
    tokenizer = tokenizer or getattr(model, "tokenizer", None)
    if rows is None:
        if tokenizer is None:
            raise ConfigError("pass the tokenizer (to find the question's tokens) or rows=")
        rows = question_span(probe, tokenizer)
    q0, q1 = (int(x) for x in rows)
    if not 1 <= q0 < q1 <= n:
        raise ConfigError(f"query rows ({q0}, {q1}) must lie inside the {n}-token prompt, after "
                          "its first token")
    qspan = probe_span(probe, query_span) if query_span is not None else None
    if qspan is not None and not 0 <= qspan[0] < qspan[1] <= q0:
        raise ConfigError(f"the span {qspan} must lie before the query rows ({q0}, {q1})")
    tokens = [*probe.prompt_ids, *answer]
    last = n - 1 + len(answer) if answer else q1  # rows [q0, last)
    layers = row_patterns(model, tokens, (q0, max(last, q1)), prefill_chunk=prefill_chunk)
    out = {"query": _rows_mass(layers, 0, q1 - q0, qspan)} if qspan is not None else {}
    if answer:
        a0 = n - 1 - q0  # the row of answer step 0
        steps = len(answer)
        positions = torch.stack([p[:, a0:a0 + steps].argmax(-1) + off for p, off in layers])  # [L, H, S]
        positions = positions.permute(2, 0, 1).cpu()  # [step, layer, head]
        generated = torch.tensor(answer)
        prompt = torch.tensor(list(probe.prompt_ids))
        span = (int(probe.needle_span[0]), int(probe.needle_span[1]))
        out["copy"] = copy_scores(positions, generated, prompt, span, "unique")
        out["copy-paper"] = copy_scores(positions, generated, prompt, span, "paper")
        out["mass"] = _rows_mass(layers, a0, a0 + steps, probe_span(probe, mass_span))
    return out
