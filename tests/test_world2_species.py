"""The second world (species, for checking only): determinism, multi-token names and answers, EOS after
unknown species, real held-out paraphrases, record shape, the world selection, and that the people
model's cache key did not move."""

from __future__ import annotations

import dataclasses
import json
import statistics

import pytest

from zu_fast import metrics
from zu_fast.config import UnlearnConfig
from zu_fast.eval import harness, probes, tinylm, worlds
from zu_fast.eval.fact_world import FactWorld
from zu_fast.eval.species import SPECIES_RELATIONS, SpeciesWorldConfig, make_species_world
from zu_fast.eval.synthetic import RELATIONS, WorldConfig, make_world

SMALL = SpeciesWorldConfig(seed=3, n_species=60, n_filler_train=200, n_filler_heldout=50, n_strangers=20)


@pytest.fixture(scope="module")
def world():
    return make_species_world(SMALL)


@pytest.fixture(scope="module")
def default_world():
    return make_species_world()


@pytest.fixture(scope="module")
def species_tok(default_world):
    """The tokenizer the species model trains (its vocabulary size, no answer forced into one token)."""
    cfg = worlds.tinylm_config("species")
    return tinylm.train_tokenizer(default_world.training_texts(), cfg.vocab_size)


def test_deterministic_and_seed_dependent(world):
    again = make_species_world(SMALL)
    assert again.species == world.species and again.strangers == world.strangers
    assert again.facts == world.facts
    assert again.training_texts() == world.training_texts()
    assert again.heldout_texts() == world.heldout_texts()
    assert again.records(10, seed=1) == world.records(10, seed=1)
    other = make_species_world(dataclasses.replace(SMALL, seed=4))
    assert other.species != world.species
    assert world.records(10, seed=1) != world.records(10, seed=2)


def test_different_from_the_people_world(default_world):
    assert set(default_world.relations).isdisjoint(RELATIONS)
    assert len(default_world.relations) >= 5
    people = make_world()
    assert not set(default_world.training_texts()) & set(people.training_texts())


def test_binomial_names(world):
    names = world.species + world.strangers
    assert len(set(names)) == len(names)
    epithets = [n.split(" ")[1] for n in names]
    assert len(set(epithets)) == len(epithets)  # the epithet alone tells every species apart
    for n in names:
        genus, epithet = n.split(" ")
        assert genus.isalpha() and genus[0].isupper() and epithet.isalpha() and epithet.islower()
    # genera are shared, also between known and unknown species
    genera = [n.split(" ")[0] for n in world.species]
    assert len(set(genera)) < len(genera)
    assert {n.split(" ")[0] for n in world.strangers} & set(genera)


def test_no_filled_template_contains_another():
    # Otherwise a held-out prompt could be a substring of a trained sentence (a leak), across relations too.
    filled = [t.format("SUBJ").lower() for spec in SPECIES_RELATIONS.values() for t in spec["templates"]]
    assert len(set(filled)) == len(filled)
    for a in filled:
        assert not any(a != b and a in b for b in filled), a


def test_names_and_answers_multi_token(default_world, species_tok):
    tok = species_tok
    for name in default_world.species + default_world.strangers:
        genus, epithet = name.split(" ")
        assert len(tok(" " + epithet, add_special_tokens=False)["input_ids"]) >= 2, name
    n_tok = [len(tok(n, add_special_tokens=False)["input_ids"]) for n in default_world.species]
    assert statistics.fmean(n_tok) >= 3.5
    answers = sorted({o for r in default_world.relations for o in default_world.objects(r)})
    a_tok = [len(tok(" " + a, add_special_tokens=False)["input_ids"]) for a in answers]
    assert sum(k > 1 for k in a_tok) >= 0.8 * len(answers)
    # the metrics score every token of a multi-token answer after its prompt
    recs = default_world.records(20, seed=0)
    pairs = [(r["prompt"].format(r["subject"]), r["target_true"]["str"]) for r in recs]
    for (prompt, answer), (_, a_ids) in zip(pairs, metrics.encode_continuations(tok, pairs)):
        assert a_ids == tok(" " + answer, add_special_tokens=False)["input_ids"], (prompt, answer)
    assert sum(len(a) > 1 for _, a in metrics.encode_continuations(tok, pairs)) >= 15


