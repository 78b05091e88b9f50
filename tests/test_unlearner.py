"""zu_fast.Unlearner: one call forgets, measures and restores; EasyEdit/CounterFact argument shapes."""

from __future__ import annotations

import pytest
import torch
from tiny_models import corpus, llama

import zu_fast
from zu_fast import UnlearnConfig, ZuFastError, metrics

pytestmark = pytest.mark.filterwarnings("ignore:zu_fast")  # a random model's edits trip the size warnings

PROMPTS = ["Alice Morvan was born in", "{} works for"]  # full text, and a template
SUBJECTS = ["Alice Morvan", "Bob Kestrel"]
ANSWERS = ["Lisbon", "Acme"]
PARAPHRASES = [["The city where Alice Morvan was born is"], "Bob Kestrel is a person of"]
NEIGHBOURS = [("Carla Dunmore was born in", "Oslo"), {"prompt": "Deniz Quill works for", "ground_truth": "Globex"}]


@pytest.fixture(scope="module")
def setup():
    old = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: thread start-up dominates on a shared machine
    model, tok = llama()
    cfg = UnlearnConfig.for_model(model, layers=[1, 2], progress=False, v_num_grad_steps=4,
                                  context_template_length=3)
    stats = zu_fast.collect_stats(model, tok, corpus(40), cfg, cache=False)
    yield model, tok, cfg, stats
    torch.set_num_threads(old)


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_forget_equals_unlearn_and_reports_the_metrics(setup):
    model, tok, cfg, stats = setup
    before_w = _state(model)
    res = zu_fast.Unlearner(model, tok, cfg, stats=stats, heldout_texts=corpus(8, seed=1)).forget(
        prompts=PROMPTS, subjects=SUBJECTS, ground_truth=ANSWERS, paraphrases=PARAPHRASES, neighbours=NEIGHBOURS)
    edited = _state(model)
    assert [r.text for r in res.requests] == ["Alice Morvan was born in", "Bob Kestrel works for"]
    assert res.requests[0].prompt == "{} was born in" and res.requests[1].target_true == "Acme"
    # the metrics are those of the given prompts, before and after
    assert res.before["n_paraphrase"] == 2 and res.before["n_neighborhood"] == 2 and res.before["n_records"] == 2
    after = metrics.evaluate(model, tok, res.records, corpus(8, seed=1), neutral_target=cfg.neutral_target)
    assert after == res.after
    assert res.before["perplexity"] != res.after["perplexity"]  # the weights moved
    assert "Efficacy" in str(res) and "forgot 2 facts" in str(res)
    res.edit.restore()
    assert all(torch.equal(v, before_w[k]) for k, v in model.state_dict().items())
    # the same edit as zu_fast.unlearn on the same requests
    reqs = [{"prompt": "{} was born in", "subject": "Alice Morvan", "target_true": "Lisbon"},
            {"prompt": "{} works for", "subject": "Bob Kestrel", "target_true": "Acme"}]
    edit = zu_fast.unlearn(model, tok, reqs, cfg, stats=stats)
    assert all(torch.equal(v, edited[k]) for k, v in model.state_dict().items())
    edit.restore()


def test_request_shapes(setup):
    model, tok, cfg, stats = setup
    unl = zu_fast.Unlearner(model, tok, cfg, stats=stats)
    a = unl.requests(PROMPTS, SUBJECTS, ANSWERS)
    b = unl.requests(PROMPTS, SUBJECTS, target_true=ANSWERS)
    c = unl.requests(requests=[{"prompt": "Alice Morvan was born in", "subject": "Alice Morvan",
                                "ground_truth": "Lisbon"},
                               {"prompt": "{} works for", "subject": "Bob Kestrel", "target_true": {"str": "Acme"}}])
    assert [(r.prompt, r.subject, r.target_true) for r in a] == [(r.prompt, r.subject, r.target_true) for r in b] \
        == [(r.prompt, r.subject, r.target_true) for r in c]
    single = unl.requests("Alice Morvan was born in", "Alice Morvan", "Lisbon")
    assert len(single) == 1 and single[0].prompt == "{} was born in"


