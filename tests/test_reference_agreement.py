"""zu_fast reproduces the authors' ZeroUnlearn code: golden tensors from a side-by-side run.

tests/fixtures/reference_golden/ holds one small case written by ``benchmarks/vs_reference.py
--write-fixture`` (the authors' code patched only to run on CPU from a local corpus; its numbers, not
its code): a 4-layer Llama and its tokenizer, the requests, context templates and the paper's settings,
and what the reference computed — its corpus statistics C and X of the unedited model (layers 1, 2;
200 texts, one reference batch each), its z targets, forget keys, original representations,
projector bases, and its edited weights for the closed form and for GD.

Given the reference's statistics (as ``measured`` LayerStats), zu_fast's whole pipeline must land on
the reference's edited weights within 1e-4 of the edit's size, closed form and GD (same null space;
measured 4e-6 and 1.5e-5). Each of the 2026-12-01 corrections of the method's specification
(docs/algorithm.md: uncentred cross moment, step 3's δ at
``down_proj``'s output inside the per-layer loop, KL(current ‖ initial)) moves the result far outside
those bounds; the centring is checked here directly, the other two in tests/test_targets.py against
a plain re-statement of the reference's loop. zu_fast's own statistics are checked against the
reference's: C to fp32 round-off; X to the reference's running-mean artefact (its means shrink but not
to zero over 200 batches, so its X is a few % from the uncentred form and far more from the centred
one).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import word_corpus

import zu_fast
from zu_fast.stats.collect import CorpusStats
from zu_fast.stats.moments import LayerStats

FIXTURE = Path(__file__).parent / "fixtures" / "reference_golden"


@pytest.fixture(scope="module")
def case():
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    meta = json.loads((FIXTURE / "case.json").read_text())
    sp = meta["special_tokens"]
    tok = PreTrainedTokenizerFast(tokenizer_file=str(FIXTURE / "tokenizer.json"), bos_token=sp["bos"],
                                  eos_token=sp["eos"], pad_token=sp["pad"])
    model = LlamaForCausalLM(LlamaConfig.from_json_file(str(FIXTURE / "config.json")))
    model.load_state_dict(load_file(str(FIXTURE / "model.safetensors")))
    model.eval()
    ref = load_file(str(FIXTURE / "reference_outputs.safetensors"))
    return model, tok, meta, ref


def _config(meta, method: str, **kw) -> zu_fast.UnlearnConfig:
    paper = dict(meta["paper_settings"])
    extra = {"progress": False, **kw}
    if method == "gd":  # the reference's GD: hard-coded Adam lr 1e-3, 500 steps, float64, threshold 0.01
        paper.update(forget_KKT_lam=10, forget_VKT_lam=10)
        extra = {"method": "gd", "gd_lr": 1e-3, "gd_steps": 500, "gd_tol": 0.0, "gd_null_threshold": 0.01,
                 "gd_precision": "fp64", **extra}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return zu_fast.UnlearnConfig.from_dict(
            {**paper, "layers": meta["layers"], "v_loss_layer": 3, "layer_module_tmp": "model.layers.{}",
             "rewrite_module_tmp": "model.layers.{}.mlp.down_proj"}, **extra)


def _reference_stats(meta, ref) -> CorpusStats:
    """The reference's C and X as measured-mode sums: Σkkᵀ = n C, Σvkᵀ = (n−1) X (and its running means)."""
    layers = {}
    for layer in meta["layers"]:
        n = meta["counts"][str(layer)]["n"]
        C, X, mk, mv = (ref[f"stats.{layer}.{k}"].double() for k in ("C", "X", "mean_k", "mean_v"))
        layers[layer] = LayerStats(layer, (C * n).float(), mk * n, n, (X * (n - 1)).float(), mv * n)
    return CorpusStats(layers, {"source": "reference"})


