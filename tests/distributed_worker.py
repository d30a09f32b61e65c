"""What the torchrun tests run in every rank (and the tests run in one process, to compare).

``python -m torch.distributed.run --standalone --nproc-per-node N tests/distributed_worker.py
WORKLOAD OUT [--die-after K]``: loads the toy model and runs WORKLOAD (``detect``: detection of
the toy probes; ``sweeps``: a NIAH sweep, a CoT run and head patching; ``both``: the two, into
OUT/detect and OUT/sweeps; ``reuse``: detection of a NIAH grid whose probes share a haystack;
``kv``: score families and a KV budget sweep)
with ``out=OUT``; rank 0 writes the outputs. ``--die-after K``:
rank 1 kills itself (SIGKILL) after logging K records.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS))

from toy import TOY_MODEL_DIR, VALUE_WORDS, make_toy_probe, sample_toy_words  # noqa: E402

CONFIG = {"max_new_tokens": 8, "batch_size": 3}


def toy_probes(tok) -> list:
    from rhlens.probe import Probe

    out = []
    for n in (20, 40, 60, 80, 100, 120):
        for seed in range(4):
            ids, span, answer = make_toy_probe(tok, n, seed)
            out.append(Probe(prompt_ids=ids, needle_span=span, real_needle=answer, length=n,
                             depth=seed * 25, needle_id="toy"))
    return out


REUSE_CONFIG = {"max_new_tokens": 8, "batch_size": 3, "prefill_chunk": 8}


def haystack_probes(tok) -> list:
    """A NIAH grid on the toy model: one filler haystack, 3 lengths x 5 depths x 2 needles of
    5 value words (equal token counts per length), so probes of one length share the haystack
    before their needles and the engine reuses it (in chunks of 8 tokens, REUSE_CONFIG)."""
    import random

    from rhlens.probe import Probe

    from toy import BOS, END, FILLER_WORDS, KEY, VALUE_WORDS

    rng = random.Random(27)
    hay = [rng.choice(FILLER_WORDS) for _ in range(120)]
    needles = {"n0": list(VALUE_WORDS[:5]), "n1": list(VALUE_WORDS[10:15])}
    out = []
    for n in (40, 80, 120):
        for name, values in needles.items():
            for depth in (0, 25, 50, 75, 100):
                at = round(n * depth / 100)
                words = [BOS, *hay[:at], KEY, *values, END, *hay[at:n], "ASK"]
                ids = [int(i) for i in tok.convert_tokens_to_ids(words)]
                out.append(Probe(prompt_ids=ids, needle_span=(at + 2, at + 7),
                                 real_needle=" ".join(values), length=n, depth=depth,
                                 needle_id=name, meta={"haystack": "toy-filler"}))
    return out


def reuse(model, tok, out) -> dict:
    """Detection of :func:`haystack_probes` into OUT (prefix reuse on)."""
    from rhlens import distributed
    from rhlens.retrieval import DetectConfig, detect_retrieval_heads
    from rhlens.runs import save_detection_run

    scores = detect_retrieval_heads(model, haystack_probes(tok), config=DetectConfig(**REUSE_CONFIG),
                                    out=out)
    if distributed.is_main():
        save_detection_run(out, scores, figures=False)
    return {"per_probe": scores.per_probe.tolist(), "probes": scores.probes}


def detect(model, tok, out) -> dict:
    from rhlens import distributed
    from rhlens.retrieval import DetectConfig, detect_retrieval_heads
    from rhlens.runs import save_detection_run

    scores = detect_retrieval_heads(model, toy_probes(tok), config=DetectConfig(**CONFIG), out=out)
    if distributed.is_main():
        save_detection_run(out, scores, figures=False)
    return {"per_probe": scores.per_probe.tolist(), "probes": scores.probes}


def sweeps(model, tok, out) -> dict:
    from rhlens.ablation import Mask
    from rhlens.cot import Question
    from rhlens.cot.experiment import CoTConfig, cot_ablation
    from rhlens.niah import NIAHConfig, niah_sweep
    from rhlens.patching import PatchConfig, make_pair, patch_heads

    probes = toy_probes(tok)[::3]
    niah = niah_sweep(model, probes, masks=[Mask.none(), Mask(((1, 2),), label="copy-head")],
                      config=NIAHConfig(max_new_tokens=8), out=out)
    items = []
    for i in range(4):
        import random

        words, _, values = sample_toy_words(random.Random(100 + i), 20 + 10 * i)
        text = " ".join(words[1:])
        items.append(Question(text, " ".join(values), id=f"toy-{i}", cot_prompt=text,
                              direct_prompt=text))
    cot = cot_ablation(model, items, masks=[(1, 2)], out=out,
                       config=CoTConfig(max_new_tokens_cot=8, max_new_tokens_direct=8,
                                        chat_template=False, n_boot=50))
    pairs = []
    for seed in range(3):
        ids, (s, e), _ = make_toy_probe(tok, 30, seed)
        values = ids[s:e]
        pool = [v for v in tok.convert_tokens_to_ids(list(VALUE_WORDS)) if v not in values]
        other = pool[seed % 5: seed % 5 + len(values)]
        pairs.append(make_pair(ids, ids[:s] + other + ids[e:], values, other,
                               labels={"key": f"toy-{seed}"}))
    patch = patch_heads(model, pairs, config=PatchConfig(), out=out)
    return {"niah": niah.records, "cot": cot.records, "effects": patch.effects.tolist()}


def no_folder(model, tok) -> dict:
    """Detection without ``out``: inside a launch the records are gathered, not written."""
    from rhlens.retrieval import DetectConfig, detect_retrieval_heads

    scores = detect_retrieval_heads(model, toy_probes(tok)[::4], config=DetectConfig(**CONFIG))
    return {"per_probe": scores.per_probe.tolist(), "probes": scores.probes}


def both(model, tok, out) -> dict:
    return {"detect": detect(model, tok, Path(out, "detect")),
            "sweeps": sweeps(model, tok, Path(out, "sweeps")), "no_folder": no_folder(model, tok)}


def kv(model, tok, out) -> dict:
    """Score families and a KV budget sweep (the analyses that joined the one loop last) into
    OUT/families and OUT/compress."""
    import torch

    from rhlens.compress import CompressConfig
    from rhlens.compress.sweep import compress_sweep
    from rhlens.families import FamiliesConfig, score_families
    from rhlens.niah import NIAHConfig
    from rhlens.retrieval import DetectConfig

    probes = toy_probes(tok)[::2]
    config = FamiliesConfig(families=("copy", "mass"), detect=DetectConfig().with_generation(**CONFIG))
    fs = score_families(model, probes, config=config, tokenizer=tok, out=Path(out, "families"))
    grid = torch.zeros(2, 4)
    grid[1, 2], grid[0, 3] = 1.0, 0.5
    sweep = compress_sweep(model, probes[::3], {"retrieval": grid}, budgets=(0.3,), seeds=1,
                           config=CompressConfig(sink=2, window=8),
                           niah=NIAHConfig().with_generation(max_new_tokens=8), tokenizer=tok,
                           out=Path(out, "compress"), progress=False)
    return {"families": {f.family: f.per_probe.tolist() for f in fs.families},
            "compress": sweep.niah.records}


WORKLOADS = {"detect": detect, "sweeps": sweeps, "both": both, "reuse": reuse, "kv": kv}


def main(argv: list[str]) -> int:
    import torch

    from rhlens import distributed
    from rhlens.models import load_model

    torch.set_num_threads(1)
    workload, out = argv[0], argv[1]
    if "--die-after" in argv and os.environ.get("RANK") == "1":
        from rhlens.io import ShardLog

        left = [int(argv[argv.index("--die-after") + 1])]
        append = ShardLog.append

        def append_then_die(self, record):
            append(self, record)
            left[0] -= 1
            if left[0] <= 0:
                os.kill(os.getpid(), signal.SIGKILL)

        ShardLog.append = append_then_die
    model, tok = load_model(str(TOY_MODEL_DIR), device="cpu")
    result = WORKLOADS[workload](model, tok, out)
    if distributed.is_main():
        Path(out).mkdir(parents=True, exist_ok=True)
        Path(out, f"{workload}_result.json").write_text(json.dumps(result))
    distributed.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
