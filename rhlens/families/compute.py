"""``score_families``: every score family of a model on one probe set, in as few passes as the families allow.

* The **decode pass** (``answers="model"``, the paper's): the engine answers every probe
  greedily while :class:`~rhlens.families.recorder.AnswerRecorder` watches (one recorder,
  read-only decode-time hooks, the engine's fast paths on): ``copy``, ``copy-paper`` and
  ``mass`` come from the same steps.
* The **forced pass** (:mod:`rhlens.families.forced`): the question's rows (``query``) and,
  with ``answers="reference"``, the needle's answer teacher-forced (``copy``, ``copy-paper``,
  ``mass`` for every probe, answered or not), one native prefill plus one bridge forward over
  those rows per probe.
* The **detectors** (:mod:`rhlens.families.detectors`): TransformerLens' own, on repeated
  random words.

Given ``out``, each probe's record is appended to ``out/families.jsonl`` as soon as it is
known and a rerun skips the probes found there (``out/families.run.json`` holds the run's
identity; another model, probe set or setting is refused). The probes run on
:class:`rhlens.distributed.Sweep`, so inside a ``torchrun`` launch they are split across the
ranks, every rank returning every family.
"""

from __future__ import annotations

import dataclasses
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float

from rhlens.distributed import Sweep, decode_step_tokens, engine_plan, prefix_order
from rhlens.engine import StepState, generate_many, model_tokenizer
from rhlens.engine.bridge import hf_model, text_config
from rhlens.errors import ConfigError
from rhlens.families.detectors import detector_scores, repeated_sequences
from rhlens.families.forced import forced_scores, probe_span, question_span
from rhlens.families.recorder import AnswerRecorder
from rhlens.families.result import FamiliesConfig, FamilyScores, FamilySet
from rhlens.probes.probe import Probe
from rhlens.retrieval import DetectConfig, bridge_shape, check_probes, copy_scores
from rhlens.stats import rouge1_recall
from rhlens.store.identity import run_header
from rhlens.validate import check_resumed, families_record_problem

__all__ = ["FAMILIES_LOG", "layer_types", "needle_mass_scores", "score_families"]

FAMILIES_LOG = "families.jsonl"
_META = ("key", "length", "depth", "needle_id", "n_tokens", "response", "response_ids",
         "rouge_recall", "success", "stop_reason", "question_span")


def layer_types(model) -> list[str] | None:
    """``"sliding"`` / ``"global"`` per layer when the model mixes them (Gemma 3), else ``None``."""
    types = getattr(text_config(hf_model(model)), "layer_types", None)
    if not types or len(set(types)) < 2:
        return None
    return ["sliding" if "sliding" in str(t) else "global" for t in types]


def _grid(t: torch.Tensor) -> list[list[float]]:
    return [[round(float(x), 6) for x in row] for row in t.cpu()]


