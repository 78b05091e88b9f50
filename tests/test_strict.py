"""Issue 26, item 6: strict mode, the hard limit on a layer's change, and gaps reported as what they are.

Every case hashes every parameter and buffer before and after: a refused edit leaves the model bit-identical and
off the edit stack; an allowed one is applied, flagged, and restored bit-exact.
"""

from __future__ import annotations

import copy
import importlib
import warnings

import pytest
from family_models import build
from tiny_models import REQUESTS, corpus, llama, param_hashes, tokenizer

import zu_fast
from zu_fast import UnlearnConfig, UnsafeEditError

unlearn_module = importlib.import_module("zu_fast.method.unlearn")  # (zu_fast.method.unlearn is also the function)
TEMPLATES = [["{}"], ["Because I. {}"]]
FAST = dict(progress=False, v_num_grad_steps=3, original_representation="clean")


class Env:
    def __init__(self) -> None:
        self.model, self.tok = llama()
        # the reference's absolute step: on this random model the scale-free one reaches farther targets, which
        # the closed form's projector turns into a move away from them (flagged; test_moving_away_...)
        self.cfg = UnlearnConfig.for_model(self.model, layers=[1, 2], targets={"lr_relative": False}, **FAST)
        self.stats = zu_fast.collect_stats(self.model, self.tok, corpus(40), self.cfg, cache=False)
        # a model with a norm after its MLP output (OLMo 2): on random weights the edit wrecks the layer
        self.post_norm = build("olmo2")
        self.pn_cfg = UnlearnConfig.for_model(self.post_norm, **FAST, stats_batch_tokens=512)
        self.pn_stats = zu_fast.collect_stats(self.post_norm, tokenizer(), corpus(24), self.pn_cfg, cache=False)


@pytest.fixture(scope="module")
def env() -> Env:
    return Env()


def _llama(cfg_change=None, strict=None):
    def setup(e: Env):
        model = copy.deepcopy(e.model)
        cfg = e.cfg.replace(**(cfg_change or {}))
        return model, lambda: zu_fast.unlearn(model, e.tok, REQUESTS, cfg, stats=e.stats, context_templates=TEMPLATES,
                                              strict=strict)
    return setup


def _post_norm(cfg_change=None, strict=None):
    def setup(e: Env):
        model = copy.deepcopy(e.post_norm)
        cfg = e.pn_cfg.replace(**(cfg_change or {}))
        return model, lambda: zu_fast.unlearn(model, tokenizer(), REQUESTS[:2], cfg, stats=e.pn_stats,
                                              context_templates=TEMPLATES, strict=strict)
    return setup


def _no_problems(monkeypatch):
    """No component problem at any layer (as when every subject token goes to an expert that computes nothing)."""
    monkeypatch.setattr(unlearn_module.DenseLayers, "problems", lambda self, *a, **kw: [])


def _nan_solve(monkeypatch):
    real = unlearn_module._solve

    def solve(*a, **kw):
        factor, info = real(*a, **kw)
        factor = factor.clone()
        factor[0, 0] = float("nan")
        return factor, info

    monkeypatch.setattr(unlearn_module, "_solve", solve)


