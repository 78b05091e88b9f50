"""Issue 26, item 4: fingerprints of every dtype, and a representative subset of the family sweep.

``benchmarks/family_sweep.py`` runs every causal-LM family transformers ships (for_model → collect_stats → unlearn →
restore on a tiny random model, or a ZuFastError with the weights unchanged) and records the outcome of each in
``benchmarks/results/family_sweep.json`` (the README's table). Here a subset that covers every code path and every
kind of outcome runs again and must give the recorded outcome: a family that starts failing, or starts working, is
seen in CI. (``run_family`` hashes every parameter and buffer before and after.)
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from all_families import run_family
from tiny_models import REQUESTS, corpus, llama

import zu_fast
from zu_fast.model import model_fingerprint, tensor_fingerprint

SWEEP = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "family_sweep.json"

# family → why it is in the subset
SUBSET = {
    "gpt_bigcode": "a bool buffer (the fingerprint used to fail on it)",
    "gpt_neo": "bool buffers inside the edited layers (in the statistics fingerprint)",
    "bloom": "no preset: modules found by name (transformer.h.N.mlp.dense_4h_to_h)",
    "starcoder2": "no preset: c_proj with a bias",
    "recurrent_gemma": "no preset: the MLP is called mlp_block",
    "glm4_moe": "MoE whose first layer is dense: the MoE block's name is found on a later layer",
    "ernie4_5_moe": "MoE with a shared expert, no preset",
    "deepseek_v2": "multi-head latent attention + MoE",
    "jamba": "hybrid Mamba/attention with MoE feed_forward",
    "olmo3": "a norm after the MLP: the residual is mapped through it into the module's output space",
    "hyperclovax": "a layer still moved beyond the hard limit: refused, the weights put back",
    "qwen4_exp_text": "several residual streams: refused before any change",
    "llama4_text": "an MoE call zu_fast cannot read: refused at the first statistics batch",
    "bert": "an encoder: refused by for_model",
    "mamba": "no MLP in its layers: refused by for_model",
    "jetmoe": "the MoE block is not named like the dense MLP: refused by for_model",
}


@pytest.fixture(scope="module")
def recorded() -> dict[str, dict]:
    data = json.loads(SWEEP.read_text())
    return {r["family"]: r for r in data["rows"]}


@pytest.mark.parametrize("family", sorted(SUBSET))
def test_family_outcome_is_the_recorded_one(recorded, family):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        row = run_family(family)
    want = recorded[family]
    assert row["outcome"] != "error", row
    assert (row["outcome"], row["stage"]) == (want["outcome"], want["stage"]), (row, want)
    if row["outcome"] == "ok":
        assert row["module"] == want["module"] and row["layers"] == want["layers"]


def test_the_sweep_covers_every_causal_family_and_has_no_errors(recorded):
    from all_families import causal_families

    assert set(recorded) == set(causal_families())
    assert not [f for f, r in recorded.items() if r["outcome"] == "error"]


# ------------------------------------------------------------------ fingerprints of every dtype ------
DTYPES = [torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.float16, torch.bfloat16,
          torch.float32, torch.float64, torch.complex64, torch.complex128]
DTYPES += [getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz",
                                       "float8_e8m0fnu", "uint16", "uint32", "uint64") if hasattr(torch, n)]


def _sample(dtype: torch.dtype, n: int = 5000) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    if dtype == torch.bool:
        return torch.rand(n, generator=g) > 0.5
    if dtype.is_complex:
        return torch.randn(n, generator=g, dtype=dtype)
    if dtype.is_floating_point:
        return (torch.randn(n, generator=g) * 2).to(dtype)
    return torch.randint(0, 100, (n,), generator=g).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_every_dtype_has_a_fingerprint_that_sees_one_changed_element(dtype):
    t = _sample(dtype)
    assert tensor_fingerprint(t) == tensor_fingerprint(t.clone())
    for i in (0, 1234, t.numel() - 1):  # sampled or not: the sums see it
        u = t.clone()
        if dtype == torch.bool:
            u[i] = ~u[i]
        elif dtype.is_complex:
            u[i] = u[i] + 1j  # only the imaginary part changes
        else:
            u.view(torch.uint8)[i * t.element_size()] ^= 1  # one bit of element i
        assert tensor_fingerprint(u) != tensor_fingerprint(t), (dtype, i)
    assert tensor_fingerprint(t.reshape(50, 100)) != tensor_fingerprint(t)  # the shape is part of it


def test_float_and_int_fingerprints_are_unchanged():
    """Caches and saved edits carry fingerprints of float and int weights: their value must not have changed."""
    import hashlib

    t = torch.arange(12, dtype=torch.float32).reshape(3, 4) / 7
    h = hashlib.sha256()  # the algorithm before issue 26, spelled out
    h.update(f"{tuple(t.shape)}|{t.dtype}|".encode())
    flat = t.reshape(-1)
    idx = torch.linspace(0, flat.numel() - 1, min(4096, flat.numel())).long()
    h.update(flat[idx].to(torch.float64).numpy().tobytes())
    h.update(torch.stack([flat.sum(dtype=torch.float64), flat.abs().sum(dtype=torch.float64)]).numpy().tobytes())
    assert tensor_fingerprint(t) == h.hexdigest()
    i = torch.arange(12, dtype=torch.int64)
    assert tensor_fingerprint(i) != tensor_fingerprint(i.float())


def test_a_model_with_bool_fp8_and_complex_buffers_in_its_edited_layers(tmp_path):
    """Buffers of every kind inside the layers the statistics fingerprint covers: statistics, unlearn, restore."""
    model, tok = llama()
    layer = model.model.layers[1]
    layer.register_buffer("mask", torch.ones(4, 4, dtype=torch.bool))
    layer.register_buffer("scale_fp8", torch.ones(8).to(torch.float8_e4m3fn))
    layer.register_buffer("phase", torch.ones(8, dtype=torch.complex64))
    cfg = zu_fast.UnlearnConfig(layers=[1, 2], progress=False, v_num_grad_steps=2, original_representation="clean")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fp = model_fingerprint(model)
    stats = zu_fast.collect_stats(model, tok, corpus(24), cfg, cache_path=str(tmp_path / "st"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        edit = zu_fast.unlearn(model, tok, REQUESTS, cfg, stats=stats, context_templates=[["{}"]])
    edit.restore()
    assert all(torch.equal(v.view(torch.uint8), before[k].view(torch.uint8)) if v.dtype != torch.bool
               else torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert model_fingerprint(model) == fp
    with torch.no_grad():
        layer.mask[0, 0] = False  # a buffer the statistics depend on changed: the cache no longer matches
    with pytest.raises(zu_fast.StaleStatsError):
        zu_fast.collect_stats(model, tok, corpus(24), cfg, cache_path=str(tmp_path / "st"))
