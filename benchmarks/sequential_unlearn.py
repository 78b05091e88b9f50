"""Sequential unlearning vs one batch on the small model (issue 14): R rounds of K facts vs one edit of R·K.

    python benchmarks/sequential_unlearn.py --rounds 10 --per-round 10 --seeds 0 \
        --tinylm '{"steps": 800, "world": {"n_people": 240, "n_strangers": 120}}'

(100 records need a world of at least 200 people: the default world has 120. The model is trained
once and cached, as ``zu-fast eval --tinylm``.)

The statistics are collected once, on the unedited model, and re-used by every round: ``unlearn`` accepts
them on the edited model because its edit stack proves that the current weights are the base weights
plus known zu_fast edits (``zu_fast.stats.store.check_stats_for_model``). Each round regenerates its
context templates on the current (edited) model, as a user's later session would. Reported, on all R·K
facts at the end: Efficacy / Generalization / Specificity / PPL (``zu_fast.metrics.evaluate``),
the unlearning wall time (evaluation excluded), and, for the sequential run, the efficacy on the first
round's facts after every round (does a later edit undo an earlier one?). Both runs end with restore()
and check the weights bit for bit (sequential: the stack restored newest first).
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import torch

import zu_fast
from zu_fast import metrics
from zu_fast.eval import tinylm
from zu_fast.eval.harness import tinylm_config


def _weights(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same(model, w) -> bool:
    return all(torch.equal(v, w[k]) for k, v in model.state_dict().items())


def run(seed: int, rounds: int, per_round: int, method: str | None, tiny: str | None) -> dict:
    model, tok, world = tinylm.load_or_train(tinylm_config(tiny), progress=True)
    overrides = {"progress": False, **({"method": method} if method else {})}
    cfg = zu_fast.UnlearnConfig.for_model(model, **overrides)
    stats = zu_fast.collect_stats(model, tok, world.training_texts(), cfg)
    records = world.records(rounds * per_round, seed=seed)
    heldout = world.heldout_texts()
    ev = lambda recs: metrics.evaluate(model, tok, recs, heldout, neutral_target=cfg.neutral_target)  # noqa: E731
    base = _weights(model)
    before = ev(records)

    t0 = time.perf_counter()
    batch = zu_fast.unlearn(model, tok, records, cfg, stats=stats)
    t_batch = time.perf_counter() - t0
    after_batch = ev(records)
    batch.restore()
    assert _same(model, base), "batch restore not bit-exact"

    first = records[:per_round]
    seq_times, first_eff, stack = [], [], []
    for r in range(rounds):
        t0 = time.perf_counter()
        stack.append(zu_fast.unlearn(model, tok, records[r * per_round:(r + 1) * per_round], cfg, stats=stats))
        seq_times.append(time.perf_counter() - t0)
        first_eff.append(metrics.efficacy(model, tok, first))
    assert zu_fast.edits(model) == stack
    after_seq = ev(records)
    for e in reversed(stack):
        e.restore()
    assert _same(model, base), "sequential restore not bit-exact"
    return {"seed": seed, "method": cfg.method, "layers": cfg.layers, "n": len(records), "before": before,
            "batch": {**after_batch, "seconds": t_batch},
            "sequential": {**after_seq, "seconds": sum(seq_times), "round_seconds": seq_times,
                           "first_round_efficacy": first_eff}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--per-round", type=int, default=10)
    p.add_argument("--seeds", default="0")
    p.add_argument("--method", choices=["gd", "closed_form"], help="default: the small model's preset (GD)")
    p.add_argument("--tinylm", help="TinyLMConfig overrides as JSON (world nested), as zu-fast eval --tinylm")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 on a shared machine: less contention)")
    p.add_argument("--out", default="benchmarks/results/sequential_vs_batch.json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")  # flags are in the reports; the table is what this prints
    rows = [run(int(s), args.rounds, args.per_round, args.method, args.tinylm) for s in args.seeds.split(",")]
    print("| seed | run | Eff | Gen | Spe | PPL | unlearn time (s) |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        for name in ("before", "batch", "sequential"):
            m = row[name]
            t = f"{m['seconds']:.1f}" if "seconds" in m else "-"
            label = {"before": "before", "batch": f"1 × {row['n']}",
                     "sequential": f"{args.rounds} × {args.per_round}"}[name]
            print(f"| {row['seed']} | {label} | {m['efficacy']:.1f} | {m['generalization']:.1f} | "
                  f"{m['specificity']:.1f} | {m['perplexity']:.3f} | {t} |")
        print(f"first round's efficacy after each round (seed {row['seed']}): "
              + ", ".join(f"{x:.0f}" for x in row["sequential"]["first_round_efficacy"]))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"rounds": args.rounds, "per_round": args.per_round,
                                          "tinylm": args.tinylm, "runs": rows}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
