"""Experiment (issue 22): forget keys read in the other requests' phrasings of each subject.

The species world's paraphrases are not forgotten because a subject's key at its last token moves with the phrase
before it (``benchmarks/key_similarity.py``). This script tries the mechanism the design notes name: each request
also gets its subject read in up to ``--contexts`` other requests' prompts (bare, no context template), each an
extra column of K_f carrying the request's own residual. It is not in the package: the dense layer strategy is
subclassed here and swapped in for the run, and the results are compared with the plain defaults.

    OMP_NUM_THREADS=1 python benchmarks/cross_context_keys.py --world species --contexts 4 --seeds 0-3
    OMP_NUM_THREADS=1 python benchmarks/cross_context_keys.py --world people --generic --contexts 4 --seeds 0-3
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import time
import warnings

import torch

import zu_fast
from zu_fast import metrics
from zu_fast.eval import tinylm, worlds
from zu_fast.method.components import ComponentProblem, DenseLayers
from zu_fast.method.keys import read_at_subject
from zu_fast.requests import normalize_requests

unlearn_module = importlib.import_module("zu_fast.method.unlearn")


def cross_context_layers(contexts: int) -> type[DenseLayers]:
    class CrossContextLayers(DenseLayers):
        """Dense layers whose forget keys also come from other requests' phrasings of each subject."""

        def read(self, model, tok, requests, cfg, templates, targets):
            base = read_at_subject(model, tok, requests, cfg, templates, targets)
            phrasings = list(dict.fromkeys(r.prompt for r in requests))
            extra, rows = [], []
            for i, r in enumerate(requests):
                for p in [p for p in phrasings if p != r.prompt][:contexts]:
                    extra.append({"prompt": p, "subject": r.subject, "target_true": r.target_true})
                    rows.append(i)
            base.extra_keys = base.extra_rows = None
            if extra:
                more = read_at_subject(model, tok, normalize_requests(extra), cfg, [["{}"]], targets)
                base.extra_keys, base.extra_rows = more.keys, torch.tensor(rows)
            return base

        def problems(self, t, readings, resid, stats, *, bias_in_r):
            (p,) = super().problems(t, readings, resid, stats, bias_in_r=bias_in_r)
            if readings.extra_keys is None:
                return [p]
            K_extra = readings.extra_keys[t.layer].t().to(p.K.device, p.K.dtype)  # [d_in, N·C]
            rows = readings.extra_rows  # [N·C] the request of each extra column
            K = torch.cat([p.K, K_extra], 1)  # [d_in, N + N·C]
            R = torch.cat([p.R, p.R[:, rows]], 1)  # [d, N + N·C] the request's residual, in every context
            return [ComponentProblem(p.key, p.target, K, R, 1.0, torch.cat([p.rows, rows]), torch.ones(K.shape[1]),
                                     p.report)]

    return CrossContextLayers


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world", default="species")
    p.add_argument("--generic", action="store_true", help="remove the small model's tag (untuned defaults)")
    p.add_argument("--contexts", type=int, default=4)
    p.add_argument("--n", type=int, default=10)
    p.add_argument("--seeds", default="0-3")
    args = p.parse_args(argv)
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    a, _, b = args.seeds.partition("-")
    seeds = range(int(a), int(b or a) + 1)
    model, tok, world = tinylm.load_or_train(worlds.tinylm_config(args.world), progress=False)
    if args.generic:
        model.config.zu_fast_model = ""
    model.eval()
    stats = zu_fast.collect_stats(model, tok, world.training_texts(), zu_fast.UnlearnConfig.for_model(model))
    print("| world | keys | method | Eff | Gen | Spe | PPL / base | edit s |\n|---|---|---|---:|---:|---:|---:|---:|")
    for variant, strategy in (("plain", DenseLayers), (f"+ {args.contexts} other phrasings",
                                                       cross_context_layers(args.contexts))):
        unlearn_module.DenseLayers = strategy
        try:
            for method in ("gd", "closed_form"):
                runs = []
                for seed in seeds:
                    records = world.records(args.n, seed)
                    base = metrics.evaluate(model, tok, records, world.heldout_texts())
                    cfg = zu_fast.UnlearnConfig.for_model(model, progress=False, method=method)
                    t0 = time.perf_counter()
                    edit = zu_fast.unlearn(model, tok, records, cfg, stats=stats)
                    seconds = time.perf_counter() - t0
                    after = metrics.evaluate(model, tok, records, world.heldout_texts())
                    edit.restore()
                    runs.append((after["efficacy"], after["generalization"], after["specificity"],
                                 after["perplexity"] / base["perplexity"], seconds))
                m = [statistics.fmean(r[k] for r in runs) for k in range(5)]
                print(f"| {args.world} | {variant} | {method} | {m[0]:.1f} | {m[1]:.1f} | {m[2]:.1f} | {m[3]:.3f} | "
                      f"{m[4]:.1f} |", flush=True)
        finally:
            unlearn_module.DenseLayers = DenseLayers
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
