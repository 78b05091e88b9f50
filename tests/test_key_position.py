"""The key position (issue 24, ``fact_token``): keys read and z placed at the subject's last token (the paper's
default) or at the prompt's last token.

- ``key_positions`` picks the right token, for plain and context-template prompts;
- at the subject's last token a subject-first prompt cannot see its relation (causal attention): two facts of one
  subject share one key there, and have different keys at the prompt's last token;
- the readers (dense and MoE) and the target optimisation use the configured position; z's clean start h_init is
  the z layer's output at that token;
- an edit with ``fact_token="last"`` runs end to end and restores bit for bit; the flat key and the CLI map to it.
"""

from __future__ import annotations

import pytest
import torch
from tiny_models import REQUESTS, corpus, llama

import zu_fast
from zu_fast import UnlearnConfig, ZuFastError
from zu_fast.method.keys import key_positions, read_at_subject
from zu_fast.method.targets import optimize_deltas
from zu_fast.model import Capture, edit_targets
from zu_fast.requests import normalize_requests

FAST = dict(progress=False, v_num_grad_steps=3, original_representation="clean", stats_batch_tokens=512)
TEMPLATES = [["{}"], ["Because. {}"]]


@pytest.fixture(scope="module")
def tiny():
    torch.set_num_threads(1)
    return llama(layers=4, hidden=32, d_ff=48, seed=2)


def test_key_positions(tiny):
    _, tok = tiny
    prompts = ["{} was born in", "The city where {} was born is", "Because. {} works for"]
    subjects = ["Alice Morvan", "Bob Kestrel", "Carla Dunmore"]
    ids, last = key_positions(tok, prompts, subjects, None, "last")
    assert last == [len(x) - 1 for x in ids]
    ids2, subj = key_positions(tok, prompts, subjects, None, "subject_last")
    assert ids2 == ids
    for x, i, s in zip(ids, subj, subjects):
        assert tok.decode(x[: i + 1]).endswith(s) and i < len(x) - 1
    with pytest.raises(ZuFastError, match="fact_token"):
        key_positions(tok, prompts, subjects, None, "middle")


def _module_input_at(model, tok, text, module, pos):
    ids = tok(text, return_tensors="pt")
    with Capture(model, inputs=[module]) as cap:
        model(**ids)
    return cap.inputs[module][0, pos].float()


@pytest.mark.parametrize("fact_token", ["subject_last", "last"])
def test_readers_use_the_key_position(tiny, fact_token):
    model, tok = tiny
    cfg = UnlearnConfig.for_model(model, **FAST, fact_token=fact_token)
    targets = edit_targets(model, cfg.layers, cfg.locate)
    reqs = normalize_requests([{"prompt": "{} was born in", "subject": "Alice Morvan", "target_true": "Lisbon"},
                               {"prompt": "{} works for", "subject": "Alice Morvan", "target_true": "Acme"}])
    rd = read_at_subject(model, tok, reqs, cfg, [["{}"]], targets)
    t = targets[0]
    for i, r in enumerate(reqs):
        ids, pos = key_positions(tok, [r.prompt], [r.subject], None, fact_token)
        k = _module_input_at(model, tok, r.text, t.name, pos[0])
        torch.testing.assert_close(rd.keys[t.layer][i], k, rtol=1e-5, atol=1e-6)
    # two facts of one subject in subject-first prompts: one key at the subject, two at the prompt's end
    gap = float((rd.keys[t.layer][0] - rd.keys[t.layer][1]).norm() / rd.keys[t.layer][0].norm())
    assert (gap < 1e-6) == (fact_token == "subject_last"), gap


@pytest.mark.parametrize("fact_token", ["subject_last", "last"])
def test_targets_place_delta_at_the_key_position(tiny, fact_token):
    model, tok = tiny
    cfg = UnlearnConfig.for_model(model, **FAST, fact_token=fact_token)
    reqs = normalize_requests(REQUESTS)
    res = optimize_deltas(model, tok, reqs, cfg, TEMPLATES, cfg.z_layer, [[tok.eos_token_id]] * len(reqs),
                          progress=False)
    name = cfg.locate.layer_module.format(cfg.z_layer)
    for i, r in enumerate(reqs):
        _, pos = key_positions(tok, [r.prompt], [r.subject], None, fact_token)
        with Capture(model, outputs=[name]) as cap:
            model(**tok(r.text, return_tensors="pt"))
        torch.testing.assert_close(res.h_init[i], cap.outputs[name][0, pos[0]].float(), rtol=1e-5, atol=1e-6)
    assert bool((res.final_loss != res.initial_loss).all())  # δ at that token reaches the loss


def test_edit_at_the_last_token_end_to_end(tiny):
    model, tok = tiny
    cfg = UnlearnConfig.for_model(model, **FAST, fact_token="last", method="gd", gd_steps=20)
    stats = zu_fast.collect_stats(model, tok, corpus(80), cfg, cache=False)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    edit = zu_fast.unlearn(model, tok, REQUESTS, cfg, stats=stats, context_templates=TEMPLATES)
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert edit.config.templates.fact_token == "last"
    edit.restore()
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_flat_key_and_sections():
    assert UnlearnConfig(fact_token="last").templates.fact_token == "last"
    assert UnlearnConfig().templates.fact_token == "subject_last"  # the paper's default
    assert UnlearnConfig().replace(templates={"fact_token": "last"}).to_flat()["fact_token"] == "last"
    with pytest.raises(ZuFastError, match="fact_token"):
        UnlearnConfig(fact_token="first")
