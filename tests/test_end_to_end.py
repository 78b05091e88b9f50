"""The acceptance test of the core: forget 10 facts of the project's own small model.

Efficacy ≤ 10% (from ≥ 90%), Generalization ≤ 30%, Specificity within 5 points, PPL within 10%,
and restore() bit-identical. Trains the small model on first use (cached), so it is marked slow;
CI runs it.
"""

from __future__ import annotations

import pytest
import torch

import zu_fast
from zu_fast.eval import metrics, tinylm


@pytest.fixture(scope="module")
def small_model():
    model, tok, world = tinylm.load_or_train(progress=False)
    return model, tok, world


@pytest.mark.slow
def test_unlearn_ten_facts_on_the_small_model(small_model):
    model, tok, world = small_model
    records = world.records(10, seed=0)
    heldout = world.heldout_texts()
    cfg = zu_fast.UnlearnConfig.for_model(model, progress=False)
    stats = zu_fast.collect_stats(model, tok, world.training_texts(), cfg)
    before = metrics.evaluate(model, tok, records, heldout)
    snapshot = {k: v.clone() for k, v in model.state_dict().items()}
    edit = zu_fast.unlearn(model, tok, records, cfg, stats=stats)
    after = metrics.evaluate(model, tok, records, heldout)
    print(metrics.format_table(before, after))
    print(edit.report)
    assert before["efficacy"] >= 90
    assert after["efficacy"] <= 10
    assert after["generalization"] <= 30
    assert after["specificity"] >= before["specificity"] - 5
    assert after["perplexity"] <= 1.10 * before["perplexity"]
    edit.restore()
    assert all(torch.equal(v, snapshot[k]) for k, v in model.state_dict().items())