def score_families(model, probes: Sequence[Probe], *, config: FamiliesConfig | None = None,
                   tokenizer=None, needle_set: str = "", out: str | Path | None = None,
                   progress: bool = False) -> FamilySet:
    """Score every head of ``model`` with each family of ``config.families``.

    Args:
        model: a TransformerBridge (``rhlens.load_model``).
        probes: NIAH probes (:func:`rhlens.probes.build_probes`); not needed (may be empty)
            when only detector families are asked for.
        config: :class:`FamiliesConfig` (default: every family, the paper's answers).
        needle_set: a name for the probes, kept with the result (``"literal"``, ...).
        out: a directory for the per-probe log (resumable; see the module's doc).
        progress: show a progress bar.
    """
    config = config or FamiliesConfig()
    if not isinstance(config, FamiliesConfig):
        raise ConfigError(f"config must be a FamiliesConfig, got {type(config).__name__}")
    tokenizer = model_tokenizer(model, tokenizer)
    probes = list(probes)
    n_layers, n_heads, n_kv, n_ctx = bridge_shape(model)
    name = getattr(model, "rhlens_name", None) or str(getattr(model.cfg, "model_name", "model"))
    results: list[FamilyScores] = []
    if config.probe_families:
        check_probes(probes, n_ctx, config.detect.generation.max_new_tokens)
        if "query" in config.probe_families:
            for p in probes:  # every probe must have a findable question, before any compute
                question_span(p, tokenizer)
        records = _probe_records(model, tokenizer, probes, config, out, progress)
        ordered = [records[p.key] for p in probes]
        meta = [{k: r[k] for k in _META if k in r} for r in ordered]
        success = torch.tensor([bool(r["success"]) for r in ordered])
        for family in config.probe_families:
            per_probe = torch.tensor([r[family] for r in ordered], dtype=torch.float32)
            results.append(FamilyScores(per_probe=per_probe, success=success, model_name=name,
                                        n_kv_heads=n_kv, probes=meta, config=config, family=family))
    if config.detector_families:
        texts = repeated_sequences(tokenizer, n=config.n_sequences, length=config.sequence_length,
                                   seed=config.sequence_seed)
        found = detector_scores(model, texts, which=config.detector_families)
        for family in config.detector_families:
            per_seq = found[family]
            results.append(FamilyScores(
                per_probe=per_seq, success=torch.ones(per_seq.shape[0], dtype=torch.bool),
                model_name=name, n_kv_heads=n_kv, config=config, family=family,
                probes=[{"key": f"sequence-{i}", "text": t} for i, t in enumerate(texts)]))
    order = {f: i for i, f in enumerate(config.families)}
    results.sort(key=lambda f: order[f.family])
    return FamilySet(families=results, model_name=name, needle_set=needle_set,
                     layer_types=layer_types(model), config=config)