@pytest.mark.parametrize("kwargs,match", [
    ({"prompts": PROMPTS, "subjects": SUBJECTS[:1], "answers": ANSWERS}, "1 given for 2"),
    ({"prompts": ["Nobody was born in"], "subjects": ["Alice Morvan"], "answers": ["Lisbon"]},
     r"prompts\[0\]: subject 'Alice Morvan' not found"),
    ({"prompts": PROMPTS, "subjects": SUBJECTS, "answers": ANSWERS, "ground_truth": ANSWERS}, "answers once"),
    ({"prompts": PROMPTS, "subjects": SUBJECTS}, "needs prompts, subjects and answers"),
    ({"prompts": PROMPTS, "subjects": SUBJECTS, "answers": ANSWERS, "paraphrases": ["only one"]}, "1 given for 2"),
    ({"prompts": PROMPTS, "subjects": SUBJECTS, "answers": ANSWERS, "neighbours": [("x",)]}, "neighbour"),
    ({"prompts": PROMPTS, "subjects": SUBJECTS, "answers": ANSWERS, "neighbours": [], "neighbors": []},
     "not both"),
    ({"requests": [{"prompt": "{} x"}], "prompts": PROMPTS}, "not both"),
])
def test_bad_arguments_are_clear_errors_and_leave_weights(setup, kwargs, match):
    model, tok, cfg, stats = setup
    before = _state(model)
    with pytest.raises(ZuFastError, match=match):
        zu_fast.Unlearner(model, tok, cfg, stats=stats).forget(**kwargs)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_neighbour_shapes():
    from zu_fast.unlearner import _neighbour_lists

    pairs = [("A was born in", "Oslo"), ("B works for", "Acme")]
    shared = _neighbour_lists(pairs, 2)  # one shared list: kept with the first request
    assert shared == [[{"prompt": "A was born in", "target": "Oslo"}, {"prompt": "B works for", "target": "Acme"}], []]
    per = _neighbour_lists([[pairs[0]], [pairs[1]]], 2)
    assert per == [[{"prompt": "A was born in", "target": "Oslo"}], [{"prompt": "B works for", "target": "Acme"}]]
    easy = _neighbour_lists({"prompt": ["A was born in", "B works for"], "ground_truth": ["Oslo", "Acme"]}, 2)
    assert easy == shared


def test_statistics_are_collected_from_a_corpus_once(setup, tmp_path, monkeypatch):
    model, tok, cfg, _ = setup
    with pytest.raises(ZuFastError, match="corpus statistics"):
        zu_fast.Unlearner(model, tok, cfg).forget(PROMPTS, SUBJECTS, ANSWERS)
    monkeypatch.setenv("ZU_FAST_CACHE", str(tmp_path))
    unl = zu_fast.Unlearner(model, tok, cfg, corpus=corpus(40))
    res = unl.forget(PROMPTS, SUBJECTS, ANSWERS, evaluate=False)
    assert res.before == {} and unl.stats is not None
    first = unl.stats
    res.edit.restore()
    unl.forget(PROMPTS[:1], SUBJECTS[:1], ANSWERS[:1], evaluate=False).edit.restore()
    assert unl.stats is first


def test_a_dropped_duplicate_drops_its_own_paraphrases_and_neighbours(setup):
    model, tok, cfg, stats = setup
    before_w = _state(model)
    prompts = PROMPTS + ["{} was born in"]  # the third repeats the first as a template
    with pytest.warns(UserWarning, match="1 duplicate request"):
        res = zu_fast.Unlearner(model, tok, cfg, stats=stats).forget(
            prompts=prompts, subjects=SUBJECTS + ["Alice Morvan"], answers=ANSWERS + ["Lisbon"],
            paraphrases=PARAPHRASES + [["Alice Morvan's birthplace is"]],
            neighbours=[[NEIGHBOURS[0]], [NEIGHBOURS[1]], [("Eve Ward was born in", "Rome")]], evaluate=False)
    assert [r.subject for r in res.requests] == SUBJECTS
    assert [rec["paraphrase_prompts"] for rec in res.records] == [PARAPHRASES[0], [PARAPHRASES[1]]]
    assert [len(rec["neighborhood_prompts"]) for rec in res.records] == [1, 1]
    assert "Eve Ward" not in str(res.records)
    res.edit.restore()
    assert all(torch.equal(v, before_w[k]) for k, v in model.state_dict().items())
