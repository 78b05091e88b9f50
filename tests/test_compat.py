"""Drop-in MEMIT/ROME ``layer_stats`` and their ``.npz`` statistics files."""

from __future__ import annotations

import struct

import numpy as np
import pytest
import torch
from tiny_models import REQUESTS, corpus, llama

import zu_fast
from zu_fast import UnlearnConfig, ZuFastError
from zu_fast.compat import layer_stats
from zu_fast.stats.npz import corpus_stats_from_npz, load_npz_stats, save_npz_stats

LAYER = "model.layers.2.mlp.down_proj"
NULL = np.array(struct.unpack(">d", struct.pack(">Q", 0xFFF8000000000002))[0])  # runningstats' boxed None


def _keys(model, tok, texts, name=LAYER) -> torch.Tensor:
    """Every key (input of ``name``) over the texts, one text at a time, float64   [n, d_in]."""
    got = []
    h = model.get_submodule(name).register_forward_hook(lambda m, a, o: got.append(a[0][0].double()))
    with torch.no_grad():
        for t in texts:
            model(**tok(t, return_tensors="pt"))
    h.remove()
    return torch.cat(got)


def _memit_npz(path, K: torch.Tensor, with_mean: bool = True, mean_count: int | None = None):
    """A file laid out as runningstats' CombinedStat(mom2=SecondMoment(), mean=Mean()) saves it."""
    out = {"mom2.constructor": np.array("util.runningstats.SecondMoment()"), "mom2.count": np.array(K.shape[0]),
           "mom2.mom2": (K.t() @ K).float().numpy(), "sample_size": NULL}
    if with_mean:
        out |= {"mean.constructor": np.array("util.runningstats.Mean()"),
                "mean.count": np.array(mean_count or K.shape[0]), "mean.batchcount": np.array(3),
                "mean.mean": K.mean(0).float().numpy(), "mean.data_shape": np.array([K.shape[1]])}
    np.savez(path, **out)


def test_layer_stats_matches_the_runningstats_definitions_and_caches(tmp_path):
    model, tok = llama()
    texts = corpus(24)
    K = _keys(model, tok, texts)
    stat = layer_stats(model, tok, LAYER, tmp_path, texts, ["mom2", "mean"], precision="float64", progress=None)
    assert stat.mom2.count == K.shape[0] == stat.mean.count
    assert stat.mom2.moment().dtype == torch.float64 and stat.mom2.moment().shape == (48, 48)
    assert torch.allclose(stat.mom2.moment(), K.t() @ K / K.shape[0], rtol=1e-5, atol=1e-7)
    assert torch.allclose(stat.mean.mean(), K.mean(0), rtol=1e-6, atol=1e-8)
    assert stat.path and "model.layers.2.mlp.down_proj_float64_mean-mom2" in stat.path
    with pytest.raises(AttributeError):
        stat.norm_mean  # noqa: B018  (not requested, not provided)
    # from the cache the second time (same numbers); force_recompute recollects
    again = layer_stats(model, tok, LAYER, tmp_path, texts, ["mom2", "mean"], precision="float64", progress=None)
    assert torch.equal(again.mom2.moment(), stat.mom2.moment())
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight.mul_(1.1)
    with pytest.raises(zu_fast.StaleStatsError):  # other weights, same file: never used silently
        layer_stats(model, tok, LAYER, tmp_path, texts, ["mom2", "mean"], precision="float64", progress=None)
    fresh = layer_stats(model, tok, LAYER, tmp_path, texts, ["mom2", "mean"], precision="float64", progress=None,
                        force_recompute=True)
    assert not torch.allclose(fresh.mom2.moment(), stat.mom2.moment())
    # their state_dict layout, loadable by our importer
    sd = stat.state_dict()
    assert {"mom2.mom2", "mom2.count", "mean.mean", "mean.count", "mom2.constructor"} <= set(sd)


def test_layer_stats_refuses_downloads_and_unknown_statistics(tmp_path):
    model, tok = llama()
    with pytest.raises(ZuFastError, match="never downloads"):
        layer_stats(model, tok, LAYER, tmp_path, "wikipedia", ["mom2"], download=True)
    with pytest.raises(ZuFastError, match="norm_mean"):
        layer_stats(model, tok, LAYER, tmp_path, ["a b c"], ["mom2", "norm_mean"])
    with pytest.raises(ZuFastError, match="no layer index"):
        layer_stats(model, tok, "lm_head", tmp_path, ["a b c"], ["mom2"])


def test_layer_stats_imports_an_existing_memit_file(tmp_path):
    model, tok = llama()
    K = torch.randn(50, 48, dtype=torch.float64)
    path = tmp_path / "zu-tiny" / "wiki_stats" / f"{LAYER}_float32_mom2_1000.npz"
    path.parent.mkdir(parents=True)
    _memit_npz(path, K, with_mean=False)
    (tmp_path / "wiki.txt").write_text("x\n")
    stat = layer_stats(model, tok, LAYER, tmp_path, tmp_path / "wiki.txt", ["mom2"], model_name="zu-tiny",
                       sample_size=1000, progress=None)
    assert stat.path == str(path) and stat.mom2.count == 50
    assert torch.allclose(stat.mom2.moment().double(), K.t() @ K / 50, rtol=1e-6)


