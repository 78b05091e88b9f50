"""End-to-end timing: statistics + unlearning N facts on a random-initialised Llama-shaped model.

    python benchmarks/e2e_unlearn.py --shape llama-3.1-8b --n 100 --stats-overhead   # GPU (gpu_check.sh 5)
    python benchmarks/e2e_unlearn.py --shape tiny --n 10 --stats-overhead               # CPU smoke run

Prints a table of wall time and peak memory per phase and writes JSON (``--json``). The model is
random, so the quality numbers are meaningless here — this measures speed and memory only; the
quality benchmark is the synthetic-world small model (``zu-fast demo`` / ``zu-fast eval``).
``--stats-overhead`` first measures, on the same model, statistics against a plain truncated forward
over the same texts (``stats_overhead.py``; issue target ≤ 1.15×), so one model build serves both.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from random_llama import SHAPES, build  # a sibling script: run from benchmarks/ or with it on sys.path

import zu_fast


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="llama-3.2-1b", choices=sorted(SHAPES))
    p.add_argument("--n", type=int, default=100, help="facts to forget")
    p.add_argument("--texts", type=int, default=2000, help="corpus texts for the statistics")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    p.add_argument("--stats-overhead", action="store_true",
                   help="first measure statistics vs a truncated forward on the same model")
    p.add_argument("--overhead-texts", type=int, default=2000)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override an UnlearnConfig field (JSON value), e.g. original_representation='\"clean\"'")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    t0 = time.perf_counter()
    model, tok, world, layers = build(args.shape, device, dtype)
    t_build = time.perf_counter() - t0
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    overhead = None
    if args.stats_overhead:
        from stats_overhead import measure  # a sibling script: run from benchmarks/ or with it on sys.path

        overhead = measure(model, tok, (world.training_texts() * 4)[: args.overhead_texts], layers, device)
    overrides = {}
    for item in args.set:
        key, _, value = item.partition("=")
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value  # a bare string
    cfg = zu_fast.UnlearnConfig.for_model(model, layers=layers, progress=False, **overrides)
    corpus = world.training_texts()[: args.texts]
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t1 = time.perf_counter()
    stats = zu_fast.collect_stats(model, tok, corpus, cfg, cache=False)
    if device == "cuda":
        torch.cuda.synchronize()
    t_stats = time.perf_counter() - t1
    peak_stats = torch.cuda.max_memory_allocated() - weights if device == "cuda" else 0
    records = world.records(args.n, seed=0)
    t2 = time.perf_counter()
    edit = zu_fast.unlearn(model, tok, records, cfg, stats=stats)
    t_unlearn = time.perf_counter() - t2
    t3 = time.perf_counter()
    edit.restore()
    t_restore = time.perf_counter() - t3
    dev_name = torch.cuda.get_device_name(0) if device == "cuda" else "cpu"
    res = {
        "device": dev_name, "shape": args.shape, "dtype": args.dtype, "n_requests": args.n, "layers": layers,
        "overrides": overrides,
        "weights_gib": weights / 2**30, "stats_tokens": stats.meta["collection"]["tokens"],
        "seconds": {"build": t_build, "stats": t_stats, "unlearn": t_unlearn, "restore": t_restore,
                    **{f"unlearn.{k}": v for k, v in edit.report.timings.items()}},
        "peak_above_weights_gib": {"stats": peak_stats / 2**30,
                                   **{k: (v - weights) / 2**30 for k, v in edit.report.peak_memory_bytes.items()}},
        "targets": edit.report.targets,
        "stats_overhead": overhead,
        "update_backend": zu_fast.ops.choose("multiplicative_update_", device).name,
        "cov_backend": zu_fast.ops.choose("cov_accumulate", device).name,
    }
    print(f"\n{args.shape} ({res['weights_gib']:.2f} GiB {args.dtype}) on {dev_name}: unlearn {args.n} facts")
    print("| phase | seconds |\n|---|---:|")
    for k, v in res["seconds"].items():
        print(f"| {k} | {v:.3f} |")
    print("| peak memory above weights | GiB |\n|---|---:|")
    for k, v in res["peak_above_weights_gib"].items():
        print(f"| {k} | {v:.3f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
