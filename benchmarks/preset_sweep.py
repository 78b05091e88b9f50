"""Config variants on the small model, seed by seed, against the acceptance bar — how presets are chosen.

    python benchmarks/preset_sweep.py --variants '[{"gd_null_energy": 0.005}, {"gd_null_energy": 0.01}]' \
        --seeds 0,1,2,3,4,5,6,7 --n 10
    python benchmarks/preset_sweep.py --variants '[{"gd_null_energy": 0.01}]' --seeds 0,1,2 --n 50 \
        --tinylm '{"steps": 3200, "world": {"n_people": 1000, "n_strangers": 500}}'

Each variant is a dict of UnlearnConfig overrides on top of the model's preset. The model is loaded
(or trained and cached) once; statistics are collected once per layer set. Per seed it prints
Efficacy/Generalization/Specificity and the PPL change, marks seeds that miss the acceptance bar
(``metrics.acceptance_failures``) with "x", counts the seeds that pass, and reports the wall time and
the GD solves' share of it (``gd_seconds`` summed over layers). Choose on some seeds,
confirm on others.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

import zu_fast
from zu_fast import metrics
from zu_fast.eval import tinylm
from zu_fast.eval.harness import tinylm_config


def failures(bar: str, before: dict, after: dict) -> list[str]:
    """What misses the bar (empty: met)."""
    if bar == "acceptance":
        return metrics.acceptance_failures(before, after)
    checks = [
        (after["efficacy"] <= 10, "efficacy"),
        (after["generalization"] <= 30, "generalization"),
        (after["specificity"] >= 0.75 * before["specificity"], "specificity"),
        (after["perplexity"] <= 1.10 * before["perplexity"], "perplexity"),
    ]
    return [name for ok, name in checks if not ok]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--variants", required=True, help="JSON list of UnlearnConfig override dicts")
    p.add_argument("--seeds", default="0,1,2,3,4,5,6,7", help="comma-separated record seeds")
    p.add_argument("--n", type=int, default=10, help="forget records per seed")
    p.add_argument("--tinylm", default=None, metavar="JSON", help="TinyLMConfig overrides (as in zu-fast eval)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--bar", default="acceptance", choices=["acceptance", "paper"],
                   help="acceptance: Spe within 5 points (issue 2); paper: Spe ≥ 0.75 × base (the paper's "
                        "Llama-3.1-8B retention), both with Eff ≤ 10, Gen ≤ 30, PPL ≤ 1.10 × base")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    variants = json.loads(args.variants)
    if not isinstance(variants, list) or not all(isinstance(v, dict) for v in variants):
        raise SystemExit("--variants must be a JSON list of objects")
    seeds = [int(s) for s in args.seeds.split(",")]
    mc = tinylm_config(args.tinylm)
    model, tok, world = tinylm.load_or_train(mc, progress=False) if mc else tinylm.load_or_train(progress=False)
    heldout = world.heldout_texts()
    records = {s: world.records(args.n, seed=s) for s in seeds}
    before = {s: metrics.evaluate(model, tok, records[s], heldout) for s in seeds}
    print("before:", " ".join(f"{s}:{b['efficacy']:.0f}/{b['generalization']:.0f}/{b['specificity']:.0f}"
                              f"/ppl {b['perplexity']:.3f}" for s, b in before.items()), flush=True)
    stats_by_layers: dict[tuple[int, ...], dict] = {}
    for v in variants:
        cfg = zu_fast.UnlearnConfig.for_model(model, progress=False, **v)
        key = tuple(cfg.layers)
        if key not in stats_by_layers:
            stats_by_layers[key] = zu_fast.collect_stats(model, tok, world.training_texts(), cfg)
        cells, passed, t0, gd_s = [], 0, time.perf_counter(), 0.0
        sums = dict.fromkeys(("efficacy", "generalization", "specificity", "perplexity"), 0.0)
        for s in seeds:
            edit = zu_fast.unlearn(model, tok, records[s], cfg, stats=stats_by_layers[key])
            gd_s += sum(row.get("gd_seconds", 0.0) for row in edit.report.layers.values())
            try:
                after = metrics.evaluate(model, tok, records[s], heldout)
            finally:
                edit.restore()
            ok = not failures(args.bar, before[s], after)
            for k in sums:
                sums[k] += after[k] / len(seeds)
            passed += ok
            dppl = 100 * (after["perplexity"] / before[s]["perplexity"] - 1)
            cells.append(f"{s}:{after['efficacy']:.0f}/{after['generalization']:.0f}/{after['specificity']:.0f}"
                         f"/{dppl:+.1f}%{'' if ok else 'x'}")
        print(f"{json.dumps(v)} pass {passed}/{len(seeds)} {' '.join(cells)} {time.perf_counter() - t0:.0f}s"
              f" (GD solves {gd_s / len(seeds):.2f} s per seed)", flush=True)
        print("    mean " + " / ".join(f"{k} {v:.2f}" for k, v in sums.items()), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
