"""Robustness probes (issue 18): each probe on its own maths, then on the project's small model with
assertions a broken probe fails (quantizing the unedited model stays within the quantization noise,
relearning the forget facts themselves brings them back, the last layer's logit lens is the model's
own prediction, a model that never learnt two-hop facts scores at their base rate, ...)."""

from __future__ import annotations

import math

import pytest
import torch

import zu_fast
from zu_fast import metrics
from zu_fast.eval import harness, probes, tinylm
from zu_fast.eval.synthetic import COMPOSITIONS, RELATIONS, WorldConfig, make_world

# ------------------------------------------------------------------------------- unit ------


@pytest.mark.parametrize("bits,symmetric", [(8, True), (4, False), (4, True), (3, False)])
def test_rtn_quantize_is_round_to_nearest_on_a_groupwise_grid(bits, symmetric):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(6, 200, generator=g) * torch.linspace(0.1, 3, 200)  # groups of 64: the last one is 8 wide
    q = probes.rtn_quantize(w, bits, 64, symmetric)
    assert q.shape == w.shape and q.dtype == w.dtype
    for j in range(0, 200, 64):
        blk, qb = w[:, j : j + 64], q[:, j : j + 64]
        for r in range(6):
            levels = torch.unique(qb[r])
            assert len(levels) <= 2**bits
            if symmetric:
                step = float(blk[r].abs().max()) / (2 ** (bits - 1) - 1)
            else:
                step = float(blk[r].max() - blk[r].min()) / (2**bits - 1)
            # nearest grid point: never more than half a step away (rounding), the grid's spacing is the step
            assert float((qb[r] - blk[r]).abs().max()) <= step / 2 + 1e-5
            gaps = (levels[1:] - levels[:-1]) / step
            assert torch.allclose(gaps, gaps.round(), atol=1e-3)
    assert torch.equal(probes.rtn_quantize(q, bits, 64, symmetric), q) or bits < 8  # int8 grid is a fixed point
    assert float((q - w).norm() / w.norm()) < {8: 0.01, 4: 0.15, 3: 0.3}[bits]


def test_bad_probe_inputs_raise_clear_errors():
    with pytest.raises(zu_fast.ZuFastError, match="unknown probes"):
        probes.parse_probes("quant,telepathy")
    assert probes.parse_probes("all") == list(probes.PROBES)
    assert probes.parse_probes("relearn, quant") == ["quant", "relearn"]
    for bad in ("int9", "fp4", "int4-g"):
        with pytest.raises(zu_fast.ZuFastError, match="quantization scheme"):
            probes.parse_scheme(bad)
    assert probes.parse_scheme("int4") == (4, False, None)
    assert probes.parse_scheme("int8") == (8, True, None)
    assert probes.parse_scheme("int4-sym-g64") == (4, True, 64)
    with pytest.raises(zu_fast.ZuFastError):
        probes.rtn_quantize(torch.zeros(3), 4)


def test_linear_probe_decodes_a_linear_code_and_not_noise():
    g = torch.Generator().manual_seed(1)
    centres = torch.randn(5, 16, generator=g) * 3
    labels = [i % 5 for i in range(200)]
    x = centres[labels] + torch.randn(200, 16, generator=g)  # [200, 16]
    h = torch.stack([torch.randn(200, 16, generator=g), x])  # layer 0: noise, layer 1: the code
    names = [f"c{i}" for i in labels]
    res = probes.linear_probe(h[:, :150], names[:150], h[:, 150:], names[150:])
    assert res["acc"][1] >= 90 and res["val"][1] >= 90
    assert res["acc"][0] <= 45  # chance is 20%
    assert len(res["acc"]) == len(res["val"]) == 2


def test_answer_matching_is_by_whole_word():
    assert probes._contains(" Lisbon. The sport", "Lisbon")
    assert probes._contains(" in lisbon", "Lisbon")
    assert not probes._contains(" Lisbonia", "Lisbon")
    assert not probes._contains(" golfing", "golf")


