"""Forget 10 facts of the project's own small model (trains it on first use, cached; CI runs it).

The small model's preset is the GD variant (see ``zu_fast.config.preset_for``); the closed form runs
with the same preset but ``method="closed_form"``. Two kinds of test:
- for both: only the edited weights change, a real edit that forgets something, restore()
  bit-identical; for the preset also the model not wrecked (specificity within 10 points, PPL
  within 10%);
- the issue's acceptance for the preset (Efficacy ≤ 10% from ≥ 90%, Generalization ≤ 30%,
  specificity within 5 points, PPL within 10%) on records seed 0. The preset meets it on 15 of 16
  record seeds measured (0–15: Eff ≤ 10, Gen ≤ 20, Spe ≥ 94, PPL ≤ +1%; benchmarks/RESULTS.md).
- the paper's bar for the closed form (Eff ≤ 10, Gen ≤ 30, Spe ≥ 0.75 × base — the retention the
  paper reports on Llama-3.1-8B —, PPL ≤ 1.10 × base) on seed 0. With the paper's forget weights it
  barely forgets here (Eff 90): at width 128 the corpus term lets it write a fifth of each residual;
  the small model's preset raises the forget weights to a leverage of 0.7 (method/leverage.py;
  benchmarks/RESULTS.md has the 16-seed table).
"""

from __future__ import annotations

import pytest
import torch

import zu_fast
from zu_fast import metrics
from zu_fast.eval import tinylm


@pytest.fixture(scope="module")
def tiny():
    """Model, forget records, corpus statistics and the before-metrics, shared by both methods."""
    model, tok, world = tinylm.load_or_train(progress=False)
    records = world.records(10, seed=0)
    heldout = world.heldout_texts()
    cfg = zu_fast.UnlearnConfig.for_model(model, progress=False)
    stats = zu_fast.collect_stats(model, tok, world.training_texts(), cfg)  # same layers for both methods
    before = metrics.evaluate(model, tok, records, heldout)
    return model, tok, records, heldout, stats, before


@pytest.fixture(scope="module", params=["gd", "closed_form"])
def run(request, tiny):
    model, tok, records, heldout, stats, before = tiny
    cfg = zu_fast.UnlearnConfig.for_model(model, progress=False, method=request.param)
    snapshot = {k: v.clone() for k, v in model.state_dict().items()}
    edit = zu_fast.unlearn(model, tok, records, cfg, stats=stats)
    after = metrics.evaluate(model, tok, records, heldout)
    changed = sorted(k for k, v in model.state_dict().items() if not torch.equal(v, snapshot[k]))
    edit.restore()
    restored = all(torch.equal(v, snapshot[k]) for k, v in model.state_dict().items())
    print(metrics.format_table(before, after))
    print(edit.report)
    return {"cfg": cfg, "before": before, "after": after, "changed": changed, "restored": restored, "edit": edit}


@pytest.mark.slow
def test_edit_is_local_harmless_and_restorable(run):
    cfg, before, after = run["cfg"], run["before"], run["after"]
    assert run["changed"] == sorted(f"model.layers.{layer}.mlp.down_proj.weight" for layer in cfg.layers)
    assert all(row["rel_weight_change"] > 1e-4 for row in run["edit"].report.layers.values())
    assert run["restored"]
    assert after["efficacy"] < before["efficacy"]  # it forgets something (the old world: nothing)
    assert after["perplexity"] <= 1.10 * before["perplexity"]  # neither method wrecks the model
    keep = 10 if cfg.method == "gd" else 0.25 * before["specificity"]  # the closed form: the paper's retention
    assert after["specificity"] >= before["specificity"] - keep


@pytest.mark.slow
def test_acceptance_forgets_ten_facts(run):
    before, after = run["before"], run["after"]
    assert before["efficacy"] >= 90
    if run["cfg"].method == "gd":
        assert metrics.acceptance_failures(before, after) == []
    else:  # the paper's bar (module doc)
        assert after["efficacy"] <= 10 and after["generalization"] <= 30, after
        assert after["specificity"] >= 0.75 * before["specificity"], after
        assert after["perplexity"] <= 1.10 * before["perplexity"], after
