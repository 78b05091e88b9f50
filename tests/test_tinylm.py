"""The tiny Llama: tokenizer, cache keying and atomic caching (fast), and recall of the real model (slow)."""

from __future__ import annotations

import json
import time

import pytest
import torch

from zu_fast import metrics as M
from zu_fast.eval import tinylm
from zu_fast.eval.synthetic import RELATIONS, WorldConfig, make_world
from zu_fast.eval.tinylm import META_FILE, MODEL_TAG, TinyLMConfig, load_or_train, model_dir

# A micro configuration: trains in a few seconds, for testing the machinery (not recall).
MICRO = TinyLMConfig(
    world=WorldConfig(n_people=12, n_filler_train=30, n_filler_heldout=10),
    vocab_size=400, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64,
    steps=6, batch_size=4, seq_len=32,
)


def test_cache_root_env(monkeypatch, tmp_path):
    monkeypatch.setenv("ZU_FAST_CACHE", str(tmp_path / "a"))
    assert tinylm.cache_root() == tmp_path / "a"
    monkeypatch.delenv("ZU_FAST_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert tinylm.cache_root() == tmp_path / "x" / "zu_fast"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "h"))
    assert tinylm.cache_root() == tmp_path / "h" / ".cache" / "zu_fast"


def test_cache_key_covers_every_config_part():
    base = TinyLMConfig()
    assert base.cache_key() == TinyLMConfig().cache_key()
    variants = [
        TinyLMConfig(seed=1),
        TinyLMConfig(steps=base.steps + 1),
        TinyLMConfig(hidden_size=64),
        TinyLMConfig(world=WorldConfig(seed=1)),
        TinyLMConfig(world=WorldConfig(relations=("birth_city", "employer", "sport", "language"))),
    ]
    keys = {v.cache_key() for v in variants}
    assert len(keys) == len(variants) and base.cache_key() not in keys


def test_tokenizer_answers_single_token_names_multi_token():
    cfg = TinyLMConfig()
    world = make_world(cfg.world)
    answers = sorted({o for r in world.relations for o in RELATIONS[r]["objects"]})
    tok = tinylm.train_tokenizer(world.training_texts(), cfg.vocab_size, whole_words=answers)
    assert len(tok) == cfg.vocab_size
    assert len({tok.bos_token_id, tok.eos_token_id, tok.pad_token_id}) == 3
    assert tok("Tolu was born in")["input_ids"][0] == tok.bos_token_id
    for a in answers:
        assert len(tok(" " + a, add_special_tokens=False)["input_ids"]) == 1, a
    n_tok = [len(tok(p, add_special_tokens=False)["input_ids"]) for p in world.people]
    assert sum(n_tok) / len(n_tok) >= 2.5  # subjects are multi-token, as in real models
    # add_prefix_space: a name is the same tokens at the start of a text and in the middle
    name = world.people[0]
    start = tok(name, add_special_tokens=False)["input_ids"]
    mid = tok("The birthplace of " + name, add_special_tokens=False)["input_ids"]
    assert mid[-len(start):] == start


def test_cut_off_documents_end_with_eos():
    world = make_world(WorldConfig(n_people=12, n_filler_train=30, n_filler_heldout=10, n_strangers=4,
                                   n_stranger_fragments=3))
    answers = sorted({o for r in world.relations for o in RELATIONS[r]["objects"]})
    tok = tinylm.train_tokenizer(world.training_texts(), 400, whole_words=answers)
    enc = tinylm.encode_training_texts(tok, world)
    cut = set(world.fragments())
    assert len(cut) > 0 and len(enc) == len(world.training_texts())
    for text, ids in zip(world.training_texts(), enc):
        assert (ids[-1] == tok.eos_token_id) == (text in cut), text
        assert tok.bos_token_id not in ids


def test_micro_train_cache_and_determinism(tmp_path, monkeypatch):
    t0 = time.perf_counter()
    model, tok, world = load_or_train(MICRO, cache_dir=tmp_path / "c1", progress=False)
    assert time.perf_counter() - t0 < 120
    d = model_dir(MICRO, tmp_path / "c1")
    assert d.parent.name == "tinylm" and d.name == MICRO.cache_key()
    assert (d / "model.safetensors").exists() and (d / "config.json").exists() and (d / META_FILE).exists()
    assert json.loads((d / "config.json").read_text())["zu_fast_model"] == MODEL_TAG
    meta = json.loads((d / META_FILE).read_text())
    assert meta["config"] == MICRO.to_dict() and meta["key"] == MICRO.cache_key()
    # no temporary directories left behind
    assert [p.name for p in d.parent.iterdir()] == [d.name]
    assert not model.training and next(model.parameters()).dtype == torch.float32
    assert model.config.zu_fast_model == MODEL_TAG
    assert world.people == make_world(MICRO.world).people
    assert tok.eos_token == "</s>" and tok.pad_token == "<pad>"

    # second call: from the cache, never retrains
    def boom(*a, **k):
        raise AssertionError("retrained although cached")

    monkeypatch.setattr(tinylm, "train", boom)
    model2, tok2, _ = load_or_train(MICRO, cache_dir=tmp_path / "c1", progress=False)
    for (n, p), (_, q) in zip(model.state_dict().items(), model2.state_dict().items()):
        assert torch.equal(p, q), n
    assert tok2.get_vocab() == tok.get_vocab()
    monkeypatch.undo()

    # same config, fresh cache: bit-identical weights (deterministic by seed)
    model3, _, _ = load_or_train(MICRO, cache_dir=tmp_path / "c2", progress=False)
    for (n, p), (_, q) in zip(model.state_dict().items(), model3.state_dict().items()):
        assert torch.equal(p, q), n


@pytest.mark.slow
def test_tiny_model_recalls_facts():
    """Trains the default model once per machine (default cache dir; ~minutes), then checks recall."""
    cfg = TinyLMConfig()
    model, tok, world = load_or_train(cfg, progress=False)
    recs = world.records(50, seed=0)
    res = M.evaluate(model, tok, recs, world.heldout_texts())
    assert res["efficacy"] >= 90.0, res
    assert res["generalization"] >= 60.0, res
    assert res["specificity"] >= 85.0, res
    # held-out generic text is modelled far better than chance (uniform PPL = vocab size)
    assert res["perplexity"] < 20.0, res
    # the forget facts under another seed too (the facts used by records() in general)
    assert M.efficacy(model, tok, world.records(50, seed=1)) >= 90.0

    t0 = time.perf_counter()
    model2, _, _ = load_or_train(cfg, progress=False)
    assert time.perf_counter() - t0 < 30.0
    for (n, p), (_, q) in zip(model.state_dict().items(), model2.state_dict().items()):
        assert torch.equal(p, q), n