def _edit_and_compare(case, method: str, **kw) -> dict[int, float]:
    model, tok, meta, ref = case
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = _config(meta, method, **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the random model's edits are large; the flags are not under test
        edit = zu_fast.unlearn(model, tok, meta["requests"], cfg, stats=_reference_stats(meta, ref),
                               context_templates=meta["templates"])
    try:
        out = {}
        for layer in meta["layers"]:
            name = f"model.layers.{layer}.mlp.down_proj.weight"
            W0, W_ref = before[name].double(), ref[f"{method}.{layer}.W_after"].double()
            W = model.state_dict()[name].double()
            out[layer] = float((W - W_ref).norm() / (W_ref - W0).norm())
        return out
    finally:
        edit.restore()


def test_closed_form_reproduces_the_reference(case):
    rel = _edit_and_compare(case, "closed_form")
    assert all(r <= 1e-4 for r in rel.values()), rel


def test_gd_reproduces_the_reference(case):
    rel = _edit_and_compare(case, "gd")
    assert all(r <= 1e-4 for r in rel.values()), rel


@pytest.fixture(scope="module")
def own_stats(case):
    model, tok, meta, _ = case
    return zu_fast.collect_stats(model, tok, word_corpus(meta["n_texts"]), _config(meta, "closed_form"), cache=False,
                                 progress=False)


def test_the_centred_cross_moment_would_not_reproduce_it(case, own_stats):
    """The old default (exactly centred X) moves the closed form's edit far from the reference's; the
    uncentred form from zu_fast's own statistics lands close (up to the reference's running-mean
    artefact at 200 texts). Checked on the solve alone, from the reference's keys, z targets and
    projector basis (the full pipeline is the test above)."""
    from zu_fast.method.closed_form import multiplier
    from zu_fast.method.keys import read_at_subject
    from zu_fast.model import edit_targets
    from zu_fast.requests import normalize_requests

    model, tok, meta, ref = case
    layer = meta["layers"][0]
    W0 = model.state_dict()[f"model.layers.{layer}.mlp.down_proj.weight"].double()
    W_ref = ref[f"closed_form.{layer}.W_after"].double()
    K, U = ref[f"closed_form.{layer}.K"], ref[f"closed_form.{layer}.U"]
    cfg = _config(meta, "closed_form")
    reqs = normalize_requests(meta["requests"])
    targets = edit_targets(model, cfg.layers, cfg.locate)
    h = read_at_subject(model, tok, reqs, cfg, meta["templates"], targets).z_out  # before any edit
    R = ((ref["closed_form.z"] - h) / len(meta["layers"])).t()  # the first layer's residuals  [d, N]
    err = {}
    for centred in (False, True):
        D = multiplier(W0.float(), own_stats[layer], K, R, U, cfg.replace(centered_cross_moment=centred))
        err[centred] = float((D @ W0 - W_ref).norm() / (W_ref - W0).norm())
    assert err[True] > 0.1 and err[True] > 5 * err[False], err  # measured: 0.32 vs 0.045


def test_statistics_match_the_reference(case, own_stats):
    model, tok, meta, ref = case
    for layer in meta["layers"]:
        st = own_stats[layer]
        assert st.n == meta["counts"][str(layer)]["n"]
        C_ref, X_ref = ref[f"stats.{layer}.C"].double(), ref[f"stats.{layer}.X"].double()
        C = st.second_moment(torch.float64)
        assert float((C - C_ref).norm() / C_ref.norm()) < 1e-5
        W = model.state_dict()[f"model.layers.{layer}.mlp.down_proj.weight"].double()
        X_unc = st.cross_moment(W, None, centered=False)
        X_cen = st.cross_moment(W, None, centered=True)
        d_unc = float((X_unc - X_ref).norm() / X_ref.norm())
        d_cen = float((X_cen - X_ref).norm() / X_ref.norm())
        # what the reference computes is the uncentred moment up to its running-mean artefact
        assert d_unc < 0.05 and d_unc < 0.2 * d_cen, (d_unc, d_cen)  # measured: 0.035 vs 0.46 (layer 1)