def test_composition_world_adds_texts_without_changing_the_default():
    base = make_world()
    comp = make_world(WorldConfig(compose=True))
    assert comp.people == base.people and comp.facts == base.facts
    assert comp.training_texts()[: len(base.training_texts())] == base.training_texts()
    assert comp.heldout_texts() == base.heldout_texts()
    assert comp.records(10, 3) == base.records(10, 3)
    assert WorldConfig(compose=False).to_dict() == WorldConfig().to_dict()
    assert "compose" not in WorldConfig().to_dict()  # the cached small model's key is unchanged
    assert base.two_hop_pairs(base.records(5)[0]) == [] and base.object_fact_pairs() == []
    corpus = "\n".join(comp.training_texts())
    trained = comp.two_hop_trained
    assert 0 < len(trained) < len(comp.people)
    n_pairs = 0
    for r in comp.records(40, 0):
        p = comp.people.index(r["subject"])
        pairs = comp.two_hop_pairs(r)
        if r["relation"] not in COMPOSITIONS or p in trained:
            assert pairs == []
            continue
        n_pairs += len(pairs)
        want = COMPOSITIONS[r["relation"]]["map"][r["target_true"]["str"]]
        for prompt, answer in pairs:
            assert answer == want
            assert prompt not in corpus  # a held-out two-hop question: never trained, only composable
        assert 0 < comp.two_hop_base_rate(r) <= 1
    assert n_pairs > 0
    for prompt, answer in comp.object_fact_pairs():  # the second hop is stated in training
        assert f"{prompt} {answer}." in corpus
    for rel, c in COMPOSITIONS.items():  # no two-hop phrasing contains a one-hop phrasing
        assert set(c["map"]) == set(RELATIONS[rel]["objects"])
        for t2 in c["two_hop_templates"]:
            assert not any(t1.format("S") in t2.format("S") for r1 in RELATIONS.values() for t1 in r1["templates"])
    with pytest.raises(ValueError):
        make_world(WorldConfig(compose=True, compose_train_fraction=1.0))


# ------------------------------------------------------------------------- small model ------


@pytest.fixture(scope="module")
def small():
    """The small model, 5 forget records, and the GD preset's edit applied and restored on demand."""
    old = torch.get_num_threads()
    torch.set_num_threads(min(2, old))
    model, tok, world = tinylm.load_or_train(progress=False)
    records = world.records(5, seed=0)
    cfg = zu_fast.UnlearnConfig.for_model(model, progress=False)
    stats = zu_fast.collect_stats(model, tok, world.training_texts(), cfg)
    yield model, tok, world, records, cfg, stats
    torch.set_num_threads(old)


def _weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _same(model, before):
    return all(torch.equal(p, before[n]) for n, p in model.named_parameters())


@pytest.fixture(scope="module")
def edited(small):
    """Probe results on the unedited model and after the GD preset's edit (restored afterwards)."""
    model, tok, world, records, cfg, stats = small
    s = probes.ProbeSettings(relearn_steps=(5, 20), relearn_kinds=("forget",), gen_samples=2)
    before = _weights(model)
    base = probes.run_probes(model, tok, records, ["quant", "lens", "generate"], world=world, settings=s)
    base["metrics"] = metrics.evaluate(model, tok, records)
    base["probes_left_weights"] = _same(model, before)
    edit = zu_fast.unlearn(model, tok, records, cfg, stats=stats)
    try:
        edited_weights = _weights(model)
        after = probes.run_probes(model, tok, records, ["relearn", "lens", "generate"], world=world, settings=s)
        after["metrics"] = metrics.evaluate(model, tok, records)
        after["probes_left_weights"] = _same(model, edited_weights)
    finally:
        edit.restore()
    assert _same(model, before)
    return base, after


@pytest.mark.slow
def test_probes_leave_the_weights_bit_for_bit(edited):
    base, after = edited
    assert base["probes_left_weights"] and after["probes_left_weights"]


@pytest.mark.slow
def test_quantizing_the_unedited_model_stays_within_the_noise(small, edited):
    model, tok, world, records, _, _ = small
    base, _ = edited
    m = base["metrics"]
    q = base["details"]["quant"]
    for scheme, tol in (("int8", 5.0), ("int4", 20.0)):
        for key in ("efficacy", "generalization", "specificity"):
            assert abs(q[scheme][key] - m[key]) <= tol, (scheme, key, q[scheme][key], m[key])
    assert q["int8"]["rel_error"] < q["int4"]["rel_error"] < 0.2
    # ...but the quantization acts (a 2-bit grid moves every weight and the model's outputs; this small
    # model still recalls its facts through it), and the weights come back bit for bit
    before = _weights(model)
    ids = torch.tensor([tok(records[0]["prompt"].format(records[0]["subject"]))["input_ids"]])
    with torch.no_grad():
        clean = model(input_ids=ids).logits
    with probes.quantized(model, "int2") as info:
        assert info["modules"] == 6 * 7  # q, k, v, o, gate, up, down per layer; never the LM head
        assert info["rel_error"] > 0.2
        with torch.no_grad():
            assert float((model(input_ids=ids).logits - clean).abs().max()) > 0.1
        assert torch.equal(model.lm_head.weight, before["lm_head.weight"])
    assert _same(model, before)


@pytest.mark.slow
def test_relearning_the_forget_facts_brings_them_back(small, edited):
    base, after = edited
    assert after["metrics"]["efficacy"] <= 20  # the GD preset forgot them
    rl = after["details"]["relearn"]
    assert rl["forget"]["20"]["efficacy"] >= 80  # the positive control recovers what was forgotten
    assert rl["forget"]["20"]["efficacy"] >= rl["forget"]["5"]["efficacy"]
    assert set(rl) == {"forget"} and set(rl["forget"]) == {"5", "20"}
    assert after["summary"]["relearn_forget_eff_20"] == rl["forget"]["20"]["efficacy"]
    assert 0 <= after["summary"]["other_facts"] <= 100


