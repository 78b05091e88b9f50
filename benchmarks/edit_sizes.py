"""How large are good edits? ‖ΔW‖/‖W‖ per edited layer and the gap closed, on the project's small model.

    OMP_NUM_THREADS=1 python benchmarks/edit_sizes.py --n 10,50 --seeds 0,1,2,3 --methods closed_form,gd

For every (method, n, seed): unlearn ``world.records(n, seed)`` on the trained small model (zu_fast.eval.tinylm,
the preset ``for_model`` picks), record each layer's ``rel_weight_change`` and the run's ``z_gap_closed`` and
Efficacy / Specificity (zu_fast.metrics), restore. Prints a markdown table and the largest change, in units of
``max_rel_weight_change``: the measurement behind ``safety.hard_limit_multiple`` (issue 26). Every edit is
made with ``allow_large_change=True`` so that nothing is refused while measuring.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings

import torch

import zu_fast
from zu_fast import metrics
from zu_fast.eval import tinylm


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", default="10,50")
    p.add_argument("--seeds", default="0,1,2,3")
    p.add_argument("--methods", default="closed_form,gd")
    p.add_argument("--json", help="write the rows here")
    args = p.parse_args(argv)
    model, tok, world = tinylm.load_or_train(progress=False)
    base = zu_fast.UnlearnConfig.for_model(model, progress=False, allow_large_change=True)
    stats = zu_fast.collect_stats(model, tok, world.training_texts(), base)
    heldout = world.heldout_texts()
    rows = []
    for method in args.methods.split(","):
        cfg = base.replace(method=method)
        for n in [int(x) for x in args.n.split(",")]:
            for seed in [int(x) for x in args.seeds.split(",")]:
                records = world.records(n, seed)
                t0 = time.perf_counter()
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    edit = zu_fast.unlearn(model, tok, records, cfg, stats=stats)
                seconds = time.perf_counter() - t0
                res = metrics.evaluate(model, tok, records, heldout, neutral_target=cfg.neutral_target)
                changes = [r["rel_weight_change"] for r in edit.report.layers.values()]
                rows.append({"method": method, "n": n, "seed": seed, "rel_weight_change": changes,
                             "max_change": max(changes), "z_gap_closed": edit.report.targets.get("z_gap_closed"),
                             "flags": sorted({f["kind"] for f in edit.report.flags}),
                             "efficacy": res["efficacy"], "specificity": res["specificity"],
                             "seconds": round(seconds, 2)})
                edit.restore()
                r = rows[-1]
                print(f"{method} n={n} seed={seed}: max ‖ΔW‖/‖W‖ {r['max_change']:.3f} gap {r['z_gap_closed']:.3f} "
                      f"Eff {r['efficacy']:.1f} Spe {r['specificity']:.1f} flags {r['flags']}", flush=True)
    limit = base.safety.max_rel_weight_change
    print()
    print(f"| method | n | seeds | ‖ΔW‖/‖W‖ per layer: median | max | max / max_rel_weight_change ({limit:g}) | "
          "gap closed (min–max) | Eff | Spe |")
    print("|---|---:|---:|---:|---:|---:|---|---:|---:|")
    for method in args.methods.split(","):
        for n in [int(x) for x in args.n.split(",")]:
            rs = [r for r in rows if r["method"] == method and r["n"] == n]
            allc = sorted(c for r in rs for c in r["rel_weight_change"])
            gaps = [r["z_gap_closed"] for r in rs]
            print(f"| {method} | {n} | {len(rs)} | {allc[len(allc) // 2]:.3f} | {max(allc):.3f} | "
                  f"{max(allc) / limit:.2f} | {min(gaps):.2f}–{max(gaps):.2f} | "
                  f"{sum(r['efficacy'] for r in rs) / len(rs):.1f} | "
                  f"{sum(r['specificity'] for r in rs) / len(rs):.1f} |")
    print(f"\nlargest good-edit change: {max(r['max_change'] for r in rows):.3f} = "
          f"{max(r['max_change'] for r in rows) / limit:.2f} × max_rel_weight_change; torch threads "
          f"{torch.get_num_threads()}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
