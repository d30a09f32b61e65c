"""Sharded detection on several GPUs (issues 16 and 19): torchrun overhead, scaling, a split model.

One command runs everything the visible GPUs allow and writes one JSON file:

    python benchmarks/bench_distributed.py --out benchmarks/results/h200-distributed.json

* **(a) overhead**: the same grid detected by a plain process and by ``torchrun
  --nproc-per-node 1`` (the sharded path: shard log, work queue, merge), wall time of the
  ``detect_retrieval_heads`` call in each (target: <= 1.02x);
* **(b) scaling**: ``torchrun --nproc-per-node N`` for N = 1, 2, 4, 8 (as many as there are
  GPUs): wall time, speedup over N = 1, per-probe scores and answers identical to N = 1's
  (and to the plain run's), each rank's busy time against the mean (target: within 10%), the
  prefill tokens all ranks computed and reused against N = 1's (issue 27: within 3%);
  ``--base EARLIER.json`` takes N = 1 from an earlier output, so that each N can be its own
  command (the paper-shaped grid, 1K-64K x 10 depths: ``--lengths-to 65536``);
* **(c) split**: one probe of ``--split-length`` tokens (default 131,072) on a model spread
  over 2 GPUs by an accelerate device map (the layers balanced over ``cuda:0`` and ``cuda:1``)
  against the same weights on one GPU: the same generated tokens and per-head scores, time
  per probe of each (needs 2 GPUs).

The model is a randomly initialised Llama-3-8B-shaped model in bf16 and the probes are random
token ids sharing one haystack (``benchmarks/bench_detect.py``'s ``random_model`` /
``random_probes``): ``--lengths-from 1024 --lengths-to 32768 --n-lengths 20 --depths 10`` is
200 probes, 32 new tokens each (no EOS, no newline stop), the detection defaults otherwise
(8 probes a batch). Issue 19's grid goes to 65,536 tokens (``--lengths-to 65536``); the default
stops at 32,768 to keep (a) + (b) for N = 1, 2 within about 8 minutes of GPU time (three runs
of the grid: plain, N = 1, N = 2, each after loading the model and a warm-up).

Each run is a subprocess (``--worker grid`` / ``--worker split``, under torchrun or not) that
writes its own JSON; the driver collects them. On a CPU, ``--shape tiny --device cpu --ns 1,2
--lengths-to 2048 --n-lengths 4 --depths 3`` runs the same code with gloo.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch
from bench_detect import SHAPES, _NoEos, machine, random_model, random_probes

HERE = Path(__file__).resolve()


# ---------------------------------------------------------------------------------------
# Workers (one process; under torchrun, one per rank)
# ---------------------------------------------------------------------------------------
def _grid(args) -> tuple[list[int], list[float]]:
    n = args.n_lengths
    lengths = [round(args.lengths_from + (args.lengths_to - args.lengths_from) * i / max(1, n - 1))
               for i in range(n)]
    depths = [round(100 * i / max(1, args.depths - 1), 1) for i in range(args.depths)]
    return lengths, depths


def _config(args):
    from rhlens.engine import KernelPolicy
    from rhlens.retrieval import DetectConfig

    policy = KernelPolicy(decode=args.decode) if args.decode else None
    return DetectConfig(max_new_tokens=args.new_tokens, stop_at_newline=False,
                        batch_size=args.batch_size, policy=policy)


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _digest(scores) -> dict:
    """What must be identical between runs: every probe's per-head scores and answer."""
    import hashlib

    h = hashlib.sha256(scores.per_probe.numpy().tobytes())
    for p in scores.probes:
        h.update(json.dumps([p["key"], p["response_ids"]]).encode())
    return {"sha256": h.hexdigest(), "probes": scores.n_probes}