@pytest.mark.slow
def test_relearning_restores_the_weights_and_spares_unedited_knowledge(small):
    model, tok, world, records, _, _ = small
    before = _weights(model)
    texts = {"unrelated": probes.relearn_texts(world, records, "unrelated", max_texts=64)}
    res = probes.relearn_probe(model, tok, records, texts, steps=(10,))
    assert _same(model, before)
    assert res["unrelated"][10]["efficacy"] >= 80  # the attack itself does not wipe what the model knows
    assert all(not p.requires_grad or p.grad is None for p in model.parameters())
    with pytest.raises(zu_fast.ZuFastError):
        probes.relearn_probe(model, tok, records, texts, steps=(0,))
    with pytest.raises(zu_fast.ZuFastError):
        probes.relearn_texts(world, records, "gossip")


@pytest.mark.slow
def test_logit_lens_at_the_last_layer_is_the_model_itself(small, edited):
    base, after = edited
    lens = base["details"]["lens"]["lens"]
    # the final layer's lens at the prompt's end is the model's own next-token prediction: the
    # unedited model recalls every forget fact (Efficacy 100), so the answer beats every candidate
    assert base["metrics"]["efficacy"] == 100
    assert lens["last"]["acc"][-1] == 100 and lens["last"]["median_rank"][-1] == 0
    assert len(lens["subject"]["acc"]) == len(lens["last"]["acc"]) == 6
    probe = base["details"]["lens"]["probe"]
    assert max(probe["last"]["val"]) >= 80  # the probe itself works on facts the model kept
    assert max(probe["last"]["acc"]) >= 60
    # after the edit the model's own prediction no longer names most answers
    assert after["details"]["lens"]["lens"]["last"]["acc"][-1] <= 40


@pytest.mark.slow
def test_generation_finds_known_answers_and_not_unknown_ones(edited):
    base, after = edited
    assert base["summary"]["gen_greedy"] >= 90
    assert base["summary"]["gen_greedy_no_eos"] >= 90
    # the same prompts about strangers (people the world says nothing about) rarely name the answer
    assert base["summary"]["gen_greedy_no_eos_control"] <= 30
    assert after["summary"]["gen_greedy"] <= 30
    ex = base["details"]["generate"]["greedy_examples"]
    assert len(ex) == 3 and all(isinstance(p, str) and isinstance(o, str) for p, o in ex)


@pytest.mark.slow
def test_multihop_probe_reports_no_knowledge_a_model_never_learnt(small):
    """The default small model never saw a two-hop sentence nor an object fact: on the composing world's
    held-out two-hop questions it must score near their base rate, far below its one-hop recall."""
    model, tok, _, _, _, _ = small
    comp = make_world(WorldConfig(compose=True))
    records = comp.records(40, seed=1)
    res = probes.run_probes(model, tok, records, ["multihop"], world=comp)
    s = res["summary"]
    assert s["multihop_n"] > 20
    assert s["multihop"] <= s["multihop_base_rate"] + 15
    assert metrics.efficacy(model, tok, records) >= 90
    plain = probes.run_probes(model, tok, records[:2], ["multihop"], world=make_world())
    assert math.isnan(plain["summary"]["multihop"]) and "multihop_note" in plain["details"]


def test_robustness_table_from_rows(tmp_path):
    rows = []
    for seed in (0, 1):
        for method, eff, q4 in (("base", 100.0, 100.0), ("gd", 0.0, 30.0)):
            summ = {"quant_int8_eff": eff, "quant_int4_eff": q4, "relearn_unrelated_eff_5": eff,
                    "relearn_unrelated_eff_50": eff + (20.0 if method == "gd" else 0.0), "gen_greedy": eff}
            rows.append({"method": method, "n": 10, "seed": seed, "efficacy": eff, "generalization": eff,
                         "probes": {"summary": summ, "details": {}}})
    import json

    for seed in (0, 1):  # two runs (as one process per seed would write them), merged into one table
        d = tmp_path / f"run{seed}"
        d.mkdir()
        (d / "results.json").write_text(json.dumps({"methods": ["base", "gd"], "seeds": [seed], "n": [10],
                                                    "runs": [r for r in rows if r["seed"] == seed]}))
    md = harness.merge_runs([tmp_path / "run0" / "results.json", tmp_path / "run1" / "results.json"], tmp_path,
                           plot=False)
    assert "| 10 | gd |" in (tmp_path / "results.md").read_text()
    assert "| 10 | gd |" in md and "int4 Eff" in md and "unrelated Eff@50" in md
    gd = next(line for line in md.splitlines() if line.startswith("| 10 | gd |") and "30.0" in line)
    assert "0.0 ± 0.0" in gd
    # recovered %: int4 brought back 30 of the 100 forgotten points, 50 relearning steps 20
    assert "| 10 | gd | 30 | 0 | 0 | 20 |" in md
    assert (tmp_path / "robustness.json").exists() and (tmp_path / "robustness.md").read_text().endswith(md)
