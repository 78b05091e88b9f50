"""The subject-locality causal check (fast: a randomly initialised micro Llama, no training)."""

from __future__ import annotations

import pytest
import torch

from zu_fast.eval import causal, tinylm
from zu_fast.eval.synthetic import RELATIONS, WorldConfig, make_world
from zu_fast.eval.tinylm import TinyLMConfig

MICRO = TinyLMConfig(
    world=WorldConfig(n_people=12, n_filler_train=30, n_filler_heldout=10),
    vocab_size=400, hidden_size=32, num_layers=3, num_heads=2, intermediate_size=64,
)


@pytest.fixture(scope="module")
def setup():
    world = make_world(MICRO.world)
    answers = sorted({o for r in world.relations for o in RELATIONS[r]["objects"]})
    tok = tinylm.train_tokenizer(world.training_texts(), MICRO.vocab_size, whole_words=answers)
    model = tinylm._build_model(MICRO, len(tok), tok).eval()
    return model, tok, world.records(4, seed=0)


def test_shape_and_ranges(setup):
    model, tok, records = setup
    r = causal.subject_locality(model, tok, records, [0, 2], n_noise=2)
    assert set(r["layers"]) == {0, 2}
    assert 0 < r["clean"] <= 1
    for v in r["layers"].values():
        assert set(v) == {"subject", "final", "subject_drop", "final_drop"}
        assert 0 <= v["subject"] <= 1 and 0 <= v["final"] <= 1


def test_zero_noise_is_clean_and_model_untouched(setup):
    model, tok, records = setup
    before = {k: v.clone() for k, v in model.state_dict().items()}
    r = causal.subject_locality(model, tok, records, [1], scale=0.0, n_noise=1)
    assert r["layers"][1]["subject"] == pytest.approx(r["clean"], rel=1e-5)
    assert r["layers"][1]["final"] == pytest.approx(r["clean"], rel=1e-5)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert not any(m._forward_hooks for m in model.modules())


def test_noise_at_final_position_changes_prediction(setup):
    model, tok, records = setup
    r = causal.subject_locality(model, tok, records, [2], scale=50.0, n_noise=2)
    assert r["layers"][2]["final"] != pytest.approx(r["clean"], rel=1e-3)
    # the subject span is before the final position: noising it at the LAST layer cannot matter
    assert r["layers"][2]["subject"] == pytest.approx(r["clean"], rel=1e-5)
