"""Dataset loaders (CounterFact/MCF, ZsRE, MQuAKE) on the committed fixtures, their schema errors,
the reference's forget split, and the synthetic world written in those schemas."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from tiny_models import tokenizer

import zu_fast
from zu_fast.eval import datasets as D
from zu_fast.eval.synthetic import RELATIONS, WorldConfig, make_world

FIX = Path(__file__).parent / "fixtures" / "datasets"


def test_counterfact_fixture():
    ds = D.load_dataset(FIX / "mcf.json")
    assert ds.kind == "mcf" and len(ds) == 12
    rec = ds.records[0]
    assert rec["requested_rewrite"]["prompt"].count("{}") == 1
    assert all(isinstance(p, str) for p in rec["neighborhood_prompts"] + rec["paraphrase_prompts"])
    reqs = ds.requests(ds.records[:3])
    assert [r["case_id"] for r in reqs] == [0, 1, 2]
    assert reqs[0]["target_true"] == rec["requested_rewrite"]["target_true"]["str"]
    zu_fast.UnlearnRequest.from_record(reqs[0])  # valid zu_fast requests


def test_sample_is_the_reference_forget_split():
    ds = D.load_counterfact(FIX / "mcf.json")
    got = ds.sample(4, 3)
    assert got == random.Random(3).sample(ds.records[6:], 4)  # evaluate.py: random.sample(ds[len//2:], n)
    assert ds.sample(4, 3) == got and ds.sample(4, 4) != got
    with pytest.raises(zu_fast.ZuFastError, match=r"mcf\.json.*holds 6"):
        ds.sample(7, 0)


def test_zsre_fixture_follows_the_reference_construction():
    tok = tokenizer()
    raw = json.loads((FIX / "zsre.json").read_text())
    ds = D.load_zsre(FIX / "zsre.json", tok)
    assert ds.kind == "zsre" and len(ds) == len(raw)
    for r, rec in zip(raw, ds.records):
        rr = rec["requested_rewrite"]
        assert rr["prompt"].format(rr["subject"]) == r["src"]
        assert rr["target_true"]["str"] == r["answers"][0] and rr["target_new"]["str"] == "<|endoftext|>"
        assert rec["paraphrase_prompts"] == [r["rephrase"]]
        ids = tok(" " + r["loc_ans"])["input_ids"]
        assert [n["target"] for n in rec["neighborhood_prompts"]] == [tok.decode(ids[i]) for i in range(len(ids))]
        assert rec["neighborhood_prompts"][-1]["prompt"] == r["loc"] + "?" + tok.decode(ids[:-1])
    with pytest.raises(zu_fast.ZuFastError, match="tokenizer"):
        D.load_dataset(FIX / "zsre.json")


def test_mquake_fixture():
    ds = D.load_dataset(FIX / "mquake.json")
    assert ds.kind == "mquake"
    raw = json.loads((FIX / "mquake.json").read_text())
    assert ds.records[0]["paraphrase_prompts"] == raw[0]["questions"] and ds.records[0]["answer"] == raw[0]["answer"]
    reqs = ds.requests(ds.records[:2])  # every requested rewrite is a request
    assert len(reqs) == len(raw[0]["requested_rewrite"]) + len(raw[1]["requested_rewrite"])
    assert {r["case_id"] for r in reqs} == {0, 1}


def test_jsonl_and_kind_detection(tmp_path):
    recs = json.loads((FIX / "mcf.json").read_text())[:2]
    p = tmp_path / "cf.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    assert D.load_dataset(p).records == D.load_dataset(FIX / "mcf.json").records[:2]
    assert D.detect_kind(recs[0]) == "mcf"
    assert D.detect_kind(json.loads((FIX / "mquake.json").read_text())[0]) == "mquake"
    assert D.detect_kind(json.loads((FIX / "zsre.json").read_text())[0]) == "zsre"


def _broken(kind: str, mutate) -> list[dict]:
    recs = json.loads((FIX / f"{kind}.json").read_text())[:3]
    mutate(recs[1])
    return recs


BROKEN = [
    ("mcf", lambda r: r.pop("requested_rewrite"), "missing key 'requested_rewrite'"),
    ("mcf", lambda r: r["requested_rewrite"].update(prompt="no placeholder"), "exactly one"),
    ("mcf", lambda r: r["requested_rewrite"].pop("subject"), "misses"),
    ("mcf", lambda r: r["requested_rewrite"].update(target_true={"id": "x"}), "target_true"),
    ("mcf", lambda r: r.update(paraphrase_prompts="one string"), "list of strings"),
    ("mcf", lambda r: r.update(neighborhood_prompts=[{"prompt": "x", "target": "y"}]), "neighborhood_prompts"),
    ("zsre", lambda r: r.pop("loc_ans"), "misses"),
    ("zsre", lambda r: r.update(loc="who sang it"), "nq question"),
    ("zsre", lambda r: r.update(subject="Nobody Here"), "does not occur"),
    ("zsre", lambda r: r.update(answers=[]), "answers"),
    ("mquake", lambda r: r.update(requested_rewrite={}), "non-empty list"),
    ("mquake", lambda r: r["requested_rewrite"][1].update(prompt="{} and {}"), r"requested_rewrite\[1\]"),
    ("mquake", lambda r: r.pop("questions"), "misses"),
]


@pytest.mark.parametrize("kind,mutate,message", BROKEN)
def test_schema_errors_name_file_and_record(tmp_path, kind, mutate, message):
    p = tmp_path / f"broken_{kind}.json"
    p.write_text(json.dumps(_broken(kind, mutate)))
    with pytest.raises(zu_fast.ZuFastError, match=message) as e:
        D.load_dataset(p, kind, tokenizer())
    assert str(p) in str(e.value) and "record 1" in str(e.value)


def test_file_level_errors(tmp_path):
    with pytest.raises(zu_fast.ZuFastError, match="no such dataset file"):
        D.load_dataset(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(zu_fast.ZuFastError, match="bad.json: not valid JSON"):
        D.load_dataset(tmp_path / "bad.json")
    (tmp_path / "obj.json").write_text('{"a": 1}')
    with pytest.raises(zu_fast.ZuFastError, match="list of records"):
        D.load_dataset(tmp_path / "obj.json")
    (tmp_path / "odd.json").write_text('[{"a": 1}]')
    with pytest.raises(zu_fast.ZuFastError, match=r"odd.json: record 0: cannot tell"):
        D.load_dataset(tmp_path / "odd.json")
    with pytest.raises(zu_fast.ZuFastError, match="unknown dataset kind"):
        D.load_dataset(FIX / "mcf.json", "wiki")


def test_with_neutral_overrides_target_new():
    ds = D.load_dataset(FIX / "mquake.json").with_neutral("I don't know.")
    assert all(rw["target_new"]["str"] == "I don't know." for r in ds.records for rw in r["requested_rewrite"])
    assert D.load_dataset(FIX / "mquake.json").records[0]["requested_rewrite"][0]["target_new"]["str"] == "</s>"


def test_world_in_the_schemas():
    world = make_world(WorldConfig(n_people=40, n_filler_train=20, n_filler_heldout=5))
    cf = D.world_counterfact(world, n=20)
    forget_subjects = {r["requested_rewrite"]["subject"] for r in cf[10:]}
    for rec in cf:
        rr = rec["requested_rewrite"]
        p = world.people.index(rr["subject"])
        obj = world.facts[p][rr["relation_id"]]
        assert rr["target_true"]["str"] == obj
        templates = RELATIONS[rr["relation_id"]]["templates"]
        assert rec["paraphrase_prompts"] == [templates[t].format(rr["subject"])
                                             for t in world.heldout_templates[p][rr["relation_id"]]]
        for n in rec["neighborhood_prompts"]:  # same object, never a subject of the forget split
            q = next(i for i, name in enumerate(world.people) if n.startswith(name) or f" {name}" in n)
            assert world.facts[q][rr["relation_id"]] == obj and world.people[q] not in forget_subjects
    assert len({r["requested_rewrite"]["subject"] for r in cf}) == 20
    for make, kind in ((D.world_zsre, "zsre"), (D.world_mquake, "mquake")):
        rows = make(world, n=6)
        assert D.detect_kind(rows[0]) == kind
    snips = D.world_attribute_snippets(world)
    assert sum(len(s["samples"]) for s in snips) == len(world.people) * len(world.relations)
