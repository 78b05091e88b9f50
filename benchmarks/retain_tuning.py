"""Issue 24's tuning runs on development seeds: one edit per line of a JSON spec, one JSON line of metrics out.

Each spec item: ``{"method": "gd" | "closed_form", "fact_token": "subject_last" | "last", "use_retain": bool,
"n": 10, "seed": 0, "extra": {flat config keys}, "proj": false, "per_rel": 2}``. The config is
``UnlearnConfig.for_model(model, method=..., fact_token=..., **extra)`` on the project's small model; the retain set
is the forgotten subjects' other facts in their first ``per_rel`` trained phrasings per relation, Subject-other is
measured on their held-out phrasings (``World.other_facts``), relearning is 20 AdamW steps on the forgotten
subjects' other facts (``eval.probes``; reported as the Efficacy after them). ``proj`` puts the closed form's
retain target through P (``closed_form.multiplier(retain_projected=True)``).

    OMP_NUM_THREADS=1 python benchmarks/retain_tuning.py '[{"method": "gd", "fact_token": "last", ...}]'
"""

from __future__ import annotations

import functools
import json
import sys
import time
import warnings

import torch

import zu_fast
import zu_fast.method.closed_form as closed_form
from zu_fast import metrics
from zu_fast.eval import probes, tinylm

warnings.filterwarnings("ignore")
torch.set_num_threads(1)
UNLEARN = sys.modules["zu_fast.method.unlearn"]  # the module (zu_fast.method.unlearn is also the function's name)

model, tok, world = tinylm.load_or_train(progress=False)
model.eval()
_stats: dict = {}


def stats_for(cfg):
    if tuple(cfg.layers) not in _stats:
        _stats[tuple(cfg.layers)] = zu_fast.collect_stats(model, tok, world.training_texts(), cfg)
    return _stats[tuple(cfg.layers)]


def run(method, fact_token, use_retain, n, seed, extra=None, proj=False, per_rel=2):
    extra = extra or {}
    UNLEARN.multiplier = functools.partial(closed_form.multiplier, retain_projected=proj)
    UNLEARN.narrow_multiplier = functools.partial(closed_form.narrow_multiplier, retain_projected=proj)
    records = world.records(n, seed)
    cfg = zu_fast.UnlearnConfig.for_model(model, progress=False, method=method, fact_token=fact_token, **extra)
    measured = [(f["text"], f["target"]) for r in records for f in world.other_facts(r, "heldout")]
    retain = [{"prompt": f["prompt"], "subject": f["subject"], "target_true": f["target"]}
              for r in records for f in world.other_facts(r, "train", per_rel)]
    t0 = time.time()
    edit = zu_fast.unlearn(model, tok, records, cfg, stats=stats_for(cfg), retain=retain if use_retain else None)
    t = time.time() - t0
    try:
        m = metrics.evaluate(model, tok, records, world.heldout_texts())
        so = metrics.recall(model, tok, measured)
        texts = {"same_subject": probes.relearn_texts(world, records, "same_subject")}
        rel20 = probes.relearn_probe(model, tok, records, texts, steps=(20,))["same_subject"][20]["efficacy"]
        rows = edit.report.layers.values()
        lev = [round(row.get("leverage_mean", float("nan")), 2) for row in rows]
        moved = [round(row.get("retain_output_change", float("nan")), 3) for row in rows]
    finally:
        edit.restore()
    return dict(method=method, ft=fact_token, retain=use_retain, n=n, seed=seed, eff=m["efficacy"],
                gen=m["generalization"], spe=m["specificity"], ppl=m["perplexity"], so=so, rel20=rel20,
                t=round(t, 1), gap=edit.report.targets.get("z_gap_closed"), lev=lev, rch=moved, extra=extra,
                proj=proj, per_rel=per_rel)


if __name__ == "__main__":
    for item in json.loads(sys.argv[1]):
        print(json.dumps(run(**item)), flush=True)
