"""UnlearnConfig: presets, reference hparams keys, validation."""

from __future__ import annotations

import json
import types
import warnings
from pathlib import Path

import pytest

from zu_fast import UnlearnConfig, ZuFastError


def _mcfg(model_type, n, **kw):
    return types.SimpleNamespace(model_type=model_type, num_hidden_layers=n, **kw)


@pytest.mark.parametrize(
    "model_type,n,layers,module",
    [
        ("llama", 32, [19, 20, 21], "model.layers.{}.mlp.down_proj"),  # the paper's rule: ends at 21/32
        ("llama", 28, [16, 17, 18], "model.layers.{}.mlp.down_proj"),
        ("qwen2", 24, [14, 15, 16], "model.layers.{}.mlp.down_proj"),
        ("mistral", 32, [19, 20, 21], "model.layers.{}.mlp.down_proj"),
        ("gpt2", 12, [6, 7, 8], "transformer.h.{}.mlp.c_proj"),
    ],
)
def test_presets(model_type, n, layers, module):
    cfg = UnlearnConfig.for_model(_mcfg(model_type, n))
    assert cfg.layers == layers and cfg.locate.rewrite_module == module


PAPER_MODELS = {  # name → (model shape, the reference hparams file)
    "llama-3.1-8b-instruct": (dict(model_type="llama", num_hidden_layers=32, hidden_size=4096,
                                   intermediate_size=14336), "Llama-3.1-8B-Instruct.json"),
    "llama-3.2-3b-instruct": (dict(model_type="llama", num_hidden_layers=28, hidden_size=3072,
                                   intermediate_size=8192), "Llama-3.2-3B-Instruct.json"),
    "qwen3-4b": (dict(model_type="qwen3", num_hidden_layers=36, hidden_size=2560, intermediate_size=9728),
                 "Qwen3-4B.json"),
}
REF_HPARAMS = Path(__file__).parent / "fixtures" / "reference_hparams"


@pytest.mark.parametrize("name", sorted(PAPER_MODELS))
def test_reference_hparams_files_load_unchanged(name):
    """The authors' own hparams files (copied verbatim as fixtures) load, equal the named presets, and
    the keys no ZeroUnlearn code reads are named in one warning."""
    shape, fname = PAPER_MODELS[name]
    ref = json.loads((REF_HPARAMS / "ZeroUnlearn" / fname).read_text())
    with pytest.warns(UserWarning, match="no effect") as rec:
        cfg = UnlearnConfig.from_json(REF_HPARAMS / "ZeroUnlearn" / fname)
    msg = str(rec[0].message)
    for key in ("L2", "nullspace_threshold"):
        assert key in msg
    assert "retain_KKT_lam" not in msg  # zu_fast uses them with retain records (issue 24)
    assert cfg == UnlearnConfig.preset(name)
    assert cfg.method == "closed_form" and cfg.layers == ref["layers"]
    cf = cfg.closed_form
    assert (cf.corpus_weight_k, cf.corpus_weight_v) == (ref["wiki_KKT_lam"], ref["wiki_VKT_lam"])
    assert (cf.forget_weight_k, cf.forget_weight_v) == (ref["forget_KKT_lam"], ref["forget_VKT_lam"])
    assert cfg.closed_form.regularization == ref["regularization_lam"] != ref["L2"]  # L2 is not λ
    assert (cf.retain_weight_k, cf.retain_weight_v) == (ref["retain_KKT_lam"], ref["retain_VKT_lam"])
    assert cfg.targets.lr == ref["v_lr"] == 0.1 and cfg.targets.loss_layer == ref["v_loss_layer"]
    assert cfg.targets.clamp == ref["clamp_norm_factor"] and cfg.targets.kl_factor == ref["kl_factor"]
    assert not cfg.closed_form.centered_cross_moment
    # GD: the folder selects the variant; the file's 0.02 is ignored as by the reference (it hard-codes 0.01)
    with pytest.warns(UserWarning, match="hard-codes 0.01"):
        gd = UnlearnConfig.from_json(REF_HPARAMS / "ZeroUnlearn_DG" / fname)
    assert gd == UnlearnConfig.preset(name + "-gd")
    assert gd.method == "gd" and gd.gd.null_threshold == 0.01 and gd.gd.null_energy is None
    assert (gd.gd.lr, gd.gd.steps, gd.gd.tol) == (1e-3, 500, 0.0)
    # for_model recognises the model by its shape and gives the same settings
    assert UnlearnConfig.for_model(types.SimpleNamespace(**shape)) == cfg


def test_named_presets_all_load():
    names = UnlearnConfig.presets()
    assert {"llama-3.1-8b-instruct", "qwen3-4b", "mistral-7b", "qwen2.5-7b", "llama-3-70b", "zu-tiny"} <= set(names)
    for name, desc in names.items():
        assert desc, name
        UnlearnConfig.preset(name)
    assert UnlearnConfig.preset("llama-3-70b").layers == [51, 52, 53]  # 21/32 of 80 layers
    with pytest.raises(ZuFastError, match="no preset named 'llama-9'.*shipped presets"):
        UnlearnConfig.preset("llama-9")


def test_tiny_model_preset():
    cfg = UnlearnConfig.for_model(_mcfg("llama", 6, zu_fast_model="zu-tiny-llama"))
    assert cfg.layers == [1, 2, 3] and cfg.z_layer == 3
    assert cfg.method == "gd" and cfg.targets.clamp == 1.0 and cfg.gd.null_energy == 0.01
    assert cfg.representation.source == "clean"
    # an explicit choice still wins over the preset
    assert UnlearnConfig.for_model(_mcfg("llama", 6, zu_fast_model="zu-tiny-llama"), method="closed_form").method \
        == "closed_form"


