"""The retain set (issue 24): records whose outputs the edit must keep.

- the closed form's retain term: the fast (thin) form equals a dense float64 formulation on random inputs, the
  normal equations' gradient vanishes at it, it scales with the leverage rule, and it keeps the retain outputs
  (they move less with the term than without, beyond a margin); without retain keys nothing changes;
- GD's retain term: the iterates equal a dense float64 autograd reference of the objective with the term, and the
  retain outputs move less with it (both variables);
- unlearn / Unlearner / CLI plumbing: the input forms, clear errors before any change, the retain outputs of a
  tiny model move less with the retain set than without (closed form and GD), a mixture-of-experts layer.
"""

from __future__ import annotations

import json

import pytest
import torch
from family_models import build
from test_closed_form import random_problem
from test_gd import gd_problem, reference_gd
from tiny_models import REQUESTS, corpus, llama

import zu_fast
from zu_fast import UnlearnConfig, ZuFastError
from zu_fast.method.closed_form import multiplier, narrow_multiplier, objective
from zu_fast.method.gd import gd_update
from zu_fast.method.projector import Projector
from zu_fast.method.retain import RetainPrompt, retain_prompts
from zu_fast.requests import normalize_requests


@pytest.fixture(autouse=True)
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _retain_keys(K, M=4, seed=11, near=0.5):
    """Retain keys partly along the forget keys (what a same-subject retain prompt looks like), partly new."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(K.shape[1], M, generator=g, dtype=K.dtype)  # [N, M]
    return near * K @ mix / K.shape[1] ** 0.5 + torch.randn(K.shape[0], M, generator=g, dtype=K.dtype)  # [d_in, M]


# ----------------------------------------------------------------------- closed form ------


@pytest.mark.parametrize("projected", [False, True])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("leverage", [None, 0.7])
def test_fast_retain_term_matches_the_dense_float64_form(projected, bias, leverage):
    W, b, st, K, R, U = random_problem(bias=bias, seed=3 + int(bias))
    Kr = _retain_keys(K)
    cfg = UnlearnConfig(layers=[7], gram_chunk=16, retain_weight_rk=30.0, retain_weight_rv=20.0,
                        forget_leverage=leverage)
    info_f, info_e = {}, {}
    D_fast = multiplier(W, st, K, R, U, cfg, bias=b, form="fast", precision="fp64", K_r=Kr,
                        retain_projected=projected, info=info_f)
    D_exact = multiplier(W, st, K, R, U, cfg, bias=b, form="exact", K_r=Kr, retain_projected=projected, info=info_e)
    assert (D_fast - D_exact).norm() / D_exact.norm() < 1e-6
    D_plain = multiplier(W, st, K, R, U, cfg, bias=b, precision="fp64")
    assert (D_fast - D_plain).norm() / D_plain.norm() > 1e-3  # the retain term is a real change
    # the leverage rule raises the retain weights by the forget weights' factor
    scale = info_f["forget_weight_fk"] / 50.0
    assert info_f["retain_weight_rk"] == pytest.approx(30.0 * scale) and info_f["retain_weight_rv"] == \
        pytest.approx(20.0 * scale)
    assert (scale > 1.0) == (leverage is not None)


@pytest.mark.parametrize("projected", [False, True])
def test_retain_normal_equations_gradient_vanishes(projected):
    W, b, st, K, R, U = random_problem(d=16, d_in=28, N=4, seed=5)
    Kr = _retain_keys(K, M=3)
    cfg = UnlearnConfig(layers=[7], retain_weight_rk=40.0, retain_weight_rv=25.0)
    D = multiplier(W, st, K, R, U, cfg, precision="fp64", K_r=Kr, retain_projected=projected).requires_grad_(True)
    C = st.second_moment(torch.float64)
    X = st.cross_moment(W, None, False)
    P = Projector(U, cfg.representation.projector_eps).dense()
    J = objective(D, W, C, X, K, W @ K, R, P, cfg, K_r=Kr, retain_projected=projected)
    (grad,) = torch.autograd.grad(J, D)
    D2 = (D.detach() + 0.1 * torch.eye(16, dtype=torch.float64)).requires_grad_(True)
    (grad_off,) = torch.autograd.grad(objective(D2, W, C, X, K, W @ K, R, P, cfg, K_r=Kr,
                                                retain_projected=projected), D2)
    assert grad.norm() < 1e-8 * grad_off.norm()


def test_closed_form_retain_keeps_the_retain_outputs():
    """With the term the retain outputs move far less than without it, at an unchanged forget remap."""
    W, b, st, K, R, U = random_problem(d=24, d_in=40, N=5, seed=2)
    R = 3.0 * R  # a large edit
    Kr = _retain_keys(K, M=6, near=1.0)
    WKr = W @ Kr

    def moved(cfg, **kw):
        info = {}
        D = multiplier(W, st, K, R, U, cfg, precision="fp64", info=info, **kw)
        return float(((D @ WKr) - WKr).norm() / WKr.norm()), D, info

    base = UnlearnConfig(layers=[7], forget_weight_fk=5000.0, forget_weight_fv=5000.0)
    without, D0, _ = moved(base)
    with_, D1, info = moved(base.replace(retain_weight_rk=5000.0, retain_weight_rv=5000.0), K_r=Kr)
    assert with_ < 0.25 * without, (with_, without)
    assert info["retain_output_change"] == pytest.approx(with_)
    # the forget outputs still move toward their targets
    WK = W @ K
    assert float(((D1 @ WK) - WK).norm()) > 0.3 * float(((D0 @ WK) - WK).norm())
    # no retain keys (or none that reach the layer): the multiplier is bit-identical to the plain one
    empty = Kr[:, :0]
    assert torch.equal(multiplier(W, st, K, R, U, base, precision="fp64", K_r=empty), D0)


def test_narrow_form_retain_term():
    """Narrow maps (d_in < d): the retain term enters M and Y as in the wide form; D W solves the weighted least
    squares with the retain demand."""
    g = torch.Generator().manual_seed(0)
    d, d_in, N, M = 20, 12, 3, 4
    W = torch.randn(d, d_in, generator=g, dtype=torch.float64) / d_in**0.5
    keys = torch.randn(200, d_in, generator=g, dtype=torch.float64)
    from zu_fast.stats.moments import LayerStats

    st = LayerStats(7, (keys.t() @ keys).float(), keys.sum(0), 200)
    K = torch.randn(d_in, N, generator=g, dtype=torch.float64)
    Kr = torch.randn(d_in, M, generator=g, dtype=torch.float64)
    R = torch.randn(d, N, generator=g, dtype=torch.float64)
    from zu_fast.method.projector import representation_basis

    U = representation_basis(torch.randn(d, N, generator=g, dtype=torch.float64))
    cfg = UnlearnConfig(layers=[7], retain_weight_rk=70.0, retain_weight_rv=70.0)
    D = narrow_multiplier(W, st, K, R, U, cfg, K_r=Kr)
    # D W = Y M⁻¹ (W has full column rank) with M, Y from their definitions
    C = st.second_moment(torch.float64)
    X = st.cross_moment(W, None, False)
    cf = cfg.closed_form
    Mm = cf.corpus_weight_k * C + cf.forget_weight_k * K @ K.t() + 70.0 * Kr @ Kr.t() + torch.eye(d_in,
                                                                                                  dtype=torch.float64)
    P = Projector(U, cfg.representation.projector_eps).dense()
    Y = P @ (cf.corpus_weight_v * X + cf.forget_weight_v * (W @ K + R) @ K.t() + W) + 70.0 * W @ Kr @ Kr.t()
    assert torch.allclose(D @ W, Y @ torch.linalg.inv(Mm), rtol=1e-7, atol=1e-9)


# ----------------------------------------------------------------------- GD ------


def _reference_with_retain(W, st, K, R, U, Kr, cfg, steps):
    """The dense float64 autograd reference (test_gd.reference_gd) with + w_ret ‖Δ P K_r‖² in the loss."""
    C = st.second_moment(torch.float64)
    _, _, P = reference_gd(W, C, K, R, U, cfg, steps=1)
    Wd, Kd, Rd, Ud, Krd = (x.detach().double() for x in (W, K, R, U, Kr))
    target = Wd @ Kd + Rd
    delta = torch.zeros_like(Wd, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=cfg.gd.lr)
    losses = []
    for _ in range(steps):
        DP = delta @ P
        out = (Wd + DP) @ Kd
        loss = (cfg.gd.orth_weight * (Ud.t() @ out).pow(2).sum() + cfg.gd.remap_weight * (out - target).pow(2).sum()
                + cfg.gd.norm_weight * DP.pow(2).sum() + cfg.gd.retain_weight * (DP @ Krd).pow(2).sum())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return (delta @ P).detach(), losses


@pytest.mark.parametrize("form", ["null", "complement"])
def test_gd_retain_term_matches_the_autograd_reference(form):
    W, st, K, R, U, _ = gd_problem(seed=4, null_frac=0.5)
    Kr = _retain_keys(K.double(), M=5).float()
    cfg = UnlearnConfig(layers=[3], gd_steps=120, gd_retain_weight=50.0)
    dW_ref, losses_ref = _reference_with_retain(W, st, K, R, U, Kr, cfg, cfg.gd.steps)
    trace = []
    dW, info = gd_update(W, st, K, R, U, cfg, precision="fp64", tol=0.0, form=form, trace=trace, K_r=Kr)
    rel = torch.tensor(trace[:-1]).sub(torch.tensor(losses_ref)).abs().div(torch.tensor(losses_ref)).max()
    assert rel < 1e-9, rel
    assert (dW.double() - dW_ref).norm() / dW_ref.norm() < 1e-6
    assert info["gd_retain_final"] > 0 and "retain_output_change" in info
    # the reported parts recombine into the final loss
    recomb = (cfg.gd.orth_weight * info["gd_orth_final"] + cfg.gd.remap_weight * info["gd_remap_final"]
              + cfg.gd.norm_weight * info["gd_norm_final"] + 50.0 * info["gd_retain_final"])
    assert recomb == pytest.approx(info["gd_loss_final"], rel=1e-9)


@pytest.mark.parametrize("variable", ["dense", "null"])
def test_gd_retain_keeps_the_retain_outputs(variable):
    W, st, K, R, U, _ = gd_problem(seed=6, null_frac=0.6, null_key_scale=1.0)
    Kr = _retain_keys(K.double(), M=5, near=1.0).float()
    cfg = UnlearnConfig(layers=[3], gd_steps=400, gd_variable=variable, gd_tol=0.0)
    dW0, info0 = gd_update(W, st, K, R, U, cfg)
    dW1, info1 = gd_update(W, st, K, R, U, cfg.replace(gd_retain_weight=1000.0), K_r=Kr)
    base = (W.double() @ Kr.double()).norm()
    without = float((dW0.double() @ Kr.double()).norm() / base)
    with_ = float((dW1.double() @ Kr.double()).norm() / base)
    assert with_ < 0.25 * without, (with_, without)
    assert info1["retain_output_change"] == pytest.approx(with_, rel=1e-4)
    assert "gd_retain_final" not in info0  # no retain keys: the objective is the reference's


# ----------------------------------------------------------------------- input forms ------

REQS = normalize_requests(REQUESTS)


def test_retain_input_forms():
    out = retain_prompts([
        {"prompt": "{} works for", "subject": "Alice Morvan", "target_true": "Acme"},
        {"prompt": "Alice Morvan speaks", "subject": "Alice Morvan", "answer": {"str": "French"}},
        "Oslo is a city in",
        ("Paris is the capital of", "France"),
        {"prompt": "{} works for", "subject": "Alice Morvan"},  # a duplicate: dropped
    ], REQS)
    assert [(r.prompt, r.subject, r.answer) for r in out] == [
        ("{} works for", "Alice Morvan", "Acme"), ("{} speaks", "Alice Morvan", "French"),
        ("{}", "Oslo is a city in", None), ("{}", "Paris is the capital of", "France")]
    assert out[2].plain and out[2].text == "Oslo is a city in" and out[0].pair() == ("Alice Morvan works for", "Acme")
    subj = retain_prompts("subject", REQS, ["{} works for", "{} was born in"])
    # every forgotten subject × template, except a forget request's own prompt
    assert [(r.subject, r.prompt) for r in subj] == [
        ("Alice Morvan", "{} works for"), ("Bob Kestrel", "{} was born in"), ("Carla Dunmore", "{} works for"),
        ("Carla Dunmore", "{} was born in")]
    assert retain_prompts(None, REQS) == []
    assert retain_prompts(out, REQS) == out  # already normalised: kept as they are


@pytest.mark.parametrize("retain,templates,match", [
    ("subject", None, "retain_templates"),
    ("subject", ["{} works for {}"], "exactly one"),
    ("everything", None, "'subject'"),
    ([{"prompt": "{} works for"}], None, "no subject"),
    ([{"prompt": "{} was born in", "subject": "Alice Morvan"}], None, "also a forget request"),
    (["Alice Morvan was born in"], None, "also a forget request"),
    ([{"prompt": "{} works for", "subject": "Alice Morvan", "target_true": 3}], None, "answer"),
    ([42], None, r"retain\[0\]"),
    ([{"prompt": "Bob works", "subject": "Alice"}], None, "not found"),
    ([{"prompt": "{} works", "subject": "A"}], ["{} x"], "retain='subject'"),
    (None, ["{} x"], "retain='subject'"),
])
def test_bad_retain_input_is_a_clear_error(retain, templates, match):
    with pytest.raises(ZuFastError, match=match):
        retain_prompts(retain, REQS, templates)


# ----------------------------------------------------------------------- end to end ------

FAST = dict(progress=False, v_num_grad_steps=5, original_representation="clean", stats_batch_tokens=512)
RETAIN = [{"prompt": "{} works for", "subject": "Alice Morvan"}, {"prompt": "{} speaks", "subject": "Alice Morvan"},
          {"prompt": "{} plays the", "subject": "Bob Kestrel"}, {"prompt": "{} speaks", "subject": "Carla Dunmore"}]


@pytest.fixture(scope="module")
def tiny():
    model, tok = llama(layers=4, hidden=32, d_ff=48, seed=1)
    cfg = UnlearnConfig.for_model(model, **FAST)
    stats = zu_fast.collect_stats(model, tok, corpus(120), cfg, cache=False)
    return model, tok, stats


def _last_logits(model, tok, prompts):
    with torch.no_grad():
        return torch.stack([model(**tok(p, return_tensors="pt")).logits[0, -1].float() for p in prompts])


@pytest.mark.parametrize("method,weights", [
    ("closed_form", {"forget_leverage": 0.7, "retain_weight_rk": 5000.0, "retain_weight_rv": 5000.0}),
    ("gd", {"gd_null_energy": 0.3, "gd_steps": 150, "gd_retain_weight": 10000.0})])
def test_retain_prompts_change_less_with_the_retain_set(tiny, method, weights):
    """The retain prompts' next-token logits move less after an edit with the retain set than after the same
    edit without it (keys at the prompt's last token, where a subject's facts have different keys)."""
    model, tok, stats = tiny
    cfg = UnlearnConfig.for_model(model, **FAST, method=method, fact_token="last", **weights)
    prompts = [r["prompt"].format(r["subject"]) for r in RETAIN]
    clean = _last_logits(model, tok, prompts)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    moved = {}
    for label, retain in (("without", None), ("with", RETAIN)):
        edit = zu_fast.unlearn(model, tok, REQUESTS, cfg, stats=stats, retain=retain, context_templates=[["{}"]])
        moved[label] = float((_last_logits(model, tok, prompts) - clean).norm() / clean.norm())
        if retain:
            assert edit.report.targets["n_retain"] == 4.0
            assert all("retain_output_change" in row for row in edit.report.layers.values())
        edit.restore()
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert moved["with"] < 0.6 * moved["without"], moved


def test_bad_retain_changes_nothing(tiny):
    model, tok, stats = tiny
    cfg = UnlearnConfig.for_model(model, **FAST)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(ZuFastError, match="also a forget request"):
        zu_fast.unlearn(model, tok, REQUESTS, cfg, stats=stats, retain=[REQUESTS[0]])
    with pytest.raises(ZuFastError, match="retain_templates"):
        zu_fast.unlearn(model, tok, REQUESTS, cfg, stats=stats, retain="subject")
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_shared_subject_keys_are_named_in_a_warning(tiny):
    """At the subject's last token a subject-first retain prompt of a forgotten subject has the forget key."""
    model, tok, stats = tiny
    cfg = UnlearnConfig.for_model(model, **FAST, gd_steps=5)
    with pytest.warns(UserWarning, match="same key as a forget request.*fact_token='last'"):
        edit = zu_fast.unlearn(model, tok, REQUESTS[:1], cfg, stats=stats, retain=RETAIN[:1],
                               context_templates=[["{}"]])
    edit.restore()