def test_unknown_species_documents_end_with_eos(world):
    tok = tinylm.train_tokenizer(world.training_texts(), 600)
    enc = tinylm.encode_training_texts(tok, world)
    cut = set(world.fragments())
    assert len(cut) > 0 and len(enc) == len(world.training_texts())
    known = set(world.species)
    for text, ids in zip(world.training_texts(), enc):
        assert (ids[-1] == tok.eos_token_id) == (text in cut), text
    phrasings = {t.format(s) for spec in SPECIES_RELATIONS.values() for t in spec["templates"] for s in world.strangers}
    for frag in cut:  # a stranger's relation phrase, then nothing
        assert frag in phrasings and not any(k in frag for k in known), frag


def test_heldout_paraphrases_never_trained_with_subject(world):
    # every training text that names a species, by the species' epithet (unique), lower-cased
    by_epithet: dict[str, list[str]] = {}
    train_set = set(world.training_texts())
    for text in train_set:
        for w in {w.strip(".,") for w in text.split()}:
            by_epithet.setdefault(w, []).append(text.lower())
    trained = {(rel, t) for s in range(len(world.species)) for rel in world.relations
               for t in world.train_templates[s][rel]}
    for s, name in enumerate(world.species):
        for rel in world.relations:
            tr, he = world.train_templates[s][rel], world.heldout_templates[s][rel]
            assert not set(tr) & set(he) and len(he) == SMALL.n_heldout_templates
            for t in he:
                prompt = world.templates(rel)[t].format(name)
                texts = by_epithet[name.split(" ")[1]]
                assert texts and not any(prompt.lower() in x for x in texts), prompt
                assert (rel, t) in trained  # ...but the phrasing is trained for other species
            for t in tr:
                assert world.fact_text(s, rel, t) in train_set


def test_filler_states_no_fact_and_heldout_is_new(world):
    train = set(world.training_texts())
    held = world.heldout_texts()
    assert len(held) == SMALL.n_filler_heldout and not train & set(held)
    phrases = {t.format("").strip().lower() for spec in SPECIES_RELATIONS.values() for t in spec["templates"]}
    for text in held:
        assert not any(p in text.lower() for p in phrases if len(p) > 8), text


@pytest.mark.parametrize("make", [lambda: make_species_world(SMALL),
                                  lambda: make_world(WorldConfig(seed=3, n_people=60, n_filler_train=200,
                                                                 n_filler_heldout=50))])