def worker_grid(args) -> dict:
    """The grid detected into ``args.run_dir``, in this process or this launch."""
    from rhlens import distributed
    from rhlens.retrieval import detect_retrieval_heads
    from rhlens.runs import save_detection_run

    group = distributed.current_group()
    rank = group.rank if group else 0
    device = args.device or (f"cuda:{group.local_rank if group else 0}"
                             if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    lengths, depths = _grid(args)
    t0 = time.perf_counter()
    model, tok = random_model(args.shape, dtype, device, max(lengths) + args.new_tokens + 8)
    tok = _NoEos(tok)
    probes = random_probes(tok, SHAPES[args.shape][5], lengths, depths)
    load_s = time.perf_counter() - t0
    # warm-up: kernels and allocator, outside the timed call (no folder, no sharding)
    warm = random_probes(tok, SHAPES[args.shape][5], [min(lengths)], [0.0, 100.0], seed=1)
    detect_retrieval_heads(model, warm, config=_config(args), tokenizer=tok)
    if group is not None:
        group.barrier()
    _sync()
    t0 = time.perf_counter()
    scores = detect_retrieval_heads(model, probes, config=_config(args), tokenizer=tok,
                                    out=args.run_dir)
    _sync()
    wall = time.perf_counter() - t0
    out = {"rank": rank, "world": group.world if group else 0, "device": device,
           "probes": len(probes), "lengths": lengths, "depths": depths,
           "load_s": round(load_s, 1), "wall_s": round(wall, 3), "digest": _digest(scores)}
    if rank == 0:
        save_detection_run(args.run_dir, scores, figures=False)
        head = Path(args.run_dir, "head_scores.json")
        out["head_scores_sha256"] = (__import__("hashlib").sha256(head.read_bytes()).hexdigest()
                                     if head.exists() else None)
        run = json.loads(Path(args.run_dir, "run.json").read_text())
        launches = run.get("launches", [])
        if launches:
            ranks = launches[-1]["ranks"]
            busy = [r["busy_s"] for r in ranks]
            mean = statistics.mean(busy)
            out["ranks"] = ranks
            out["total"] = launches[-1].get("total")
            out["busy_max_dev"] = round(max(abs(b - mean) for b in busy) / mean, 4) if mean else None
    if group is not None:
        distributed.shutdown()
    return out


def _init_weights(hf, seed: int) -> None:
    """Fill every weight from a generator seeded by its name's index, on its own device: the
    same numbers wherever the layer sits (one GPU or spread over two)."""
    with torch.no_grad():
        for i, (name, p) in enumerate(hf.named_parameters()):
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                g = torch.Generator(device=p.device).manual_seed(seed + i)
                p.normal_(0.0, 0.02, generator=g)


def _placed_model(args, device_map: dict, dtype, hooks: bool = False):
    """The Llama-shaped model, built empty, placed by ``device_map``, then filled; dispatched
    (accelerate's hooks) when the map names several devices, or when ``hooks``."""
    from accelerate import dispatch_model, init_empty_weights
    from bench_detect import word_tokenizer
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import AutoModelForCausalLM, LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    hidden, inter, layers, heads, kv, vocab, theta = SHAPES[args.shape]
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv, vocab_size=vocab,
                      rope_theta=theta, max_position_embeddings=args.split_length + 64,
                      bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    cfg.architectures = ["LlamaForCausalLM"]
    with init_empty_weights():
        hf = AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation="sdpa")
    for name, dev in device_map.items():
        hf.get_submodule(name).to_empty(device=dev)
    # the rotary embedding's one buffer is computed at construction: make it again, in place
    rotary = device_map.get("model.rotary_emb", device_map["model.embed_tokens"])
    hf.model.rotary_emb = LlamaRotaryEmbedding(cfg).to(rotary)
    _init_weights(hf, seed=0)
    hf.eval()
    if hooks or len(set(device_map.values())) > 1:
        hf = dispatch_model(hf, device_map, force_hooks=hooks)
    tok = word_tokenizer(vocab)
    bridge = TransformerBridge.boot_transformers(f"random-{args.shape}", hf_model=hf, tokenizer=tok)
    bridge.eval()
    bridge.rhlens_name = f"random-{args.shape}"
    return bridge, tok