@pytest.mark.parametrize("method", ["closed_form", "gd"])
def test_moe_layers_take_the_retain_set_per_component(method):
    """A mixture-of-experts layer: each touched expert gets the retain prompts routed to it; untouched experts
    stay bit-identical, and the retain prompts move less than without the set."""
    from tiny_models import tokenizer

    tok = tokenizer()
    model = build("mixtral", layers=3)  # 4 experts narrower than d: the narrow closed form
    cfg = UnlearnConfig.for_model(model, **FAST, method=method, fact_token="last", gd_steps=60,
                                  forget_leverage=0.7, gd_null_energy=0.3, retain_weight_rk=5000.0,
                                  retain_weight_rv=5000.0, gd_retain_weight=10000.0)
    stats = zu_fast.collect_stats(model, tok, corpus(60), cfg, cache=False)
    prompts = [r["prompt"].format(r["subject"]) for r in RETAIN]
    clean = _last_logits(model, tok, prompts)
    moved = {}
    for label, retain in (("without", None), ("with", RETAIN)):
        edit = zu_fast.unlearn(model, tok, REQUESTS[:2], cfg, stats=stats, retain=retain, context_templates=[["{}"]])
        moved[label] = float((_last_logits(model, tok, prompts) - clean).norm() / clean.norm())
        if retain:
            rows = [row for row in edit.report.layers.values() if "retain_output_change" in row]
            assert rows  # some touched expert saw retain prompts
        edit.restore()
    assert moved["with"] < moved["without"], moved