def test_memit_style_keys(tmp_path):
    """MEMIT/AlphaEdit files name λ_w as mom2_update_weight; EasyEdit bookkeeping keys only warn."""
    ref = {"layers": [4, 5, 6], "v_lr": 0.5, "mom2_update_weight": 20000, "lm_head_module": "transformer.wte",
           "rewrite_module_tmp": "transformer.h.{}.mlp.c_proj", "layer_module_tmp": "transformer.h.{}",
           "stats_dir": "./data/stats", "device": 0, "mom2_adjustment": True}
    path = tmp_path / "hparams.json"
    path.write_text(json.dumps(ref))
    with pytest.warns(UserWarning, match="stats_dir"):
        cfg = UnlearnConfig.from_json(path)
    assert cfg.layers == [4, 5, 6] and cfg.closed_form.corpus_weight_k == cfg.closed_form.corpus_weight_v == 20000
    assert cfg.locate.lm_head == "transformer.wte"


def test_yaml_numbers_are_numbers(tmp_path):
    pytest.importorskip("yaml")
    path = tmp_path / "h.yaml"
    path.write_text("layers: [1, 2]\nv_lr: 1e-1\nmom2_n_samples: '1000'\n")  # YAML 1.1 reads 1e-1 as a string
    cfg = UnlearnConfig.from_json(path)
    assert cfg.targets.lr == 0.1 and isinstance(cfg.targets.lr, float) and cfg.stats.n_samples == 1000
    path.write_text("layers: [1, 2]\nv_lr: fast\n")
    with pytest.raises(ZuFastError, match="v_lr: expected a number"):
        UnlearnConfig.from_json(path)


def test_unsupported_reference_choices_are_refused():
    with pytest.raises(ZuFastError, match="fact_token.*subject_first.*choose one of"):
        UnlearnConfig.from_dict({"fact_token": "subject_first"})
    assert UnlearnConfig.from_dict({"fact_token": "last"}).templates.fact_token == "last"
    with pytest.raises(ZuFastError, match="layer_selection"):
        UnlearnConfig.from_dict({"layer_selection": "random"})


def test_unknown_keys_are_refused():
    with pytest.raises(ZuFastError, match="unknown config keys.*layerz"):
        UnlearnConfig.from_dict({"layerz": [1]})


def test_own_keys_load_without_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        UnlearnConfig.from_dict(UnlearnConfig(layers=[1, 2]).to_dict())


@pytest.mark.parametrize(
    "kw,match",
    [
        ({"layers": []}, "empty"),
        ({"layers": [3, 2]}, "increasing"),
        ({"closed_form": "magic"}, "closed_form"),
        ({"rewrite_module_tmp": "model.mlp"}, "must contain"),
        ({"batch_size": 0}, "positive"),
    ],
)
def test_validation(kw, match):
    with pytest.raises(ZuFastError, match=match):
        UnlearnConfig(**kw)


def test_json_roundtrip(tmp_path):
    cfg = UnlearnConfig(layers=[1, 2], neutral_target="I don't know.")
    cfg.save_json(tmp_path / "c.json")
    assert UnlearnConfig.from_json(tmp_path / "c.json") == cfg


@pytest.mark.parametrize("mcfg", [_mcfg("llama", 6, zu_fast_model="zu-tiny-llama"), _mcfg("qwen2", 24)])
def test_untuned_models_get_the_leverage_rule_and_gd_the_target_retry(mcfg):
    gd = UnlearnConfig.for_model(mcfg, method="gd")
    cf = UnlearnConfig.for_model(mcfg, method="closed_form")
    assert gd.closed_form.forget_leverage == cf.closed_form.forget_leverage == 0.7
    assert gd.targets.retry_clamp == 2.0 and cf.targets.retry_clamp is None  # GD only (RESULTS.md)
    assert UnlearnConfig.for_model(mcfg, method="closed_form", target_retry_clamp=3.0).targets.retry_clamp == 3.0


@pytest.mark.parametrize("name", sorted(PAPER_MODELS))
def test_paper_presets_keep_the_reference_weights_and_single_target_run(name):
    shape, _ = PAPER_MODELS[name]
    for cfg in (UnlearnConfig.preset(name), UnlearnConfig.for_model(types.SimpleNamespace(**shape)),
                UnlearnConfig.preset(name + "-gd")):
        assert cfg.closed_form.forget_leverage is None and cfg.targets.retry_clamp is None
    assert UnlearnConfig.preset(name).closed_form.forget_weight_k == 50.0


def test_overrides_win_over_the_preset_flat_or_as_sections():
    """A preset's flat keys never override what the caller gives as a section (or flat)."""
    cfg = UnlearnConfig.preset("zu-tiny", closed_form={"forget_leverage": 0.9}, targets={"steps": 7}, v_lr=0.3)
    assert cfg.closed_form.forget_leverage == 0.9 and cfg.targets.steps == 7 and cfg.targets.lr == 0.3
    assert cfg.gd.null_energy == 0.01 and cfg.layers == [1, 2, 3]  # the rest of the preset stays
    cfg = UnlearnConfig.for_model(_mcfg("llama", 12), gd={"null_energy": 0.05}, forget_leverage=0.6)
    assert cfg.gd.null_energy == 0.05 and cfg.closed_form.forget_leverage == 0.6
