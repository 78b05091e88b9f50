"""Issue 14: the per-model edit stack, restore order, apply after restore, sequential unlearning with
re-used statistics, apply(cast=True), the inverse removal of a saved edit, and apply's verification."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_models import REQUESTS, corpus, llama

import zu_fast
from zu_fast import Edit, StaleStatsError, UnlearnConfig, ZuFastError
from zu_fast.provenance import stack_base_fingerprint, stats_model_fingerprint

TEMPLATES = [["{}"], ["Because I. {}"]]
pytestmark = pytest.mark.filterwarnings("ignore:zu_fast. (the target|layer):UserWarning")


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same(model, state):
    return all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


@pytest.fixture(scope="module")
def base():
    model, tok = llama()
    cfg = UnlearnConfig.for_model(model, layers=[1, 2], progress=False, v_num_grad_steps=3,
                                  original_representation="clean")
    stats = zu_fast.collect_stats(model, tok, corpus(40), cfg, cache=False)
    return model, tok, cfg, stats


@pytest.fixture(scope="module")
def saved(base, tmp_path_factory):
    """One closed-form edit of all three requests, saved, and the weights it produced (the model restored)."""
    model0, tok, cfg, stats = base
    model = copy.deepcopy(model0)
    edit = zu_fast.unlearn(model, tok, REQUESTS, cfg, stats=stats, context_templates=TEMPLATES)
    path = edit.save(tmp_path_factory.mktemp("stack") / "e")
    edited = {n: p.detach().clone() for n, p in model.named_parameters()}
    edit.restore()
    return path, edited


def test_stack_order_restore_apply_again_and_out_of_order(base):
    model0, tok, cfg, stats = base
    model = copy.deepcopy(model0)
    w0 = _state(model)
    A = zu_fast.unlearn(model, tok, REQUESTS[:1], cfg, stats=stats, context_templates=TEMPLATES)
    wA = _state(model)
    B = zu_fast.unlearn(model, tok, REQUESTS[1:2], cfg, stats=stats, context_templates=TEMPLATES)  # base stats
    wB = _state(model)
    assert zu_fast.edits(model) == [A, B] and "applied" in repr(A)
    with pytest.raises(ZuFastError, match=rf"cannot restore edit {A.id} .*newest first: edit {B.id} "):
        A.restore()
    assert _same(model, wB) and zu_fast.edits(model) == [A, B]  # refused: nothing changed
    B.restore()
    assert _same(model, wA) and zu_fast.edits(model) == [A]
    A.restore()
    assert _same(model, w0) and zu_fast.edits(model) == []
    with pytest.raises(ZuFastError, match="not applied to a model"):
        A.restore()
    A.apply(model)  # apply after restore
    B.apply(model)
    assert _same(model, wB) and zu_fast.edits(model) == [A, B]
    assert A.verification == {1: "exact (edited fingerprint)", 2: "exact (edited fingerprint)"}
    # out of order: B is taken off, A restored, B applied again to the weights without A
    with pytest.warns(UserWarning, match=rf"restored edit {A.id} .* out of order: edit {B.id} .* applied again"):
        A.restore(out_of_order=True)
    assert zu_fast.edits(model) == [B]
    for layer in (1, 2):  # W = D_B W₀: B's factor on the base weights
        W = w0[f"model.layers.{layer}.mlp.down_proj.weight"].clone()
        zu_fast.ops.multiplicative_update_(W, B.factors[layer], form="delta")
        assert torch.equal(model.model.layers[layer].mlp.down_proj.weight, W)
    B.restore()
    assert _same(model, w0) and zu_fast.edits(model) == []


def test_sequential_unlearning_reuses_the_base_statistics_only_while_the_stack_vouches(base):
    model0, tok, cfg, stats = base
    model = copy.deepcopy(model0)
    assert stack_base_fingerprint(model, cfg.layers, cfg.locate) is None  # no edits
    A = zu_fast.unlearn(model, tok, REQUESTS[:1], cfg, stats=stats, context_templates=TEMPLATES)
    # the stack reproduces the statistics fingerprint of the unedited model exactly
    base = stack_base_fingerprint(model, cfg.layers, cfg.locate)
    assert base == stats_model_fingerprint(model0, cfg.layers, cfg.locate) == stats.meta["model_fingerprint"]
    assert stats_model_fingerprint(model, cfg.layers, cfg.locate) != stats.meta["model_fingerprint"]
    # an edited weight changed outside zu_fast: the stack cannot vouch for the weights any more
    with torch.no_grad():
        model.model.layers[2].mlp.down_proj.weight.mul_(1.01)
    with pytest.raises(StaleStatsError, match="different model or different weights"):
        zu_fast.unlearn(model, tok, REQUESTS[1:2], cfg, stats=stats, context_templates=TEMPLATES)
    with torch.no_grad():
        model.model.layers[2].mlp.down_proj.weight.div_(1.01)
    A.restore()
    # a weight below the edited layers changed outside zu_fast: refused too
    A.apply(model)
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight.mul_(1.01)
    with pytest.raises(StaleStatsError):
        zu_fast.unlearn(model, tok, REQUESTS[1:2], cfg, stats=stats, context_templates=TEMPLATES)


def test_apply_cast_applies_an_fp32_edit_to_a_bf16_copy(base, saved):
    model0 = base[0]
    path, edited32 = saved
    half = copy.deepcopy(model0).to(torch.bfloat16)
    w_half = _state(half)
    with pytest.raises(ZuFastError, match="pass cast=True"):
        Edit.load(path).apply(half)
    loaded = Edit.load(path).apply(half, cast=True)
    assert all(v.startswith("within rounding (cast from float32") for v in loaded.verification.values())
    for layer in (1, 2):
        name = f"model.layers.{layer}.mlp.down_proj.weight"
        got = half.get_parameter(name).float()
        assert torch.allclose(got, edited32[name], rtol=2e-2, atol=2e-3)  # bf16 of the fp32 edit
    loaded.restore()
    assert _same(half, w_half)
    other = llama(seed=1)[0].to(torch.bfloat16)
    with pytest.raises(ZuFastError, match="is not a torch.bfloat16 copy"):
        Edit.load(path).apply(other, cast=True)


def test_gd_edit_roundtrip_and_inverse_removal(base, tmp_path):
    """The additive (GD) form: save/load/apply bit-exact; remove() on a copy that is not bound to it."""
    model0, tok, cfg, stats = base
    gcfg = cfg.replace(method="gd", gd_steps=5, gd_null_energy=0.5)
    model = copy.deepcopy(model0)
    edit = zu_fast.unlearn(model, tok, REQUESTS, gcfg, stats=stats, context_templates=TEMPLATES)
    assert edit.kind == "additive"
    edit.save(tmp_path / "gd")
    edited = _state(model)
    edit.restore()
    other = copy.deepcopy(model0)
    loaded = Edit.load(tmp_path / "gd").apply(other)
    assert _same(other, edited) and set(loaded.verification.values()) == {"exact (edited fingerprint)"}
    with pytest.raises(ZuFastError, match="use restore"):
        Edit.load(tmp_path / "gd").remove(other)
    # as if the edited model had been saved and loaded again: no stack, only the weights
    reloaded = copy.deepcopy(model0)
    reloaded.load_state_dict(edited)
    exact = Edit.load(tmp_path / "gd").remove(reloaded)
    assert set(exact) == {1, 2}
    for layer, ok in exact.items():
        name = f"model.layers.{layer}.mlp.down_proj.weight"
        w, w0 = reloaded.get_parameter(name), model0.get_parameter(name)
        assert ok == torch.equal(w, w0)
        assert torch.allclose(w, w0, rtol=0, atol=1e-6)
    with pytest.raises(ZuFastError, match="does not carry"):
        Edit.load(tmp_path / "gd").remove(reloaded)  # not on it any more


def test_apply_checks_the_result_and_undoes_a_bad_one(base, saved, monkeypatch):
    """A backend that writes wrong weights: caught after applying, the weights put back bit for bit."""
    model0 = base[0]
    path, _ = saved
    target = copy.deepcopy(model0)
    before = _state(target)
    real = zu_fast.ops.multiplicative_update_

    def off_by_a_bit(W, D, **kw):
        real(W, D, **kw)
        W[0, 0] += 1e-3

    monkeypatch.setattr(zu_fast.ops, "multiplicative_update_", off_by_a_bit)
    with pytest.raises(ZuFastError, match="layer 1: after applying, .* put back"):
        Edit.load(path).apply(target)
    assert _same(target, before) and zu_fast.edits(target) == []
    # on another device type/backend only D·W₀ within rounding can be checked: the same bad write is caught
    loaded = Edit.load(path)
    loaded.made_with = {"device_type": "elsewhere", "backend": "other"}
    with pytest.raises(ZuFastError, match=r"layer 1: after applying, .* differs from D·W₀"):
        loaded.apply(target)
    assert _same(target, before)
    monkeypatch.setattr(zu_fast.ops, "multiplicative_update_", real)
    ok = loaded.apply(target)
    assert all(v.startswith("exact") for v in ok.verification.values())
