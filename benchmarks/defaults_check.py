"""Do the defaults forget on a world? Per seed: Efficacy / Generalization / Specificity / PPL against the bars,
the targets' convergence and the gap closed, for the config ``UnlearnConfig.for_model`` gives.

    python benchmarks/defaults_check.py --world people --methods gd,closed_form --n 10 --seeds 0-15
    python benchmarks/defaults_check.py --world people --generic --set '{"targets": {"steps": 100}}'
    python benchmarks/defaults_check.py --tinylm '{"world": {"n_people": 240}}' --json out.json

``--world`` names a world of ``zu_fast.eval`` (its small model is trained and cached on first use);
``--generic`` treats the people world's model as a Llama the project does not know (no small-model preset).
Bars (issue 22): GD Eff ≤ 10, Gen ≤ 30, Spe ≥ base − 5, PPL ≤ 1.10 × base; the closed form the paper's bar
Eff ≤ 10, Gen ≤ 30, Spe ≥ 0.75 × base, PPL ≤ 1.10 × base. One row per (method, n, seed), then a summary: seeds
within the bar, means, converged fraction of the targets, time.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings

import torch

import zu_fast
from zu_fast import metrics
from zu_fast.eval import harness, tinylm


def _seeds(spec: str) -> list[int]:
    out: list[int] = []
    for part in spec.split(","):
        a, _, b = part.partition("-")
        out += list(range(int(a), int(b) + 1)) if b else [int(a)]
    return out


def within_bar(method: str, base: dict, after: dict) -> bool:
    spe_bar = base["specificity"] - 5 if method == "gd" else 0.75 * base["specificity"]
    return (after["efficacy"] <= 10 and after["generalization"] <= 30 and after["specificity"] >= spe_bar
            and after["perplexity"] <= 1.10 * base["perplexity"])


def load(args):
    tl = harness.tinylm_config(args.tinylm) if args.tinylm else None
    if args.world and args.world != "people":
        from zu_fast.eval import worlds

        tl = worlds.tinylm_config(args.world)
    model, tok, world = tinylm.load_or_train(tl, progress=False) if tl else tinylm.load_or_train(progress=False)
    if args.generic:
        model.config.zu_fast_model = ""
    return model.eval(), tok, world


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world", default="people")
    p.add_argument("--tinylm", default=None, help="TinyLMConfig overrides as JSON (the people world's generator)")
    p.add_argument("--generic", action="store_true")
    p.add_argument("--set", default="{}", help="UnlearnConfig overrides as JSON (sections nested, or flat keys)")
    p.add_argument("--methods", default="gd,closed_form")
    p.add_argument("--n", default="10")
    p.add_argument("--seeds", default="0-3")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    model, tok, world = load(args)
    over = json.loads(args.set)
    base_cfg = zu_fast.UnlearnConfig.for_model(model, progress=False, **over)
    stats = zu_fast.collect_stats(model, tok, world.training_texts(), base_cfg)
    print(f"# world {args.world}{' (generic)' if args.generic else ''}, layers {base_cfg.layers}, overrides {over}",
          flush=True)
    rows = []
    for n in [int(x) for x in args.n.split(",")]:
        for seed in _seeds(args.seeds):
            records = world.records(n, seed)
            base = metrics.evaluate(model, tok, records, world.heldout_texts())
            for method in args.methods.split(","):
                cfg = zu_fast.UnlearnConfig.for_model(model, progress=False, **{"method": method, **over})
                t0 = time.perf_counter()
                edit = zu_fast.unlearn(model, tok, records, cfg, stats=stats)
                seconds = time.perf_counter() - t0
                after = metrics.evaluate(model, tok, records, world.heldout_texts())
                rep = edit.report
                edit.restore()
                row = {"method": method, "n": n, "seed": seed, "eff": after["efficacy"],
                       "gen": after["generalization"], "spe": after["specificity"], "spe_base": base["specificity"],
                       "ppl": after["perplexity"], "ppl_base": base["perplexity"],
                       "converged": rep.targets.get("z_converged_frac"), "gap": rep.targets.get("z_gap_closed"),
                       "z_loss": rep.targets.get("z_loss_final"), "z_steps": rep.targets.get("z_steps_mean"),
                       "seconds": seconds, "flags": [f["kind"] for f in rep.flags],
                       "ok": within_bar(method, base, after)}
                rows.append(row)
                print(f"{method:11s} n={n:3d} seed={seed:3d} | Eff {row['eff']:5.1f} Gen {row['gen']:5.1f} "
                      f"Spe {row['spe']:5.1f} ({row['spe_base']:5.1f}) PPL {row['ppl']:.3f} ({row['ppl_base']:.3f}) "
                      f"| conv {row['converged']:.2f} gap {row['gap']:+.2f} zloss {row['z_loss']:.3f} "
                      f"steps {row['z_steps']:.0f} | {seconds:5.1f}s | {'ok' if row['ok'] else 'MISS'} "
                      f"{','.join(sorted(set(row['flags'])))}", flush=True)
    print("\n| method | n | seeds in bar | Eff | Gen | Spe (base) | PPL (base) | converged | gap | time (s) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for method in args.methods.split(","):
        for n in [int(x) for x in args.n.split(",")]:
            rs = [r for r in rows if r["method"] == method and r["n"] == n]
            m = {k: statistics.fmean(r[k] for r in rs) for k in ("eff", "gen", "spe", "spe_base", "ppl", "ppl_base",
                                                                   "converged", "gap", "seconds")}
            print(f"| {method} | {n} | {sum(r['ok'] for r in rs)}/{len(rs)} | {m['eff']:.1f} | {m['gen']:.1f} | "
                  f"{m['spe']:.1f} ({m['spe_base']:.1f}) | {m['ppl']:.3f} ({m['ppl_base']:.3f}) | "
                  f"{m['converged']:.2f} | {m['gap']:+.2f} | {m['seconds']:.1f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"argv": sys.argv, "overrides": over, "layers": base_cfg.layers, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