def test_both_worlds_satisfy_the_interface_and_record_shape(make):
    w = make()
    assert isinstance(w, FactWorld)
    people_keys = set(make_world(WorldConfig(n_people=20, n_filler_train=10, n_filler_heldout=5)).records(3)[0])
    recs = w.records(10, seed=2)
    assert [set(r) for r in recs] == [people_keys] * 10
    forgotten = {r["subject"] for r in recs}
    assert len(forgotten) == 10
    n_rel = len(w.relations)
    for r in recs:
        s = w.people.index(r["subject"])
        assert r["case_id"] == s * n_rel + w.relations.index(r["relation"])
        assert r["target_true"]["str"] == w.facts[s][r["relation"]]
        assert "{}" in r["prompt"] and r["prompt"] in w.templates(r["relation"])
        assert all(r["subject"] in p for p in r["paraphrase_prompts"]) and r["paraphrase_prompts"]
        assert len(r["neighborhood_prompts"]) == w.config.n_neighbors
        for nb in r["neighborhood_prompts"]:
            assert not any(f in nb["prompt"] for f in forgotten), nb  # never about a forgotten subject
            q = next(i for i, name in enumerate(w.people) if nb["prompt"].endswith(
                tuple(t.format(name) for t in w.templates(r["relation"]))))
            assert nb["target"] == w.facts[q][r["relation"]]
    with pytest.raises(ValueError):
        w.records(len(w.people) // 2 + 1)
    # the probes' world-side helpers work on either world
    assert probes._other_fact_pairs(w, recs[:2])
    assert probes.relearn_texts(w, recs, "unrelated", max_texts=20)


def test_people_model_cache_key_unchanged():
    # Values computed from the code before the species world existed (commit 2ce40e8): the cached
    # people model (and its Mixtral variant) must keep their keys.
    assert tinylm.TinyLMConfig().cache_key() == "f07f610c72e7fed4"
    assert tinylm.TinyLMConfig(moe_experts=4).cache_key() == "a0225f14c12753ca"
    assert worlds.tinylm_config("people") == tinylm.TinyLMConfig()
    keys = {worlds.tinylm_config("species").cache_key(), tinylm.TinyLMConfig(tag_as_tiny=False).cache_key(),
            tinylm.TinyLMConfig(single_token_answers=False).cache_key(), tinylm.TinyLMConfig().cache_key()}
    assert len(keys) == 4
    assert worlds.tinylm_config("species").to_dict()["world"]["kind"] == "species"


def test_world_selection():
    assert harness.tinylm_config(None) is None  # the default small model, as before
    sp = harness.tinylm_config(None, "species")
    assert isinstance(sp.world, SpeciesWorldConfig) and sp.num_layers == 8 and not sp.tag_as_tiny
    over = harness.tinylm_config(json.dumps({"steps": 7, "world": {"n_species": 40}}), "species")
    assert over.steps == 7 and over.world.n_species == 40 and over.num_layers == 8
    people = harness.tinylm_config(json.dumps({"world": {"n_people": 30}}))
    assert isinstance(people.world, WorldConfig) and people.world.n_people == 30 and people.tag_as_tiny
    assert harness.build_parser().parse_args(["--world", "species"]).world == "species"
    with pytest.raises(SystemExit):
        harness.build_parser().parse_args(["--world", "planets"])
    with pytest.raises(ValueError):
        worlds.tinylm_config("planets")


MICRO_SPECIES = dataclasses.replace(
    worlds.tinylm_config("species"),
    world=SpeciesWorldConfig(n_species=12, n_genera=5, n_filler_train=30, n_filler_heldout=10, n_strangers=4),
    vocab_size=500, hidden_size=32, num_layers=8, num_heads=2, intermediate_size=64, steps=4, batch_size=4,
    seq_len=48,
)


@pytest.mark.parametrize("tag", [False, True])
def test_trainer_tag_option_decides_the_preset(tmp_path, tag):
    cfg = dataclasses.replace(MICRO_SPECIES, tag_as_tiny=tag)
    model, tok, world = tinylm.load_or_train(cfg, cache_dir=tmp_path, progress=False)
    assert world.species == make_species_world(cfg.world).species
    assert (getattr(model.config, "zu_fast_model", None) == tinylm.MODEL_TAG) == tag
    meta = tinylm.load_meta(cfg, tmp_path)
    assert meta["config"] == cfg.to_dict() and meta["config"]["world"]["kind"] == "species"
    ucfg = UnlearnConfig.for_model(model)
    if tag:  # the zu-tiny preset: GD, three layers ending at half the depth, 50 target steps
        assert list(ucfg.layers) == [2, 3, 4] and ucfg.method == "gd" and ucfg.targets.steps == 50
    else:  # the generic Llama defaults: three layers ending at 21/32 of the depth, the paper's 25 steps
        assert list(ucfg.layers) == [3, 4, 5] and ucfg.method == "closed_form"
        assert ucfg.targets.steps == UnlearnConfig().targets.steps
