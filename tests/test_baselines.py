"""Baselines (GA, NPO, FT, MEMIT-style, AlphaEdit) on a tiny random Llama: they act, touch only what they
should, do what their objective says, and restore bit for bit."""

from __future__ import annotations

import pytest
import torch
from tiny_models import REQUESTS, corpus, llama

import zu_fast
from zu_fast.eval import baselines
from zu_fast.eval.baselines import BaselineHParams, run_baseline
from zu_fast.method.gd import null_basis, null_basis_for
from zu_fast.metrics import encode_continuations, score_continuations


@pytest.fixture(scope="module")
def setup():
    old = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: thread start-up dominates on a shared machine
    model, tok = llama(layers=4, hidden=32, d_ff=48)
    cfg = zu_fast.UnlearnConfig(layers=[1, 2], v_num_grad_steps=5, context_template_length=3, progress=False,
                                gd_null_threshold=1e-1)
    stats = zu_fast.collect_stats(model, tok, corpus(40), cfg, cache=False)
    yield model, tok, cfg, stats
    torch.set_num_threads(old)


def test_alphaedit_follows_the_gd_null_space_rule(setup):
    """With gd_null_energy set, AlphaEdit's projector is GD's (the same null space in a comparison)."""
    model, tok, cfg, stats = setup
    cfg_e = cfg.replace(gd_null_energy=0.05)
    edit = run_baseline("alphaedit", model, tok, REQUESTS[:2], cfg_e, stats)
    try:
        for layer in (1, 2):
            nb, _ = null_basis_for(stats[layer], cfg_e, dtype=torch.float64)
            assert edit.report[f"null_rank_{layer}"] == nb.null_rank
            assert nb.null_rank != null_basis(stats[layer], cfg.gd.null_threshold)[0].null_rank
    finally:
        edit.restore()


def _mean_lp(model, tok, pairs):
    _, lp = score_continuations(model, encode_continuations(tok, pairs), pad_id=tok.pad_token_id)
    return float(lp.mean())


def _snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _check_restore(model, edit, before, allowed):
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert changed, "the baseline changed nothing"
    assert all(any(a in n for a in allowed) for n in changed), changed
    assert all(n.split(".")[2] in ("1", "2") for n in changed), changed  # only the edited layers
    edit.restore()
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n


HP = BaselineHParams(lr=1e-2, epochs=3)  # a random tiny model needs a big step to move visibly


def test_gradient_ascent_lowers_true_answer(setup):
    model, tok, cfg, stats = setup
    pairs = [(r["prompt"].format(r["subject"]), r["target_true"] if isinstance(r["target_true"], str)
              else r["target_true"]["str"]) for r in REQUESTS]
    before, lp0 = _snapshot(model), _mean_lp(model, tok, pairs)
    edit = run_baseline("ga", model, tok, REQUESTS, cfg, stats, hparams=HP)
    assert _mean_lp(model, tok, pairs) < lp0 - 0.1
    assert edit.report["steps"] == 3
    _check_restore(model, edit, before, ("mlp.",))
    assert all(not p.requires_grad or p.grad is None for p in model.parameters())


def test_npo_lowers_true_answer_and_is_bounded(setup):
    model, tok, cfg, stats = setup
    pairs = [(r["prompt"].format(r["subject"]), str(r["target_true"].get("str") if isinstance(r["target_true"], dict)
              else r["target_true"])) for r in REQUESTS]
    before, lp0 = _snapshot(model), _mean_lp(model, tok, pairs)
    edit = run_baseline("npo", model, tok, REQUESTS, cfg, stats, hparams=HP)
    # NPO's loss starts at (2/β) log 2 (π = π_ref) and decreases
    assert abs(edit.report["loss_first"] - 2 / HP.npo_beta * torch.log(torch.tensor(2.0)).item()) < 1e-3
    assert edit.report["loss_last"] < edit.report["loss_first"]
    assert _mean_lp(model, tok, pairs) < lp0
    _check_restore(model, edit, before, ("mlp.",))


def test_finetune_raises_neutral_target(setup):
    model, tok, cfg, stats = setup
    pairs = [(r["prompt"].format(r["subject"]), None) for r in REQUESTS]  # None = EOS, the neutral target
    before, lp0 = _snapshot(model), _mean_lp(model, tok, pairs)
    edit = baselines.finetune_neutral(model, tok, REQUESTS, cfg, stats, hparams=HP)
    assert _mean_lp(model, tok, pairs) > lp0 + 0.1
    _check_restore(model, edit, before, ("mlp.",))


def test_train_params_down_only(setup):
    model, tok, cfg, stats = setup
    before = _snapshot(model)
    edit = run_baseline("ga", model, tok, REQUESTS, cfg, stats, hparams=BaselineHParams(lr=1e-2, epochs=1,
                                                                                          train_params="down"))
    assert set(edit.params) == {"model.layers.1.mlp.down_proj.weight", "model.layers.2.mlp.down_proj.weight"}
    _check_restore(model, edit, before, ("down_proj",))


