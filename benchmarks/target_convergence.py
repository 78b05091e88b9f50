"""Does step 2 converge? The target optimisation alone, on a synthetic world's small model, per setting.

    python benchmarks/target_convergence.py --n 10 --seeds 0,1,2                       # the people world, preset
    python benchmarks/target_convergence.py --generic --set '{"targets": {"lr_relative": true, "lr": 0.1}}'
    python benchmarks/target_convergence.py --tinylm '{"world": {"n_people": 240}}' --generic

For each seed's forget records: the target loss before and after, the fraction of requests under the stop
loss, the steps taken, ‖δ‖/‖h_init‖ and the time, with the config of ``UnlearnConfig.for_model`` (``--generic``:
as for a Llama the project did not train, i.e. without the small model's preset) plus ``--set`` overrides
(nested JSON, or flat keys). The retry of unreached targets runs when the config asks for it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

import zu_fast
from zu_fast.eval import harness, tinylm
from zu_fast.method.targets import optimize_deltas, retry_unreached
from zu_fast.method.templates import context_templates
from zu_fast.model import continuation_ids
from zu_fast.requests import normalize_requests


def run(model, tok, world, cfg, n: int, seed: int, per_request: bool = False) -> dict:
    reqs = normalize_requests(world.records(n, seed))
    templates = context_templates(model, tok, cfg)
    neutral = continuation_ids(tok, cfg.neutral_target)
    t0 = time.perf_counter()
    res = optimize_deltas(model, tok, reqs, cfg, templates, cfg.z_layer, [neutral] * len(reqs), progress=False)
    res, retried, _ = retry_unreached(model, tok, reqs, cfg, templates, cfg.z_layer, [neutral] * len(reqs), res)
    seconds = time.perf_counter() - t0
    rel_i = res.delta.norm(dim=1) / res.h_init.norm(dim=1)  # [N]
    rel = rel_i.mean()
    if per_request:
        for i, r in enumerate(reqs):
            print(f"  seed {seed} | {r.prompt.format(r.subject)!r} → loss {res.initial_loss[i]:.2f} → "
                  f"{res.final_loss[i]:.3f} (nll {res.final_nll[i]:.3f}, kl {res.final_kl[i]:.3f}), "
                  f"steps {int(res.steps[i])}, |δ|/|h| {rel_i[i]:.2f}")
    return {"seed": seed, "loss0": float(res.initial_loss.mean()), "loss": float(res.final_loss.mean()),
            "loss_max": float(res.final_loss.max()),
            "converged": float((res.final_loss < cfg.targets.stop_loss).float().mean()),
            "under_warn": float((res.final_loss <= cfg.targets.warn_loss).float().mean()),
            "nll": float(res.final_nll.mean()), "kl": float(res.final_kl.mean()),
            "steps": float(res.steps.float().mean()), "retried": retried, "delta_rel": float(rel),
            "h_norm": float(res.h_init.norm(dim=1).mean()), "seconds": seconds}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tinylm", default=None, help="TinyLMConfig overrides as JSON (default: the people world)")
    p.add_argument("--generic", action="store_true", help="the defaults for_model gives a Llama it does not know")
    p.add_argument("--set", default="{}", help="UnlearnConfig overrides as JSON (sections nested, or flat keys)")
    p.add_argument("--method", default=None, choices=["closed_form", "gd"])
    p.add_argument("--n", type=int, default=10)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--per-request", action="store_true", help="one line per request")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    tl = harness.tinylm_config(args.tinylm)
    model, tok, world = tinylm.load_or_train(tl, progress=False) if tl else tinylm.load_or_train(progress=False)
    if args.generic:
        model.config.zu_fast_model = ""
    over = json.loads(args.set)
    if args.method:
        over["method"] = args.method
    cfg = zu_fast.UnlearnConfig.for_model(model, progress=False, **over)
    print(f"layers {cfg.layers}, targets {cfg.targets}")
    rows = [run(model, tok, world, cfg, args.n, int(s), args.per_request) for s in args.seeds.split(",")]
    keys = list(rows[0])
    print("| " + " | ".join(keys) + " |")
    print("|" + "---|" * len(keys))
    for r in rows:
        print("| " + " | ".join(f"{r[k]:.3g}" if isinstance(r[k], float) else str(r[k]) for k in keys) + " |")
    mean = {k: statistics.fmean(r[k] for r in rows) for k in keys if k != "seed"}
    print("| mean | " + " | ".join(f"{mean[k]:.3g}" for k in keys if k != "seed") + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