def test_npz_import_maps_sums_and_mean(tmp_path):
    K = torch.randn(40, 12, dtype=torch.float64) + 0.5
    _memit_npz(tmp_path / "s.npz", K)
    st = load_npz_stats(tmp_path / "s.npz", layer=3)
    assert st.layer == 3 and st.n == 40 and st.kk.dtype == torch.float32
    assert torch.allclose(st.kk.double(), K.t() @ K, rtol=1e-6)  # kk = n · moment() = mom2.mom2
    assert torch.allclose(st.ks, K.sum(0), rtol=1e-6)  # ks = n · μ
    assert torch.allclose(st.second_moment(torch.float64), K.t() @ K / 40, rtol=1e-6)
    # export and re-import round trip
    save_npz_stats(st, tmp_path / "out.npz")
    st2 = load_npz_stats(tmp_path / "out.npz", layer=3)
    assert torch.equal(st2.kk, st.kk) and st2.n == st.n and torch.allclose(st2.ks, st.ks)


def test_npz_without_mean_is_refused_for_the_centred_cross_moment(tmp_path):
    K = torch.randn(30, 8, dtype=torch.float64)
    _memit_npz(tmp_path / "m.npz", K, with_mean=False)
    with pytest.raises(ZuFastError, match="centred cross moment"):
        load_npz_stats(tmp_path / "m.npz", 0, UnlearnConfig(layers=[0], centered_cross_moment=True))
    st = load_npz_stats(tmp_path / "m.npz", layer=0)  # the default, uncentred, needs no mean
    assert st.info["mean"] == "missing" and st.n == 30
    _memit_npz(tmp_path / "bad.npz", K, mean_count=29)
    with pytest.raises(ZuFastError, match="same tokens"):
        load_npz_stats(tmp_path / "bad.npz", layer=0)
    np.savez(tmp_path / "other.npz", x=np.zeros(3))
    with pytest.raises(ZuFastError, match="mom2.mom2"):
        load_npz_stats(tmp_path / "other.npz", layer=0)


def test_unlearn_with_imported_npz_equals_unlearn_with_collected_stats(tmp_path):
    model, tok = llama()
    cfg = UnlearnConfig(layers=[1, 2], progress=False, v_num_grad_steps=3, original_representation="clean")
    stats = zu_fast.collect_stats(model, tok, corpus(30), cfg, cache=False)
    paths = {layer: save_npz_stats(stats[layer], tmp_path / f"{layer}.npz") for layer in (1, 2)}
    templates = [["{}"], ["Because I. {}"]]
    e1 = zu_fast.unlearn(model, tok, REQUESTS, cfg, stats=stats, context_templates=templates)
    f1 = {k: v.clone() for k, v in e1.factors.items()}
    e1.restore()
    e2 = zu_fast.unlearn(model, tok, REQUESTS, cfg, stats=corpus_stats_from_npz(paths, cfg),
                         context_templates=templates)
    for layer in (1, 2):
        assert torch.allclose(e2.factors[layer], f1[layer], rtol=1e-5, atol=1e-7)


def test_layer_stats_from_answers_per_layer_calls_from_one_pass(tmp_path):
    """MEMIT / AlphaEdit ask for one layer at a time; layer_stats_from answers from one collect_stats pass."""
    model, tok = llama()
    texts = corpus(24)
    cfg = UnlearnConfig.for_model(model, layers=[1, 2], progress=False)
    stats = zu_fast.collect_stats(model, tok, texts, cfg, cache=False)
    get = zu_fast.compat.layer_stats_from(stats)
    for layer in (1, 2):
        name = f"model.layers.{layer}.mlp.down_proj"
        one = get(model, tok, name, tmp_path, "ignored", ["mom2", "mean"], precision="float64")
        alone = layer_stats(model, tok, name, tmp_path, texts, ["mom2", "mean"], precision="float64", progress=None)
        assert torch.allclose(one.mom2.moment(), alone.mom2.moment(), rtol=1e-5, atol=1e-7)  # one pass = per layer
        assert torch.allclose(one.mean.mean(), alone.mean.mean(), rtol=1e-5, atol=1e-7)
        assert one.mom2.count == alone.mom2.count
    with pytest.raises(ZuFastError, match=r"cover layers \[1, 2\]"):
        get(model, tok, "model.layers.3.mlp.down_proj", tmp_path, "ignored", ["mom2"])
    with pytest.raises(ZuFastError, match="are of 'model.layers.{}.mlp.down_proj'"):
        get(model, tok, "model.layers.1.mlp.up_proj", tmp_path, "ignored", ["mom2"])
    with pytest.raises(ZuFastError, match="norm_mean"):
        get(model, tok, "model.layers.1.mlp.down_proj", tmp_path, "ignored", ["norm_mean"])
    other, _ = llama(seed=1)
    with pytest.raises(zu_fast.StaleStatsError):  # another model's statistics are refused at its first call
        get(other, tok, "model.layers.1.mlp.down_proj", tmp_path, "ignored", ["mom2"])
    with torch.no_grad():  # MEMIT edits layer 1 before it asks for layer 2: the unedited model's C is meant
        model.model.layers[1].mlp.down_proj.weight.mul_(1.5)
    assert get(model, tok, "model.layers.2.mlp.down_proj", tmp_path, "x", ["mom2"]).mom2.count == stats[2].n