def worker_split(args) -> dict:
    """One long probe on one GPU, then on the same weights spread over two."""
    from accelerate import infer_auto_device_map, init_empty_weights
    from transformers import AutoModelForCausalLM, LlamaConfig

    from rhlens.engine.lean import lean_ok
    from rhlens.retrieval import detect_retrieval_heads

    dtype = torch.bfloat16
    hidden, inter, layers, heads, kv, vocab, theta = SHAPES[args.shape]
    names = (["model.embed_tokens", "model.rotary_emb"]
             + [f"model.layers.{i}" for i in range(layers)] + ["model.norm", "lm_head"])
    one = {n: "cuda:0" for n in names}
    # two devices: HF's planner on an empty model, half of the weights' bytes on each
    with init_empty_weights():
        empty = AutoModelForCausalLM.from_config(LlamaConfig(
            hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
            num_attention_heads=heads, num_key_value_heads=kv, vocab_size=vocab,
            tie_word_embeddings=False), dtype=dtype)
    half = int(sum(p.numel() * p.element_size() for p in empty.parameters()) * 0.55)
    planned = infer_auto_device_map(empty, max_memory={0: half, 1: half},
                                    no_split_module_classes=["LlamaDecoderLayer"], dtype=dtype)
    two = {n: f"cuda:{d}" if isinstance(d, int) else d for n, d in planned.items()}
    out: dict = {"length": args.split_length, "placement": {
        str(d): sum(1 for v in two.values() if v == d) for d in sorted(set(two.values()))}}
    results = {}
    for label, device_map in (("one_gpu", one), ("two_gpus", two)):
        model, tok = _placed_model(args, device_map, dtype)
        tok = _NoEos(tok)
        probe = random_probes(tok, vocab, [args.split_length], [50.0])[0]
        warm = random_probes(tok, vocab, [2048], [50.0], seed=1)
        detect_retrieval_heads(model, warm, config=_config(args), tokenizer=tok)
        times = []
        for _ in range(args.repeats):
            _sync()
            t0 = time.perf_counter()
            scores = detect_retrieval_heads(model, [probe], config=_config(args), tokenizer=tok)
            _sync()
            times.append(time.perf_counter() - t0)
        results[label] = scores
        out[label] = {"seconds": round(statistics.median(times), 3),
                      "all": [round(t, 3) for t in times], "lean_step": lean_ok(model),
                      "devices": sorted({str(p.device) for p in model.parameters()}),
                      "peak_gib": [round(torch.cuda.max_memory_allocated(i) / 2**30, 1)
                                   for i in range(torch.cuda.device_count())]}
        del model
        torch.cuda.empty_cache()
        for i in range(torch.cuda.device_count()):
            torch.cuda.reset_peak_memory_stats(i)
    a, b = results["one_gpu"], results["two_gpus"]
    out["same_tokens"] = a.probes[0]["response_ids"] == b.probes[0]["response_ids"]
    out["same_scores"] = bool(torch.equal(a.per_probe, b.per_probe))
    out["ratio"] = round(out["two_gpus"]["seconds"] / out["one_gpu"]["seconds"], 3)
    return out


