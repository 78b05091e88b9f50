"""The synthetic world: determinism, uniqueness, real held-out paraphrases, record shape."""

from __future__ import annotations

import pytest

from zu_fast.eval.synthetic import RELATIONS, WorldConfig, make_world

SMALL = WorldConfig(seed=3, n_people=60, n_filler_train=200, n_filler_heldout=50)


@pytest.fixture(scope="module")
def world():
    return make_world(SMALL)


def test_deterministic_and_seed_dependent(world):
    again = make_world(SMALL)
    assert again.people == world.people
    assert again.facts == world.facts
    assert again.training_texts() == world.training_texts()
    assert again.heldout_texts() == world.heldout_texts()
    assert again.records(10, seed=1) == world.records(10, seed=1)
    other = make_world(WorldConfig(seed=4, n_people=60, n_filler_train=200, n_filler_heldout=50))
    assert other.people != world.people
    assert world.records(10, seed=1) != world.records(10, seed=2)


def test_default_world_shape():
    w = make_world()
    assert len(w.relations) >= 4
    assert all(len(RELATIONS[r]["templates"]) >= 6 for r in w.relations)
    assert len(set(w.people)) == len(w.people) == w.config.n_people


def test_subjects_unique_and_well_formed(world):
    assert len(set(world.people)) == len(world.people) == SMALL.n_people
    for name in world.people:
        first, last = name.split(" ")
        assert first.isalpha() and last.isalpha() and first[0].isupper() and last[0].isupper()
    firsts = {n.split()[0] for n in world.people}
    lasts = {n.split()[1] for n in world.people}
    assert not firsts & lasts  # "X Y" always parses the same way


def test_no_template_contains_another():
    # Otherwise a held-out prompt could be a substring of a trained sentence (a leak).
    for rel, spec in RELATIONS.items():
        filled = [t.format("SUBJ").lower() for t in spec["templates"]]
        assert len(set(filled)) == len(filled), rel
        for a in filled:
            assert not any(a != b and a in b for b in filled), (rel, a)


def test_heldout_paraphrases_never_trained_with_subject(world):
    corpus = "\n".join(world.training_texts()).lower()
    used_elsewhere = set()
    for p, name in enumerate(world.people):
        for rel in world.relations:
            tr, he = world.train_templates[p][rel], world.heldout_templates[p][rel]
            assert not set(tr) & set(he) and len(he) == SMALL.n_heldout_templates
            answer = world.facts[p][rel]
            for t in he:
                prompt = RELATIONS[rel]["templates"][t].format(name)
                assert prompt.lower() not in corpus, prompt
                assert f"{prompt} {answer}".lower() not in corpus
                used_elsewhere.add((rel, t))
            for t in tr:
                assert world.fact_text(p, rel, t) in world.training_texts()
    # ...but every held-out phrasing is trained for other people (the model knows the phrasing).
    trained = {(rel, t) for p in range(len(world.people)) for rel in world.relations
               for t in world.train_templates[p][rel]}
    assert used_elsewhere <= trained


def test_heldout_texts_not_in_training(world):
    train = set(world.training_texts())
    held = world.heldout_texts()
    assert len(held) == SMALL.n_filler_heldout
    assert not train & set(held)
    assert len(set(held)) == len(held)


def test_records_shape(world):
    recs = world.records(12, seed=5)
    assert len(recs) == 12
    assert len({r["subject"] for r in recs}) == 12
    assert len({r["case_id"] for r in recs}) == 12
    forgotten = {r["subject"] for r in recs}
    for r in recs:
        p = world.people.index(r["subject"])
        rel = r["relation"]
        templates = RELATIONS[rel]["templates"]
        assert r["target_true"]["str"] == world.facts[p][rel]
        assert "{}" in r["prompt"]
        # the edit prompt is one of the fact's trained templates
        assert templates.index(r["prompt"]) in world.train_templates[p][rel]
        assert r["prompt"].format(r["subject"]) + " " + r["target_true"]["str"] + "." in world.training_texts()
        assert sorted(r["paraphrase_prompts"]) == sorted(
            templates[t].format(r["subject"]) for t in world.heldout_templates[p][rel]
        )
        assert len(r["neighborhood_prompts"]) == SMALL.n_neighbors
        for n in r["neighborhood_prompts"]:
            assert set(n) == {"prompt", "target"}
            q = next(i for i, name in enumerate(world.people) if name in n["prompt"])
            assert world.people[q] not in forgotten
            assert n["target"] == world.facts[q][rel]
            assert n["prompt"] + " " + n["target"] + "." in world.training_texts()
        # CounterFact-like: neighbours share the object when enough people do
        same = sum(n["target"] == r["target_true"]["str"] for n in r["neighborhood_prompts"])
        n_same = sum(world.facts[q][rel] == r["target_true"]["str"] for q in range(len(world.people))
                     if world.people[q] not in forgotten)
        assert same == min(n_same, SMALL.n_neighbors)


def test_records_bad_n(world):
    with pytest.raises(ValueError):
        world.records(0)
    with pytest.raises(ValueError):
        world.records(len(world.people))


def test_bad_config():
    with pytest.raises(ValueError):
        make_world(WorldConfig(relations=("birth_city", "shoe_size")))
    with pytest.raises(ValueError):
        make_world(WorldConfig(n_heldout_templates=7))


def test_strangers_are_named_but_never_described():
    w = make_world(WorldConfig(seed=3, n_people=40, n_filler_train=50, n_filler_heldout=10, n_strangers=15,
                               n_stranger_fragments=4))
    assert len(w.strangers) == len(set(w.strangers)) == 15
    # never a known person, and no name part reused in the other role (names parse one way)
    assert not set(w.strangers) & set(w.people)
    firsts = {n.split()[0] for n in w.people + w.strangers}
    lasts = {n.split()[1] for n in w.people + w.strangers}
    assert not firsts & lasts
    frags = w.fragments()
    assert len(frags) == 15 * 4 and set(frags) <= set(w.training_texts())
    templates = {t for r in RELATIONS.values() for t in r["templates"]}
    objects = {o for r in RELATIONS.values() for o in r["objects"]}
    for f in frags:
        name = next(s for s in w.strangers if s in f)
        assert f.replace(name, "{}") in templates  # cut off exactly where the answer would be
        assert not set(f.split()) & objects
    # strangers never appear in records or their neighbourhoods
    for r in w.records(10):
        assert r["subject"] in w.people
        assert not any(s in n["prompt"] for n in r["neighborhood_prompts"] for s in w.strangers)
    # the default world has strangers; switching them off leaves the rest of the world unchanged
    off = make_world(WorldConfig(seed=3, n_people=40, n_filler_train=50, n_filler_heldout=10, n_strangers=0))
    assert off.strangers == [] and off.fragments() == []
    assert off.people == w.people and off.facts == w.facts
    assert [t for t in w.training_texts() if t not in set(frags)] == off.training_texts()
    assert WorldConfig().n_strangers > 0
