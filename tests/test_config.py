"""UnlearnConfig: presets, reference hparams keys, validation."""

from __future__ import annotations

import json
import types

import pytest

from zu_fast import UnlearnConfig, ZuFastError


def _mcfg(model_type, n, **kw):
    return types.SimpleNamespace(model_type=model_type, num_hidden_layers=n, **kw)


@pytest.mark.parametrize(
    "model_type,n,layers,module",
    [
        ("llama", 32, [19, 20, 21], "model.layers.{}.mlp.down_proj"),  # Llama-3.1-8B, reference layers
        ("llama", 28, [16, 17, 18], "model.layers.{}.mlp.down_proj"),  # Llama-3.2-3B
        ("qwen3", 36, [9, 10, 11], "model.layers.{}.mlp.down_proj"),  # Qwen3-4B
        ("qwen2", 24, [14, 15, 16], "model.layers.{}.mlp.down_proj"),
        ("mistral", 32, [19, 20, 21], "model.layers.{}.mlp.down_proj"),
        ("gpt2", 12, [6, 7, 8], "transformer.h.{}.mlp.c_proj"),
    ],
)
def test_presets(model_type, n, layers, module):
    cfg = UnlearnConfig.for_model(_mcfg(model_type, n))
    assert cfg.layers == layers and cfg.rewrite_module_tmp == module


def test_tiny_model_preset():
    cfg = UnlearnConfig.for_model(_mcfg("llama", 6, zu_fast_model="zu-tiny-llama"))
    assert cfg.layers == [1, 2, 3] and cfg.z_layer == 3
    assert cfg.method == "gd" and cfg.clamp_norm_factor == 1.0 and cfg.gd_null_energy == 0.01
    assert cfg.original_representation == "clean"
    # an explicit choice still wins over the preset
    assert UnlearnConfig.for_model(_mcfg("llama", 6, zu_fast_model="zu-tiny-llama"), method="closed_form").method \
        == "closed_form"


def test_reference_hparams_keys(tmp_path):
    ref = {
        "layers": [4, 5, 6], "clamp_norm_factor": 0.75, "layer_selection": "all", "fact_token": "subject_last",
        "v_num_grad_steps": 25, "v_lr": 0.5, "v_loss_layer": 31, "v_weight_decay": 0.5, "kl_factor": 0.0625,
        "mom2_adjustment": True, "mom2_update_weight": 15000, "rewrite_module_tmp": "model.layers.{}.mlp.down_proj",
        "layer_module_tmp": "model.layers.{}", "mlp_module_tmp": "model.layers.{}.mlp",
        "attn_module_tmp": "model.layers.{}.self_attn", "ln_f_module": "model.norm", "lm_head_module": "lm_head",
        "mom2_dataset": "wikipedia", "mom2_n_samples": 100000, "mom2_dtype": "float32", "L2": 1,
    }
    path = tmp_path / "hparams.json"
    path.write_text(json.dumps(ref))
    with pytest.warns(UserWarning, match="no effect"):
        cfg = UnlearnConfig.from_json(path)
    assert cfg.layers == [4, 5, 6] and cfg.mom2_update_weight_wk == cfg.mom2_update_weight_wv == 15000
    assert cfg.regularization_lam == 1


def test_unknown_keys_are_refused():
    with pytest.raises(ZuFastError, match="unknown config keys.*layerz"):
        UnlearnConfig.from_dict({"layerz": [1]})


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