# ----------------------------------------------------------------------- Unlearner and CLI ------


def test_unlearner_takes_retain_and_reports_subject_other(tiny):
    model, tok, stats = tiny
    cfg = UnlearnConfig.for_model(model, **FAST, fact_token="last", forget_leverage=0.7)
    unl = zu_fast.Unlearner(model, tok, cfg, stats=stats)
    res = unl.forget(requests=REQUESTS[:2], retain=[("Alice Morvan works for", "Acme")],
                     subject_other=[("Alice Morvan speaks", "French")], evaluate=True)
    try:
        assert "subject_other" in res.after and "retained" in res.after and res.before["n_subject_other"] == 1
        assert "Subject-other" in res.table() and "Retain prompts" in res.table()
        assert res.records[0]["subject_other_prompts"] == [{"prompt": "Alice Morvan speaks", "target": "French"}]
        assert [r.text for r in res.retain] == ["Alice Morvan works for"] and isinstance(res.retain[0], RetainPrompt)
        assert res.edit.report.targets["n_retain"] == 1.0
    finally:
        res.edit.restore()
    with pytest.raises(ZuFastError, match="subject_other"):
        unl.forget(requests=REQUESTS[:1], subject_other=[("x",)])


def test_cli_unlearn_with_retain(tmp_path, capsys):
    """`zu-fast unlearn --retain FILE`: the edit is made with the retain set; a bad retain file is refused before
    the model is loaded (one line, exit 2)."""
    from zu_fast.cli import main

    model, tok = llama(layers=4, hidden=32, d_ff=48, seed=1)
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    (tmp_path / "req.jsonl").write_text("\n".join(json.dumps(r) for r in REQUESTS[:2]))
    (tmp_path / "corpus.txt").write_text("\n".join(corpus(60)))
    (tmp_path / "retain.jsonl").write_text("\n".join(json.dumps(r) for r in RETAIN[:2]) + '\n"Oslo is a city in"\n')
    (tmp_path / "cfg.json").write_text(json.dumps({**FAST, "layers": [0, 1], "method": "gd", "gd_steps": 5}))
    base = ["unlearn", "--model", tmp_path / "model", "--requests", tmp_path / "req.jsonl", "--corpus",
            tmp_path / "corpus.txt", "--config", tmp_path / "cfg.json", "--quiet", "--device", "cpu"]
    rc = main([str(a) for a in base + ["--retain", tmp_path / "retain.jsonl", "--fact-token", "last",
                                       "--out", tmp_path / "edit"]])
    assert rc == 0
    saved = zu_fast.Edit.load(tmp_path / "edit")
    assert saved.config.templates.fact_token == "last"
    assert all("gd_retain_final" in row for row in saved.report.layers.values())
    capsys.readouterr()
    (tmp_path / "bad.jsonl").write_text('{"prompt": "{} works for"}\n')
    rc = main([str(a) for a in base + ["--retain", tmp_path / "bad.jsonl", "--out", tmp_path / "edit2"]])
    err = capsys.readouterr().err
    assert rc == 2 and "bad.jsonl" in err and "no subject" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "edit2").exists()
    rc = main([str(a) for a in base + ["--retain", "subject", "--out", tmp_path / "edit3"]])
    assert rc == 2 and "retain_templates" in capsys.readouterr().err