@pytest.mark.parametrize("method", ["memit", "alphaedit"])
def test_key_value_edits(setup, method):
    model, tok, cfg, stats = setup
    before = _snapshot(model)
    edit = run_baseline(method, model, tok, REQUESTS, cfg, stats)
    for layer in (1, 2):
        name = f"model.layers.{layer}.mlp.down_proj.weight"
        dW = (dict(model.named_parameters())[name].detach().double() - before[name].double())  # [d, d_in]
        assert dW.norm() > 0
        if method == "alphaedit":  # the update lives in the null space of C: ΔW P = ΔW
            nb, _ = null_basis(stats[layer], cfg.gd.null_threshold, dtype=torch.float64)
            P = nb.dense()
            assert (dW @ P - dW).norm() <= 1e-5 * dW.norm() + 1e-7
            assert edit.report[f"null_rank_{layer}"] == nb.null_rank
    _check_restore(model, edit, before, ("down_proj",))


def test_memit_solves_its_normal_equations():
    """The MEMIT-style update is the least-squares solution: ΔW (λC + KKᵀ) = R Kᵀ, checked on the formula."""
    g = torch.Generator().manual_seed(0)
    d, d_in, N, lam = 6, 10, 3, 15.0
    keys = torch.randn(50, d_in, generator=g, dtype=torch.float64)
    C = keys.t() @ keys / 50
    K = torch.randn(d_in, N, generator=g, dtype=torch.float64)
    R = torch.randn(d, N, generator=g, dtype=torch.float64)
    X = torch.linalg.solve(lam * C + K @ K.t(), K)
    dW = R @ X.t()
    assert torch.allclose(dW @ (lam * C + K @ K.t()), R @ K.t(), atol=1e-10)


def test_unknown_baseline(setup):
    model, tok, cfg, stats = setup
    with pytest.raises(zu_fast.ZuFastError, match="unknown baseline"):
        run_baseline("nope", model, tok, REQUESTS, cfg, stats)
    with pytest.raises(zu_fast.ZuFastError, match="statistics"):
        run_baseline("memit", model, tok, REQUESTS, cfg, None)


def test_harness_end_to_end_on_a_tiny_world(tmp_path, monkeypatch):
    """`zu-fast eval` plumbing on a tiny random model and a small world: every file, every row, restore checked."""
    import json

    from zu_fast.eval import harness, tinylm
    from zu_fast.eval.synthetic import WorldConfig, make_world

    monkeypatch.setenv("ZU_FAST_CACHE", str(tmp_path / "cache"))
    model, tok = llama(layers=4, hidden=32, d_ff=48)
    world = make_world(WorldConfig(n_people=8, n_filler_train=40, n_filler_heldout=8, n_neighbors=2))
    monkeypatch.setattr(tinylm, "load_or_train", lambda **kw: (model, tok, world))
    monkeypatch.setattr(tinylm, "load_meta", lambda *a, **kw: None)
    out = tmp_path / "out"
    old = torch.get_num_threads()
    try:
        rc = harness.main(["--methods", "gd,ga", "--n", "1,50", "--seeds", "0,1",
                           "--out", str(out), "--gd-steps", "10", "--quiet", "--threads", "1",
                           "--baseline-lr", "3e-3", "--baseline-epochs", "2"])
    finally:
        torch.set_num_threads(old)
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    assert res["skipped_n"] == [50]  # 8 people: at most 4 forget records
    assert {(a["method"], a["n"]) for a in res["aggregates"]} == {(m, 1) for m in ("base", "gd", "ga")}
    assert len(res["runs"]) == 6 and all("error" not in r for r in res["runs"])
    base = next(a for a in res["aggregates"] if a["method"] == "base")
    assert base["seconds"] == 0.0 and base["perplexity"] > 1
    md = (out / "results.md").read_text()
    assert "| 1 | gd |" in md and "±" in md and "Skipped n=[50]" in md
    # the baselines ran with the requested hyperparameters, and the table says so
    assert res["meta"]["baseline_hparams"]["lr"] == 3e-3 and res["meta"]["baseline_hparams"]["epochs"] == 2
    ga = [r for r in res["runs"] if r["method"] == "ga"]
    assert all(r["report"]["hparams"]["lr"] == 3e-3 and r["report"]["hparams"]["epochs"] == 2 for r in ga)
    assert "lr 0.003, 2 epochs" in md
    assert (out / "results.png").stat().st_size > 1000


def test_sweep_plot_keeps_one_colour_per_method(tmp_path, monkeypatch):
    """The time panel leaves out base; the other methods must keep their colours there."""
    pytest.importorskip("matplotlib")
    from matplotlib.colors import to_hex
    from matplotlib.figure import Figure

    from zu_fast.eval import harness

    figs = []
    monkeypatch.setattr(Figure, "savefig", lambda self, *a, **kw: figs.append(self))
    keys = ["efficacy", "generalization", "specificity", "perplexity", "seconds"]
    aggs = [{"method": m, "n": n, **{k: 1.0 + n for k in keys}, **{k + "_std": 0.1 for k in keys}}
            for m in ("base", "gd", "zeroUnlearn") for n in (10, 20)]
    harness.plot_sweep(aggs, tmp_path / "sweep.png")
    (fig,) = figs
    # errorbar() labels its container; the container's first line is the data line
    colours = [{c.get_label(): to_hex(c.lines[0].get_color()) for c in ax.containers} for ax in fig.axes]
    assert "base" not in colours[-1] and set(colours[0]) == {"base", "gd", "zeroUnlearn"}
    for panel in colours:
        for m, c in panel.items():
            assert c == colours[0][m], (m, panel)
