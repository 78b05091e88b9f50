"""Statistics collection: one truncated forward per batch, padding never counted, cache safety."""

from __future__ import annotations

import pytest
import torch
from tiny_models import corpus, gpt2, llama

import zu_fast
from zu_fast import StaleStatsError, UnlearnConfig, ZuFastError
from zu_fast.stats.corpus import read_corpus


def _cfg(**kw):
    return UnlearnConfig(**{"layers": [1, 2], "progress": False, **kw})


def _reference_sums(model, tok, texts, layer_name):
    """Σkkᵀ, Σk, n computed text by text, unpadded, in float64."""
    mod = model.get_submodule(layer_name)
    got = []
    h = mod.register_forward_hook(lambda m, a, o: got.append(a[0][0].double()))
    with torch.no_grad():
        for t in texts:
            model(**tok(t, return_tensors="pt"))
    h.remove()
    K = torch.cat(got)  # [n, d_in]
    return K.t() @ K, K.sum(0), K.shape[0]


def test_matches_unpadded_reference_and_counts_no_padding():
    model, tok = llama()
    texts = corpus(40)
    st = zu_fast.collect_stats(model, tok, texts, _cfg(stats_batch_tokens=64), cache=False)
    for layer in (1, 2):
        kk, ks, n = _reference_sums(model, tok, texts, f"model.layers.{layer}.mlp.down_proj")
        assert st[layer].n == n
        assert torch.allclose(st[layer].kk.double(), kk, rtol=1e-5, atol=1e-6)
        assert torch.allclose(st[layer].kk, st[layer].kk.t())  # symmetrised
        assert torch.allclose(st[layer].ks, ks, rtol=1e-6, atol=1e-8)
    assert st.meta["collection"]["batches"] > 1


def test_one_forward_per_batch_and_nothing_above_the_deepest_layer():
    model, tok = llama(layers=5)
    calls = {i: 0 for i in range(5)}
    hooks = [model.model.layers[i].register_forward_hook(lambda m, a, o, i=i: calls.__setitem__(i, calls[i] + 1))
             for i in range(5)]
    head_calls = []
    hooks.append(model.lm_head.register_forward_hook(lambda *a: head_calls.append(1)))
    st = zu_fast.collect_stats(model, tok, corpus(30), _cfg(layers=[1, 2, 3], stats_batch_tokens=128), cache=False)
    for h in hooks:
        h.remove()
    batches = st.meta["collection"]["batches"]
    assert calls[0] == calls[1] == calls[2] == batches  # one forward per batch for all three layers
    assert calls[4] == 0 and not head_calls  # nothing above the deepest edited layer ran
    # layer 3 is entered (its down_proj is the deepest edited module) but stopped inside: no output hook
    assert calls[3] == 0


def test_measured_and_derived_agree_on_a_real_model():
    model, tok = llama()
    texts = corpus(30)
    st_m = zu_fast.collect_stats(model, tok, texts, _cfg(stats_mode="measured"), cache=False)
    st_d = zu_fast.collect_stats(model, tok, texts, _cfg(), cache=False)
    W = model.model.layers[2].mlp.down_proj.weight.double()
    X_m = st_m[2].cross_moment(W, None, centered=True)
    X_d = st_d[2].cross_moment(W, None, centered=True)
    assert ((X_m - X_d).norm() / X_d.norm()) < 1e-5


def test_gpt2_conv1d_with_bias():
    model, tok = gpt2()
    cfg = UnlearnConfig.for_model(model, progress=False, stats_mode="measured")
    assert cfg.locate.rewrite_module == "transformer.h.{}.mlp.c_proj"
    st = zu_fast.collect_stats(model, tok, corpus(20), cfg, cache=False)
    layer = cfg.layers[-1]
    mod = model.get_submodule(cfg.locate.rewrite_module.format(layer))
    X_m = st[layer].cross_moment(mod.weight.double().t(), mod.bias.double(), centered=True)
    st[layer].vk = None
    X_d = st[layer].cross_moment(mod.weight.double().t(), mod.bias.double(), centered=True)
    assert ((X_m - X_d).norm() / X_d.norm()) < 1e-5  # the bias cancels on centring


def test_cache_roundtrip_and_stale_cache_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("ZU_FAST_CACHE", str(tmp_path))
    model, tok = llama()
    texts = corpus(20)
    st1 = zu_fast.collect_stats(model, tok, texts, _cfg())
    assert st1.path is not None and (tmp_path / "stats").exists()
    st2 = zu_fast.collect_stats(model, tok, texts, _cfg())  # from cache
    assert torch.equal(st1[1].kk, st2[1].kk) and st2[1].n == st1[1].n
    # the same explicit path with other weights: refused, never silently used
    path = st1.path
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight.mul_(1.5)
    with pytest.raises(StaleStatsError, match="different model"):
        zu_fast.collect_stats(model, tok, texts, _cfg(), cache_path=path)
    with pytest.raises(StaleStatsError, match="different corpus"):
        model2, _ = llama()
        zu_fast.collect_stats(model2, tok, texts[:10], _cfg(), cache_path=path)


def test_token_budget_and_truncation():
    model, tok = llama()
    texts = corpus(60)
    st = zu_fast.collect_stats(model, tok, texts, _cfg(stats_token_budget=100, stats_batch_tokens=32), cache=False)
    assert 100 <= st[1].n < 100 + 32
    st2 = zu_fast.collect_stats(model, tok, texts, _cfg(stats_max_length=4, stats_batch_tokens=16), cache=False)
    assert st2[1].n == 4 * len(texts)  # every text truncated to 4 tokens
    conv = st2[1].info["convergence"]
    assert 0 < conv["rel_change"] < 1 and 0 < conv["over_tokens"] < st2[1].n


def test_nan_activations_raise_naming_the_layer():
    model, tok = llama()
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[0, 0] = float("inf")
    with pytest.raises(ZuFastError, match="layer 1"):
        zu_fast.collect_stats(model, tok, corpus(10), _cfg(), cache=False)


def test_corpus_formats(tmp_path):
    (tmp_path / "c.txt").write_text("one text\n\nsecond text\n")
    (tmp_path / "c.jsonl").write_text('{"text": "a"}\n{"text": "b"}\n')
    assert read_corpus(tmp_path / "c.txt") == ["one text", "second text"]
    assert read_corpus(str(tmp_path / "c.jsonl")) == ["a", "b"]
    (tmp_path / "bad.jsonl").write_text('{"nope": 1}\n')
    with pytest.raises(ZuFastError, match="bad.jsonl:1"):
        read_corpus(tmp_path / "bad.jsonl")
    with pytest.raises(ZuFastError):
        read_corpus(tmp_path / "missing.txt")
