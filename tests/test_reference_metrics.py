"""Golden check: zu_fast's dataset loaders and metrics equal the ZeroUnlearn reference's, per record.

tests/fixtures/golden/reference_metrics.json holds what the reference's own code computed on the
project's small model (tests/fixtures/make_golden_reference_metrics.py, run against a patched local
copy of the reference): its dataset classes' records for the three fixture files, and its
per-record evaluation outputs with the base weights and with stored edited weights
(golden/edit.safetensors). Here zu_fast computes the same things and must agree: every hit/miss
exactly, NLLs to float32 round-off, generated texts exactly.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from zu_fast.eval import datasets as D
from zu_fast.eval import reference_metrics as M

FIX = Path(__file__).parent / "fixtures"
GOLDEN = FIX / "golden" / "reference_metrics.json"
REGEN = ("the small model changed since the golden fixture was made: regenerate it with "
         "`python tests/fixtures/make_golden_reference_metrics.py REFERENCE_DIR` (see its docstring)")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def golden():
    return json.loads(GOLDEN.read_text())


@pytest.fixture(scope="module")
def setup(golden):
    from safetensors.torch import load_file

    from zu_fast.eval import tinylm
    from zu_fast.model import tensor_fingerprint

    old_threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a 10M-parameter model: one thread is as fast, and immune to a busy machine
    model, tok, _ = tinylm.load_or_train(progress=False)
    prints = {n: tensor_fingerprint(p) for n, p in model.named_parameters() if n.endswith("down_proj.weight")}
    assert tinylm.model_dir().name == golden["tinylm_key"] and prints == golden["model_fingerprint"], REGEN
    base = {k: v.clone() for k, v in model.state_dict().items()}
    factors = load_file(str(FIX / "golden" / "edit.safetensors"))
    params = dict(model.named_parameters())
    with torch.no_grad():  # exactly the fixture script's apply_golden_edit: W += U V in fp32
        for key, u in factors.items():
            if key.endswith(".U"):
                params[key[:-2]].add_(u @ factors[key[:-2] + ".V"])
    edited = {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(base)
    states = {"base": base, "edited": edited}
    yield model, tok, states
    model.load_state_dict(base)
    torch.set_num_threads(old_threads)


def _close(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or abs(a - b) <= 1e-5 * max(1.0, abs(b))


def test_loaders_equal_the_reference_dataset_classes(golden, setup):
    _, tok, _ = setup
    for kind, name in (("mcf", "mcf.json"), ("zsre", "zsre.json"), ("mquake", "mquake.json")):
        ds = D.load_dataset(FIX / "datasets" / name, tok=tok)
        assert ds.kind == kind
        assert ds.records == golden["records"][kind], kind


@pytest.mark.parametrize("weights", ["base", "edited"])
def test_per_record_scores_equal_the_reference(golden, setup, weights):
    model, tok, states = setup
    model.load_state_dict(states[weights])
    for kind, name in (("mcf", "mcf.json"), ("zsre", "zsre.json"), ("mquake", "mquake.json")):
        ds = D.load_dataset(FIX / "datasets" / name, tok=tok)
        ours = M.reference_scores(model, tok, kind, ds.records)
        ref = golden["results"][weights][kind]["per_record"]
        assert len(ours) == len(ref)
        for i, (o, r) in enumerate(zip(ours, ref)):
            for key in [k for k in r if k.endswith("_correct")]:
                assert o[key] == r[key], (weights, kind, i, key)
            for key in [k for k in r if k.endswith("_probs")]:
                assert len(o[key]) == len(r[key])
                for x, y in zip(o[key], r[key]):
                    assert _close(x["target_new"], y["target_new"]) and _close(x["target_true"], y["target_true"]), \
                        (weights, kind, i, key, x, y)
        # aggregates as the reference's summarize() (which rounds to 2 decimals)
        summary = golden["results"][weights][kind]["summary"]
        if summary:
            ours_sum = M.summarize_scores(ours)
            for mine, theirs in (("efficacy", "post_rewrite_acc"), ("generalization", "post_paraphrase_acc"),
                                 ("specificity", "post_neighborhood_acc"), ("es", "post_rewrite_success"),
                                 ("ps", "post_paraphrase_success"), ("ns", "post_neighborhood_success")):
                if theirs in summary:
                    assert round(ours_sum[mine], 2) == pytest.approx(summary[theirs][0], abs=1e-9), (kind, mine)


def test_the_edit_changes_what_is_compared(golden):
    """The golden weights must exercise both outcomes, or the comparison above proves little."""
    hits = [x for kind in ("mcf", "zsre", "mquake") for r in golden["results"]["edited"][kind]["per_record"]
            for k, v in r.items() if k.endswith("_correct") for x in v]
    assert any(hits) and not all(hits)
    base = golden["results"]["base"]["mcf"]["per_record"]
    edited = golden["results"]["edited"]["mcf"]["per_record"]
    assert [r["rewrite_prompts_correct"] for r in base] != [r["rewrite_prompts_correct"] for r in edited]


@pytest.mark.parametrize("weights", ["base", "edited"])
def test_generation_metrics_equal_the_reference(golden, setup, weights):
    model, tok, states = setup
    model.load_state_dict(states[weights])
    ds = D.load_counterfact(FIX / "datasets" / "mcf.json")
    snips = M.load_snippets(FIX / "datasets" / "attribute_snippets.json")
    tfidf = M.Tfidf.fit([s["text"] for samples in snips.values() for s in samples])
    assert tfidf.vocab == golden["tfidf"]["vocab"]
    assert tfidf.idf.tolist() == pytest.approx(golden["tfidf"]["idf"], rel=1e-12)
    # the first four records (generation is the slow part; the loop is the same for every record)
    ours = M.generation_scores(model, tok, ds.records[:4], snippets=snips, tfidf=tfidf,
                               max_out_len=golden["gen_len"])
    assert len(ours) == 4
    for i, (o, r) in enumerate(zip(ours, golden["results"][weights]["mcf"]["per_record"])):
        assert o["text"] == r["text"], (weights, i)
        assert o["ngram_entropy"] == pytest.approx(r["ngram_entropy"], rel=1e-12), (weights, i)
        assert o["reference_score"] == pytest.approx(r["reference_score"], rel=1e-9), (weights, i)
        assert _close(o["essence_score"], r["essence_score"]), (weights, i)
