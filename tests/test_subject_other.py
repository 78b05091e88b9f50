"""Subject-other (issue 24): the recall of the forgotten subjects' OTHER facts, beside Specificity, everywhere.

- ``zu_fast.metrics``: the metric on a fake model with known answers, its record formats, ``evaluate`` and the
  before/after table;
- the synthetic world's other facts: a held-out split (what the metric measures) and a trained split (what a
  retain set may use) that never share a prompt;
- ``zu-fast eval``: the quality table's Subj-other and relearning columns, the recovery arithmetic, the retain set
  built from the trained split only, the dataset mode's column where a file has other facts of a subject, the
  probes' summary.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from test_eval_metrics import TEXTS, LookupLM, _teach
from tiny_models import llama

from zu_fast import metrics as M
from zu_fast.eval import harness
from zu_fast.eval.synthetic import RELATIONS, WorldConfig, make_world
from zu_fast.eval.tinylm import train_tokenizer


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(TEXTS, vocab_size=300)


def test_subject_other_known_answers(tok):
    table: dict = {}
    _teach(tok, table, "Tolu Koumko was born in", "Lisbon")
    _teach(tok, table, "Furza Vesdrol plays the", "violin")
    model = LookupLM(len(tok), table)
    records = [{"prompt": "{} speaks", "subject": "Tolu Koumko", "target_true": "Finnish",
                "subject_other_prompts": [{"prompt": "Tolu Koumko was born in", "target": "Lisbon"},
                                          ("Tolu Koumko plays the", "violin")]},
               {"prompt": "{} speaks", "subject": "Furza Vesdrol", "target_true": "Finnish",
                "subject_other_prompts": [{"prompt": "Furza Vesdrol plays the", "ground_truth": {"str": "violin"}}]}]
    assert M.subject_other_pairs(records) == [("Tolu Koumko was born in", "Lisbon"),
                                              ("Tolu Koumko plays the", "violin"),
                                              ("Furza Vesdrol plays the", "violin")]
    assert M.subject_other(model, tok, records) == pytest.approx(200 / 3)
    res = M.evaluate(model, tok, records)
    assert res["subject_other"] == pytest.approx(200 / 3) and res["n_subject_other"] == 3
    # no such prompts: NaN, and the table leaves the row out
    plain = [{k: v for k, v in r.items() if k != "subject_other_prompts"} for r in records]
    res0 = M.evaluate(model, tok, plain)
    assert "subject_other" not in res0 and res0["n_subject_other"] == 0
    assert "Subject-other" not in M.format_table(res0, res0)
    assert "| Subject-other (%) ↑ | 66.7 | 0.0 | -66.7 |" in M.format_table(res, {**res, "subject_other": 0.0})


def test_world_other_facts_splits():
    world = make_world(WorldConfig(n_people=20, n_filler_train=10, n_filler_heldout=5))
    rec = world.records(3, seed=1)[0]
    held = world.other_facts(rec, "heldout")
    train = world.other_facts(rec, "train", per_relation=2)
    p = world.people.index(rec["subject"])
    others = [r for r in world.relations if r != rec["relation"]]
    assert {f["relation"] for f in held} == {f["relation"] for f in train} == set(others)
    assert len(held) == len(others) * world.config.n_heldout_templates and len(train) == 2 * len(others)
    assert not {f["text"] for f in held} & {f["text"] for f in train}  # never measured on what is retained
    for f in held + train:
        assert f["target"] == world.facts[p][f["relation"]] and f["text"] == f["prompt"].format(rec["subject"])
        assert f["prompt"] in RELATIONS[f["relation"]]["templates"]
    assert len(world.other_facts(rec, "train")) == sum(len(world.train_templates[p][r]) for r in others)
    with pytest.raises(ValueError):
        world.other_facts(rec, "test")


def test_recovery_against_the_same_seed_base_row():
    rows = [{"method": "base", "n": 10, "seed": 0, "efficacy": 100.0, "relearn_same_subject_eff": 100.0,
             "relearn_unrelated_eff": 100.0},
            {"method": "gd", "n": 10, "seed": 0, "efficacy": 10.0, "relearn_same_subject_eff": 37.0,
             "relearn_unrelated_eff": 10.0},
            {"method": "ga", "n": 10, "seed": 0, "efficacy": 80.0, "relearn_same_subject_eff": 100.0,
             "relearn_unrelated_eff": 90.0},
            {"method": "gd", "n": 10, "seed": 1, "error": "x"}]
    out = {(r["method"], r["seed"]): r for r in harness.with_recovery(rows)}
    assert out[("gd", 0)]["relearn_same_subject_back"] == pytest.approx(30.0)
    assert out[("gd", 0)]["relearn_unrelated_back"] == 0.0
    assert math.isnan(out[("ga", 0)]["relearn_same_subject_back"])  # removed < 30 points: no ratio
    assert "relearn_same_subject_back" not in out[("base", 0)] and "error" in out[("gd", 1)]


def test_eval_quality_table_with_subject_other_relearning_and_retain(tmp_path, monkeypatch):
    """`zu-fast eval --retain subject` on a tiny random model and world: the new columns are filled, the retain set
    comes from the trained phrasings and Subject-other from the held-out ones."""
    from zu_fast.eval import tinylm

    monkeypatch.setenv("ZU_FAST_CACHE", str(tmp_path / "cache"))
    model, tk = llama(layers=6, hidden=32, d_ff=48)
    world = make_world(WorldConfig(n_people=8, n_filler_train=40, n_filler_heldout=8, n_neighbors=2))
    monkeypatch.setattr(tinylm, "load_or_train", lambda **kw: (model, tk, world))
    monkeypatch.setattr(tinylm, "load_meta", lambda *a, **kw: None)
    seen = []
    import zu_fast

    real = zu_fast.unlearn

    def spy(model, tok, records, cfg, **kw):
        seen.append((records, kw.get("retain"), cfg))
        return real(model, tok, records, cfg, **kw)

    monkeypatch.setattr(zu_fast, "unlearn", spy)
    out = tmp_path / "out"
    old = torch.get_num_threads()
    try:
        rc = harness.main(["--methods", "gd,ga", "--n", "2", "--seeds", "0", "--out", str(out), "--gd-steps", "5",
                           "--quiet", "--threads", "1", "--baseline-epochs", "1", "--retain", "subject",
                           "--relearn-steps", "2", "--no-plot", "--preset", "zu-tiny-keep"])
    finally:
        torch.set_num_threads(old)
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    runs = {r["method"]: r for r in res["runs"]}
    for m in ("base", "gd", "ga"):
        assert 0.0 <= runs[m]["subject_other"] <= 100.0
        assert {"relearn_same_subject_eff", "relearn_unrelated_eff"} <= set(runs[m])
    assert "retained" in runs["gd"] and "retained" not in runs["ga"]
    md = (out / "results.md").read_text()
    assert "Subj-other ↑" in md and "RL@20 same % back ↓" in md and "retain set" in md
    (records, retain, cfg), = seen
    measured = {p["prompt"] for r in records for p in r["subject_other_prompts"]}
    kept = {r["prompt"].format(r["subject"]) for r in retain}
    assert kept and measured and not kept & measured
    assert cfg.method == "gd" and res["meta"]["retain"] == "subject"
    # --preset with its -gd twin: layers 2-4 (the statistics cover them although for_model edits 1-3), keys at
    # the prompt's last token, the closed form without GD's retry
    assert cfg.layers == [2, 3, 4] and cfg.templates.fact_token == "last" and cfg.targets.retry_clamp == 2.0
    assert res["meta"]["method_configs"]["zeroUnlearn"]["targets"]["retry_clamp"] is None
    assert res["meta"]["method_configs"]["zeroUnlearn"]["method"] == "closed_form"


def test_dataset_mode_subject_other_pairs():
    class _DS:
        records = [{"case_id": 1, "requested_rewrite": {"prompt": "{} was born in", "subject": "A B",
                                                         "target_true": {"str": "Oslo"}}},
                   {"case_id": 2, "requested_rewrite": {"prompt": "{} speaks", "subject": "A B",
                                                         "target_true": {"str": "Greek"}}},
                   {"case_id": 3, "requested_rewrite": [{"prompt": "{} plays", "subject": "C D",
                                                          "target_true": "golf"}]}]

    runner = harness._DatasetRunner.__new__(harness._DatasetRunner)
    runner.dataset = _DS()
    assert runner.subject_other_pairs([_DS.records[0]]) == [("A B speaks", "Greek")]
    assert runner.subject_other_pairs([_DS.records[2]]) == []


def test_dataset_mode_refuses_retain(tmp_path):
    from zu_fast import ZuFastError

    with pytest.raises(ZuFastError, match="--retain subject.*synthetic world"):
        harness.main(["--dataset", "x.json", "--retain", "subject", "--out", str(tmp_path)])


def test_probes_report_subject_other():
    from zu_fast.eval import probes

    model, tk = llama(layers=3, hidden=32, d_ff=48)
    world = make_world(WorldConfig(n_people=8, n_filler_train=20, n_filler_heldout=4, n_neighbors=2))
    records = world.records(2, seed=0)
    res = probes.run_probes(model, tk, records, ["multihop"], world=world)
    pairs = [(f["text"], f["target"]) for r in records for f in world.other_facts(r, "heldout")]
    assert res["summary"]["subject_other"] == M.recall(model, tk, pairs)


def test_each_method_gets_its_own_preset():
    """Without --preset/--config: for_model(method=...) per method (the closed form without GD's target retry)."""
    import argparse

    from test_config import _mcfg

    cfgs = harness._method_configs(_mcfg("llama", 6, zu_fast_model="zu-tiny-llama"),
                                   argparse.Namespace(config=None, preset=None), {"progress": False})
    assert cfgs["gd"].method == "gd" and cfgs["gd"].targets.retry_clamp == 2.0
    assert cfgs["zeroUnlearn"].method == "closed_form" and cfgs["zeroUnlearn"].targets.retry_clamp is None
    assert cfgs["zeroUnlearn"].closed_form.forget_leverage == 0.7