# ---------------------------------------------------------------------------------------
# The driver
# ---------------------------------------------------------------------------------------
def _launch(args, n: int, worker: str, work: Path, tag: str) -> dict:
    """Run one worker: plainly (``n`` = 0) or under torchrun with ``n`` processes."""
    result = work / f"{tag}.json"
    run_dir = work / tag
    cmd = [str(HERE), "--worker", worker, "--worker-out", str(result), "--run-dir", str(run_dir),
           *args.passthrough]
    cmd = ([sys.executable, *cmd] if n == 0 else
           [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
            str(n), *cmd])
    print(f"# {tag}: {' '.join(cmd[1:])}", flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, text=True, capture_output=True,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(
                              [str(HERE.parents[1]), *filter(None, [os.environ.get("PYTHONPATH")])])})
    if proc.returncode != 0:
        print(proc.stderr[-4000:], file=sys.stderr)
        return {"error": f"exit {proc.returncode}", "stderr": proc.stderr[-2000:]}
    out = json.loads(result.read_text())
    out["process_wall_s"] = round(time.perf_counter() - t0, 1)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", default="a,b,c", help="which parts: a (overhead), b (scaling), c (split)")
    ap.add_argument("--ns", default="1,2,4,8", help="process counts for (b), those <= the GPUs run")
    ap.add_argument("--shape", default="llama3-8b", choices=sorted(SHAPES))
    ap.add_argument("--device", default=None, help="workers' device (default: cuda:LOCAL_RANK)")
    ap.add_argument("--lengths-from", type=int, default=1024)
    ap.add_argument("--lengths-to", type=int, default=32768)
    ap.add_argument("--n-lengths", type=int, default=20)
    ap.add_argument("--depths", type=int, default=10)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--split-length", type=int, default=131072)
    ap.add_argument("--repeats", type=int, default=2, help="(c): timed runs of each placement")
    ap.add_argument("--decode", choices=("captured", "lean", "bridge"), default=None,
                    help="the decode step (default: the device's; a split model takes the lean "
                         "step, so (c) compares like with like under --decode lean)")
    ap.add_argument("--base", default=None, help="an earlier output whose torchrun-1 run is the "
                    "baseline of (b) (run N = 1 and N = 2,4,8 as separate commands)")
    ap.add_argument("--work", default=None, help="folder for the runs (default: a temporary one)")
    ap.add_argument("--out", default="bench_distributed.json")
    ap.add_argument("--worker", choices=("grid", "split"), help=argparse.SUPPRESS)
    ap.add_argument("--worker-out", help=argparse.SUPPRESS)
    ap.add_argument("--run-dir", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        result = worker_grid(args) if args.worker == "grid" else worker_split(args)
        if result.get("rank", 0) == 0:
            Path(args.worker_out).write_text(json.dumps(result, indent=1, default=str))
        return 0
    keep = ("shape", "device", "lengths_from", "lengths_to", "n_lengths", "depths", "new_tokens",
            "batch_size", "split_length", "repeats", "decode")
    args.passthrough = [x for k in keep if getattr(args, k) is not None
                        for x in (f"--{k.replace('_', '-')}", str(getattr(args, k)))]
    parts = set(args.parts.split(","))
    gpus = torch.cuda.device_count() if args.device in (None, "cuda") else 8
    ns = [n for n in (int(x) for x in args.ns.split(",")) if n <= max(gpus, 1)]
    work = Path(args.work or tempfile.mkdtemp(prefix="rhlens-bench-dist-"))
    work.mkdir(parents=True, exist_ok=True)
    res: dict = {"machine": machine(), "gpus": gpus, "args": {k: getattr(args, k) for k in keep},
                 "grid": dict(zip(("lengths", "depths"), _grid(args)))}
    out_path = Path(args.out)

    def save() -> None:
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(res, indent=1, default=str))

    runs: dict = {}
    if parts & {"a", "b"}:
        if "a" in parts:
            runs["plain"] = _launch(args, 0, "grid", work, "plain")
            save()
        for n in ns if "b" in parts else [1]:
            runs[f"torchrun-{n}"] = _launch(args, n, "grid", work, f"torchrun-{n}")
            res["runs"] = runs
            save()
        res["runs"] = runs
        base = runs.get("torchrun-1", {})
        if not base and args.base:
            base = json.loads(Path(args.base).read_text())["runs"]["torchrun-1"]
            res["base"] = args.base
        if "a" in parts and "wall_s" in base and "wall_s" in runs["plain"]:
            res["overhead"] = {"plain_s": runs["plain"]["wall_s"], "torchrun_1_s": base["wall_s"],
                               "ratio": round(base["wall_s"] / runs["plain"]["wall_s"], 4),
                               "same_results": base["digest"] == runs["plain"]["digest"]}
        if "b" in parts and "wall_s" in base:
            res["scaling"] = [{
                "n": int(tag.split("-")[1]), "wall_s": r["wall_s"],
                "speedup": round(base["wall_s"] / r["wall_s"], 3),
                "same_results_as_n1": r["digest"] == base["digest"],
                "same_head_scores_as_n1": r.get("head_scores_sha256") == base.get("head_scores_sha256"),
                "busy_max_dev": r.get("busy_max_dev"),
                # prefill tokens computed (and reused) by all ranks, against N = 1's
                "prefill_tokens": (r.get("total") or {}).get("prefill_tokens"),
                "reused_tokens": (r.get("total") or {}).get("reused_tokens"),
                "prefill_vs_n1": (round(r["total"]["prefill_tokens"] / base["total"]["prefill_tokens"], 4)
                                  if r.get("total") and base.get("total") else None)}
                for tag, r in runs.items() if tag.startswith("torchrun-") and "wall_s" in r]
        save()
    if "c" in parts:
        if gpus >= 2:
            res["split"] = _launch(args, 0, "split", work, "split")
        else:
            res["split"] = {"skipped": f"needs 2 GPUs, {gpus} visible"}
        save()
    print(json.dumps({k: res.get(k) for k in ("overhead", "scaling", "split")}, indent=1, default=str))
    print(f"wrote {out_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