# name → (setup, extra monkeypatching or None, message pattern, flag kinds the report must carry)
STRICT = r"strict: refusing the edit, it was flagged "
REFUSED = {
    "strict_api_argument": (_llama(strict=True), None, STRICT + ".*target_not_converged", {"target_not_converged"}),
    "strict_config_field": (_llama({"strict": True}), None, STRICT, {"target_not_converged"}),
    "strict_argument_overrides_the_config": (_llama({"strict": False}, strict=True), None, STRICT,
                                             {"target_not_converged"}),
    "beyond_the_hard_limit_without_strict": (
        _llama({"max_rel_weight_change": 0.01}), None,
        r"refusing the edit: it moved model\.layers\.1\.mlp\.down_proj by .* beyond the hard limit 0\.1 "
        r"\(hard_limit_multiple=10 × max_rel_weight_change=0\.01\).*allow_large_change=True", {"large_weight_change"}),
    "hard_limit_multiple_setting": (_llama({"max_rel_weight_change": 0.1, "hard_limit_multiple": 1.0}), None,
                                    r"beyond the hard limit 0\.1 \(hard_limit_multiple=1 ×", {"large_weight_change"}),
    "non_finite_change": (_llama(), _nan_solve, r"beyond the hard limit", {"large_weight_change"}),
    "strict_refuses_an_edit_that_changed_nothing": (_llama(strict=True), _no_problems, STRICT + ".*nothing_edited",
                                                    {"nothing_edited"}),
    "strict_refuses_moving_away_from_the_targets": (_post_norm(strict=True), None,
                                                    STRICT + ".*moved_away_from_targets", {"moved_away_from_targets"}),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_refused_edits_put_every_weight_back_and_carry_the_report(env, case, monkeypatch):
    setup, patch, match, kinds = REFUSED[case]
    if patch is not None:
        patch(monkeypatch)
    model, action = setup(env)
    before = param_hashes(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(UnsafeEditError, match=match) as err:
            action()
    assert param_hashes(model) == before
    assert zu_fast.edits(model) == []
    assert isinstance(err.value, zu_fast.ZuFastError)
    assert kinds <= {f["kind"] for f in err.value.report.flags}


ALLOWED = {
    "flagged_but_not_strict": (_llama(), {"target_not_converged"}),
    "large_change_allowed": (_llama({"max_rel_weight_change": 0.01, "allow_large_change": True}),
                             {"large_weight_change"}),
    "moving_away_allowed": (_post_norm(), {"moved_away_from_targets"}),
}


def test_an_edit_that_changed_nothing_says_so(env, monkeypatch):
    _no_problems(monkeypatch)
    model, action = _llama()(env)
    before = param_hashes(model)
    with pytest.warns(UserWarning, match="the edit changed no weight"):
        edit = action()
    assert edit.factors == {} and "nothing_edited" in {f["kind"] for f in edit.report.flags}
    edit.restore()
    assert param_hashes(model) == before


@pytest.mark.parametrize("case", sorted(ALLOWED))
def test_allowed_edits_are_applied_flagged_and_restored(env, case):
    setup, kinds = ALLOWED[case]
    model, action = setup(env)
    before = param_hashes(model)
    with pytest.warns(UserWarning):
        edit = action()
    got = {f["kind"] for f in edit.report.flags}
    assert kinds <= got
    assert param_hashes(model) != before
    edit.restore()
    assert param_hashes(model) == before


def test_moving_away_is_reported_as_what_it_is(env):
    """A negative gap is its own flag with the distances, never "only −256% of the way" (issue 26)."""
    model, action = _post_norm()(env)
    with pytest.warns(UserWarning, match="away from the targets instead of towards them") as rec:
        edit = action()
    gap = edit.report.targets["z_gap_closed"]
    assert gap < 0
    flag = next(f for f in edit.report.flags if f["kind"] == "moved_away_from_targets")
    assert flag["distance_after"] > flag["distance_before"] > 0 and flag["z_gap_closed"] == gap
    assert "target_not_reached" not in {f["kind"] for f in edit.report.flags}
    assert not any("of the way" in str(w.message) for w in rec)
    edit.restore()


def test_strict_passes_a_clean_edit(env):
    """strict changes nothing when nothing is flagged."""
    model = copy.deepcopy(env.model)
    cfg = env.cfg.replace(target_warn_loss=1e9, min_gap_closed=-1e9, max_rel_weight_change=1e9)  # nothing flags
    before = param_hashes(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        edit = zu_fast.unlearn(model, env.tok, REQUESTS, cfg, stats=env.stats, context_templates=TEMPLATES,
                               strict=True)
    assert edit.report.flags == [] and zu_fast.edits(model) == [edit]
    edit.restore()
    assert param_hashes(model) == before


@pytest.mark.parametrize("bad", [{"strict": "yes"}, {"allow_large_change": 1}, {"hard_limit_multiple": 0.5}])
def test_safety_settings_are_validated(bad):
    with pytest.raises(zu_fast.ZuFastError, match="config.safety"):
        UnlearnConfig(**bad)


def test_settings_round_trip_through_flat_keys(tmp_path):
    cfg = UnlearnConfig(strict=True, allow_large_change=True, hard_limit_multiple=4.0)
    assert (cfg.safety.strict, cfg.safety.allow_large_change, cfg.safety.hard_limit_multiple) == (True, True, 4.0)
    cfg.save_json(tmp_path / "c.json")
    again = UnlearnConfig.from_json(tmp_path / "c.json")
    assert again.safety == cfg.safety


# ------------------------------------------------------------------ the command line ------------------
@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    import json

    root = tmp_path_factory.mktemp("strict_cli")
    model, tok = llama()
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    (root / "req.jsonl").write_text("\n".join(json.dumps(r) for r in REQUESTS) + "\n")
    (root / "cfg.json").write_text(json.dumps({"layers": [1, 2], "v_num_grad_steps": 2,
                                               "original_representation": "clean"}))
    (root / "tiny_limit.json").write_text(json.dumps({"layers": [1, 2], "v_num_grad_steps": 2,
                                                      "original_representation": "clean",
                                                      "max_rel_weight_change": 0.001}))
    zu_fast.collect_stats(model, tok, corpus(40), UnlearnConfig(layers=[1, 2], progress=False),
                          cache_path=str(root / "stats"))
    return root


def _files(p):
    import hashlib

    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(p.iterdir())}


@pytest.mark.parametrize("flags,config,code,says", [
    (["--strict"], "cfg.json", 2, r"strict: refusing the edit, it was flagged .*target_not_converged"),
    ([], "tiny_limit.json", 2, r"beyond the hard limit 0\.01 .*--allow-large-change"),
    (["--allow-large-change"], "tiny_limit.json", 0, None),
], ids=["strict", "hard_limit", "allow_large_change"])
def test_command_line_strict_and_allow_large_change(folder, tmp_path, capsys, flags, config, code, says):
    import re

    from zu_fast.cli import main

    before = _files(folder / "model")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = main([str(a) for a in ["unlearn", "--model", folder / "model", "--requests", folder / "req.jsonl",
                                     "--stats", folder / "stats", "--config", folder / config, "--out",
                                     tmp_path / "edit", "--quiet", *flags]])
    err = capsys.readouterr().err
    assert got == code, err
    if says is not None:
        lines = err.strip().splitlines()
        assert len(lines) == 1 and re.search(says, lines[0]), err
        assert not (tmp_path / "edit").exists()  # nothing saved
    else:
        assert (tmp_path / "edit" / "edit.json").exists()
    assert _files(folder / "model") == before