def _probe_records(model, tokenizer, probes: list[Probe], config: FamiliesConfig,
                   out: str | Path | None, progress: bool) -> dict[str, dict[str, Any]]:
    """One record per probe: the answer, success, and each probe family's ``[layer, head]``,
    on the one resumable loop (:class:`rhlens.distributed.Sweep`; split across the ranks of a
    ``torchrun`` launch)."""
    detect = config.detect
    generation = detect.generation
    device = next(model.parameters()).device
    header = None if out is None else run_header(
        model, probes, config, kernel_policy=generation.kernel_policy(model))
    sweep = Sweep(out, header, FAMILIES_LOG, total=len(probes), desc="families", unit="probe",
                  weights={p.key: p.n_tokens for p in probes}, progress=progress, device=device)
    n_layers, n_heads, _, _ = bridge_shape(model)
    check_resumed(sweep.done, lambda rec: families_record_problem(rec, (n_layers, n_heads),
                                                                  tuple(config.probe_families)),
                  f"{out}/{FAMILIES_LOG}", "score-families record")
    # Probes of one length and haystack side by side, sorted by their tokens: each reuses the
    # longest prefix there is (as detection orders them; rhlens.distributed.prefix_order).
    todo = [p for p in probes if p.key not in sweep.done]
    groups = [(p.length, str(p.meta.get("haystack_sha256", p.meta.get("haystack", "")))) for p in todo]
    order = prefix_order([p.prompt_ids for p in todo], groups)
    todo, groups = [todo[i] for i in order], [groups[i] for i in order]
    wants_query = "query" in config.probe_families

    def forced(probe: Probe, answer: list[int] | None) -> dict[str, torch.Tensor]:
        return forced_scores(model, probe, answer_ids=answer, tokenizer=tokenizer,
                             query_span=config.query_span if wants_query else None,
                             mass_span=config.mass_span, prefill_chunk=generation.prefill_chunk)

    def record(probe: Probe, scores: dict[str, torch.Tensor], **answer: Any) -> dict[str, Any]:
        rec = {"key": probe.key, "length": probe.length, "depth": probe.depth,
               "needle_id": probe.needle_id, "n_tokens": probe.n_tokens, **probe.placement,
               "needle_span": list(probe.needle_span), **answer}
        if wants_query:
            rec["question_span"] = list(question_span(probe, tokenizer))
        rec.update({f: _grid(scores[f]) for f in config.probe_families})
        return rec

    keys = [p.key for p in todo]
    if config.answers == "reference":  # one forward per probe: each its own unit
        for unit in sweep.run(keys, [p.n_tokens for p in todo], [False] * len(todo)):
            for probe in (todo[i] for i in unit):
                t = time.perf_counter()
                answer = list(probe.prompt_ids[probe.needle_span[0]:probe.needle_span[1]])
                scores = forced(probe, answer)
                sweep.add(record(probe, scores, response=probe.real_needle, response_ids=answer,
                                 rouge_recall=1.0, success=True, stop_reason="reference",
                                 seconds=round(time.perf_counter() - t, 3)))
        return sweep.finish()

    # Buffers are sized by the probes, never by the flag alone (as detection does): a batch
    # holds at most the probes of one token count, so batch_size=10**12 allocates no 10**12 rows.
    most = max(Counter(len(p.prompt_ids) for p in todo).values(), default=1)
    if generation.batch_size > most:
        generation = dataclasses.replace(generation, batch_size=most)
    state = StepState()
    recorder = AnswerRecorder(n_layers, n_heads, generation.max_new_tokens, state, device,
                              max_batch=generation.batch_size)
    costs, links = engine_plan([p.prompt_ids for p in todo], max_new_tokens=generation.max_new_tokens,
                               batch_size=generation.batch_size, chunk=generation.chunk_for(device),
                               groups=groups, world=sweep.world, step_tokens=decode_step_tokens(device))
    for unit in sweep.run(keys, costs, links):
        batch = [todo[i] for i in unit]
        mass_spans = [probe_span(p, config.mass_span) for p in batch]

        def start(i: int, mass_spans=mass_spans) -> None:
            recorder.reset()
            recorder.begin(mass_spans[i])

        state.spread(sum(p.n_tokens for p in batch), generation.max_new_tokens, sweep.advance)
        gens = generate_many(model, tokenizer, [p.prompt_ids for p in batch], config=generation,
                             hooks=recorder.hooks(), state=state, on_start=start)
        t_last = time.perf_counter()
        try:
            for probe, gen in zip(batch, gens):
                row = gen.info.get("batch_row", 0)
                steps = gen.n_steps
                positions = recorder.positions(row)[:steps].cpu()
                generated = torch.tensor(gen.response_ids)
                prompt = torch.tensor(list(probe.prompt_ids))
                span = (int(probe.needle_span[0]), int(probe.needle_span[1]))
                scores = {"copy": copy_scores(positions, generated, prompt, span, "unique"),
                          "copy-paper": copy_scores(positions, generated, prompt, span, "paper"),
                          "mass": recorder.mass(row)[:steps].mean(0).cpu()}
                if wants_query:
                    scores["query"] = forced(probe, None)["query"]
                recall = rouge1_recall(probe.real_needle, gen.response)
                now = time.perf_counter()
                sweep.add(record(probe, scores, response=gen.response, response_ids=gen.response_ids,
                                 rouge_recall=recall, success=recall > detect.success_threshold,
                                 stop_reason=gen.stop_reason, seconds=round(now - t_last, 3)),
                          generation=gen)
                t_last = now
        finally:
            gens.close()
    return sweep.finish()


def needle_mass_scores(model, probes: Sequence[Probe], *, config: DetectConfig | None = None,
                       tokenizer=None, span: str = "answer",
                       answers: str = "model") -> Float[torch.Tensor, "layer head"]:
    """Each head's attention mass on the needle while the model answers: a ``[layer, head]`` grid.

    At every decode step of the model's greedy answer (the stopping token's step included),
    the softmax weight a head puts on the needle's answer span (``span="needle"``: the whole
    needle sentence), averaged over the steps, then over the probes answered correctly (ROUGE-1
    recall above ``config.success_threshold``), as retrieval scores are. With
    ``answers="reference"`` the needle's answer is teacher-forced instead and every probe
    counts. The one home of this score (the ``mass`` family of :func:`score_families`);
    rank its heads with :mod:`rhlens.stats`.

    Raises:
        ConfigError: no probe was answered correctly.
    """
    fconfig = FamiliesConfig(families=("mass",), detect=config or DetectConfig(),
                             answers=answers, mass_span=span)  # type: ignore[arg-type]
    return score_families(model, probes, config=fconfig, tokenizer=tokenizer)["mass"].mean
