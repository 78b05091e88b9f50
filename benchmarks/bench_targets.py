"""pytest-benchmark: the batched target optimisation (docs/algorithm.md, step 2) on the project's small model.

    pytest benchmarks/bench_targets.py --benchmark-only

The step that dominates every target-based method's time (closed form, GD, MEMIT, AlphaEdit) on
the small model: δ at the z layer for 50 forget records toward EOS, the preset's 50 Adam steps.
``buckets=1`` pads every prompt to the longest (one forward per step); ``buckets=4`` is the
default length bucketing. Converged requests leave the batch in both. Uses the cached small model
(trained and cached on first use, as ``zu-fast demo`` does).
"""

from __future__ import annotations

import pytest
import torch

import zu_fast
from zu_fast.eval import tinylm
from zu_fast.method.targets import optimize_deltas
from zu_fast.method.templates import context_templates
from zu_fast.model import continuation_ids
from zu_fast.requests import normalize_requests


@pytest.fixture(scope="module")
def problem():
    model, tok, world = tinylm.load_or_train(progress=False)
    cfg = zu_fast.UnlearnConfig.for_model(model, progress=False)
    reqs = normalize_requests(world.records(50, seed=0))
    templates = context_templates(model, tok, cfg)
    eos = [continuation_ids(tok, cfg.neutral_target)] * len(reqs)
    return model, tok, cfg, reqs, templates, eos


@pytest.mark.parametrize("buckets", [1, 4])
def test_targets(benchmark, problem, buckets):
    model, tok, cfg, reqs, templates, eos = problem
    cfg = cfg.replace(targets_length_buckets=buckets)
    res = benchmark.pedantic(lambda: optimize_deltas(model, tok, reqs, cfg, templates, cfg.z_layer, eos),
                             rounds=2, iterations=1, warmup_rounds=0)
    benchmark.extra_info.update({"steps_mean": float(res.steps.float().mean()),
                                 "converged": float((res.final_loss < cfg.targets.stop_loss).float().mean()),
                                 "threads": torch.get_num_threads()})
    assert torch.isfinite(res.delta).all()
