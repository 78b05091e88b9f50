"""unlearn() end to end on tiny random models: bad input, restore, save/load/apply, batching."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_models import REQUESTS, corpus, gpt2, llama, tokenizer

import zu_fast
from zu_fast import Edit, UnlearnConfig, UnlearnRequest, ZuFastError
from zu_fast.method.targets import optimize_deltas
from zu_fast.model import continuation_ids
from zu_fast.requests import normalize_requests

TEMPLATES = [["{}"], ["Because I. {}", "You. {}"]]


def _setup(**kw):
    model, tok = llama()
    cfg = UnlearnConfig.for_model(model, **{"layers": [1, 2], "progress": False, "v_num_grad_steps": 4, **kw})
    stats = zu_fast.collect_stats(model, tok, corpus(40), cfg, cache=False)
    return model, tok, cfg, stats


def _weights(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same(model, before):
    return all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_unlearn_changes_weights_and_restore_is_bit_exact():
    model, tok, cfg, stats = _setup()
    before = _weights(model)
    edit = zu_fast.unlearn(model, tok, REQUESTS, cfg, stats=stats, context_templates=TEMPLATES)
    assert not _same(model, before)
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert sorted(changed) == ["model.layers.1.mlp.down_proj.weight", "model.layers.2.mlp.down_proj.weight"]
    assert set(edit.report.layers) == {1, 2} and edit.report.timings["solve"] >= 0
    edit.restore()
    assert _same(model, before)


def test_save_load_apply_reproduces_the_edit_bit_for_bit(tmp_path):
    model, tok, cfg, stats = _setup()
    base = copy.deepcopy(model)
    edit = zu_fast.unlearn(model, tok, REQUESTS, cfg, stats=stats, context_templates=TEMPLATES)
    edited = _weights(model)
    edit.save(tmp_path / "edit")
    loaded = Edit.load(tmp_path / "edit")
    assert loaded.layers == [1, 2] and loaded.report.n_requests == 3
    with pytest.raises(ZuFastError, match="already applied"):
        Edit.load(tmp_path / "edit").apply(model)
    base_before = _weights(base)
    loaded.apply(base)
    assert _same(base, edited)
    loaded.restore()
    assert _same(base, base_before)
    other, _ = llama(seed=1)
    with pytest.raises(ZuFastError, match="refusing"):
        Edit.load(tmp_path / "edit").apply(other)


@pytest.mark.parametrize(
    "requests,match",
    [
        ([], "no requests"),
        ([{"prompt": "was born in", "subject": "Alice Morvan", "target_true": "Lisbon"}], "exactly one"),
        ([{"prompt": "{} was born in", "subject": "  ", "target_true": "Lisbon"}], "subject is empty"),
        ([{"prompt": "{} was born in", "subject": "Bob", "target_true": ""}], "target_true"),
        ([{"prompt": "{} was born in", "subject": "Bob"}], "missing keys"),
    ],
)
def test_bad_requests_raise_and_leave_weights_untouched(requests, match):
    model, tok, cfg, stats = _setup()
    before = _weights(model)
    with pytest.raises(ZuFastError, match=match):
        zu_fast.unlearn(model, tok, requests, cfg, stats=stats, context_templates=TEMPLATES)
    assert _same(model, before)


def test_subject_not_found_in_prompt():
    with pytest.raises(ZuFastError, match="not found"):
        UnlearnRequest.from_text("Alice was born in", "Bob", "Lisbon")
    r = UnlearnRequest.from_text("Alice {x} was born in", "Alice", "Lisbon")
    assert r.prompt == "{} {{x}} was born in" and r.text == "Alice {x} was born in"


class _SlowTokenizer:
    """A tokenizer without offsets (like a slow one): the prefix-length fallback is used."""

    def __init__(self, tok):
        self.tok = tok

    def __call__(self, texts, **kw):
        if kw.get("return_offsets_mapping"):
            raise NotImplementedError
        return self.tok(texts, **kw)

    def __getattr__(self, name):
        return getattr(self.tok, name)


def test_subject_token_ranges_first_and_last():
    from zu_fast.model import subject_spans, subject_token_ranges

    tok = tokenizer()
    templates = [r["prompt"] for r in REQUESTS] + ["{}", "In {} speaks"]
    subjects = [r["subject"] for r in REQUESTS] + ["Dora Quill", "Evan Roe"]
    ids, first, last = subject_token_ranges(tok, templates, subjects)
    assert (ids, last) == subject_spans(tok, templates, subjects)
    for s, x, a, b in zip(subjects, ids, first, last):
        assert s in tok.decode(x[a : b + 1])  # the span covers the subject ...
        assert s not in tok.decode(x[a + 1 : b + 1])  # ... and starts at its first token
        assert x[0] == tok.bos_token_id and a >= 1
    assert subject_token_ranges(_SlowTokenizer(tok), templates, subjects) == (ids, first, last)


@pytest.mark.parametrize(
    "changes,match",
    [
        ({"layers": [1, 9]}, "layer 9 out of range"),
        ({"rewrite_module_tmp": "model.layers.{}.mlp.nothing"}, "not found"),
        ({"layer_module_tmp": "transformer.h.{}"}, "matched nothing"),
    ],
)
def test_bad_config_raises_and_leaves_weights_untouched(changes, match):
    model, tok, cfg, stats = _setup()
    before = _weights(model)
    with pytest.raises(ZuFastError, match=match):
        zu_fast.unlearn(model, tok, REQUESTS, cfg.replace(**changes), stats=stats, context_templates=TEMPLATES)
    assert _same(model, before)


def test_failure_in_a_later_layer_rolls_back_the_earlier_ones():
    model, tok, cfg, stats = _setup(regularization_lam=0.0)
    stats[2].kk.zero_()  # layer 2's system becomes singular; layer 1 is edited first
    stats[2].ks.zero_()
    before = _weights(model)
    with pytest.raises(ZuFastError, match="layer 2.*singular"):
        zu_fast.unlearn(model, tok, REQUESTS, cfg, stats=stats, context_templates=TEMPLATES)
    assert _same(model, before)


def test_nan_statistics_raise_and_leave_weights_untouched():
    model, tok, cfg, stats = _setup()
    stats[1].kk[3, 3] = float("inf")
    before = _weights(model)
    with pytest.raises(ZuFastError, match="layer 1.*NaN/Inf"):
        zu_fast.unlearn(model, tok, REQUESTS, cfg, stats=stats, context_templates=TEMPLATES)
    assert _same(model, before)


def test_unlearn_without_statistics_is_an_error():
    model, tok, cfg, _ = _setup()
    with pytest.raises(ZuFastError, match="statistics"):
        zu_fast.unlearn(model, tok, REQUESTS, cfg)


def test_batched_targets_equal_separate_runs():
    model, tok, cfg, _ = _setup()
    cfg = cfg.replace(v_num_grad_steps=6, v_lr=0.05, v_weight_decay=0.01)
    reqs = normalize_requests(REQUESTS)
    eos = [continuation_ids(tok, None)]
    together = optimize_deltas(model, tok, reqs, cfg, TEMPLATES, 2, eos * 3)
    for i, r in enumerate(reqs):
        alone = optimize_deltas(model, tok, [r], cfg, TEMPLATES, 2, eos)
        assert torch.allclose(together.delta[i], alone.delta[0], rtol=1e-4, atol=1e-6)
        assert int(together.steps[i]) == int(alone.steps[0])


def test_converged_requests_leave_the_batch_and_the_rest_is_unchanged():
    """Requests that reach v_early_stop_loss stop being forwarded; every row still equals its own
    separate run (the compacted batch computes the same maths)."""
    model, tok, cfg, _ = _setup()
    # h_init is ~0.13 on this model: a small lr, and a stop threshold that one request crosses mid-run
    cfg = cfg.replace(v_num_grad_steps=15, v_lr=0.01, v_weight_decay=0.0, kl_factor=0.0, clamp_norm_factor=10.0,
                      v_early_stop_loss=5.44, targets={"lr_relative": False})
    reqs = normalize_requests(REQUESTS)
    targets = [[7], [11], [13]]
    rows_forwarded = []
    handle = model.register_forward_pre_hook(
        lambda m, args, kw: rows_forwarded.append(kw["input_ids"].shape[0]), with_kwargs=True)
    try:
        together = optimize_deltas(model, tok, reqs, cfg, TEMPLATES, 1, targets)
    finally:
        handle.remove()
    steps = together.steps.tolist()
    assert 0 < steps[2] < steps[0] == steps[1] == 14  # request 2 converged mid-run, the others ran out
    per_request = len(TEMPLATES[0]) + len(TEMPLATES[1]) + 1  # context prompts + the KL prompt
    # the clean pass forwards everything; then request 2 is forwarded in iterations 0..steps[2] (the
    # last finds it converged) and the others in all 15, in however many length buckets
    assert rows_forwarded[0] == 3 * per_request
    assert sum(rows_forwarded[1:]) == per_request * (2 * 15 + steps[2] + 1)
    for i, r in enumerate(reqs):
        alone = optimize_deltas(model, tok, [r], cfg, TEMPLATES, 1, [targets[i]])
        assert torch.allclose(together.delta[i], alone.delta[0], rtol=1e-4, atol=1e-6)
        assert int(together.steps[i]) == int(alone.steps[0])
        assert float(together.final_loss[i]) == pytest.approx(float(alone.final_loss[0]), rel=1e-5)


@pytest.mark.parametrize("seed", range(6))
def test_length_buckets_are_the_cheapest_partition(seed):
    """Against brute force over every split of the sorted lengths into ≤ 4 contiguous buckets."""
    import itertools
    import random

    from zu_fast.method.targets import length_buckets

    rnd = random.Random(seed)
    lengths = sorted(rnd.choice([3, 5, 9, 14, 20, 21, 34]) for _ in range(rnd.randint(1, 12)))

    def tokens(bounds):
        return sum((j - i) * lengths[j - 1] for i, j in zip([0, *bounds[:-1]], bounds))

    best = {}
    cuts = range(1, len(lengths))
    for k in range(1, 5):
        best[k] = min((tokens([*c, len(lengths)]) for c in itertools.combinations(cuts, k - 1)), default=None)
    got = length_buckets(lengths, 4, 0.0)  # no minimum gain: the best of up to 4 buckets
    assert got[-1] == len(lengths) and got == sorted(set(got))
    assert tokens(got) == min(v for v in best.values() if v is not None)
    one = length_buckets(lengths, 4, 1.0)  # no extra bucket is ever worth it
    assert one == [len(lengths)]
    mid = length_buckets(lengths, 4, 0.1)
    k = len(mid)
    assert tokens(mid) == best[k]
    if k < 4 and best.get(k + 1) is not None:
        assert best[k + 1] > 0.9 * best[k]  # it stopped because one more bucket saves < 10%


def test_skipping_lower_layers_gives_the_same_optimisation():
    import zu_fast.method.targets as targets_mod

    model, tok, cfg, _ = _setup()
    cfg = cfg.replace(v_num_grad_steps=3)
    reqs = normalize_requests(REQUESTS[:2])
    eos = [continuation_ids(tok, None)] * 2
    fast = optimize_deltas(model, tok, reqs, cfg, TEMPLATES, 2, eos)
    orig = targets_mod.inject_at_layer

    def full(*args, **kw):  # force the fallback: a hook replaces the output, every layer runs
        args = list(args)
        args[6] = False
        return orig(*args, **kw)

    targets_mod.inject_at_layer = full
    try:
        slow = optimize_deltas(model, tok, reqs, cfg, TEMPLATES, 2, eos)
    finally:
        targets_mod.inject_at_layer = orig
    assert torch.allclose(fast.delta, slow.delta, rtol=1e-4, atol=1e-6)
    assert torch.allclose(fast.initial_loss, slow.initial_loss, rtol=1e-5)


def test_gpt2_style_model_with_conv1d_and_bias():
    model, tok = gpt2()
    cfg = UnlearnConfig.for_model(model, progress=False, v_num_grad_steps=3)
    stats = zu_fast.collect_stats(model, tok, corpus(30), cfg, cache=False)
    before = _weights(model)
    edit = zu_fast.unlearn(model, tok, REQUESTS, cfg, stats=stats, context_templates=TEMPLATES)
    assert not _same(model, before)
    edit.restore()
    assert _same(model, before)


def test_neutral_target_string_and_exact_form():
    model, tok, cfg, stats = _setup(neutral_target="I don't know.", closed_form="exact")
    edit = zu_fast.unlearn(model, tok, REQUESTS[:1], cfg, stats=stats, context_templates=TEMPLATES)
    assert edit.report.targets["z_loss_initial"] > 0
    edit.restore()


def _flag_kinds(edit):
    return {f["kind"] for f in edit.report.flags}


def test_flags_warn_with_numbers_and_survive_save_load(tmp_path):
    # 4 steps cannot reach EOS on a random model; a tiny limit makes every layer's move "large" (and far beyond
    # the hard limit: allowed here, to see the flag); paper weights on a 32-wide model realise little of the residual
    model, tok, cfg, stats = _setup(max_rel_weight_change=1e-6, min_gap_closed=0.99, forget_leverage=None,
                                    allow_large_change=True)
    before = _weights(model)
    with pytest.warns(UserWarning) as rec:
        edit = zu_fast.unlearn(model, tok, REQUESTS, cfg, stats=stats, context_templates=TEMPLATES)
    text = " ".join(str(w.message) for w in rec)
    assert {"target_not_converged", "large_weight_change", "target_not_reached"} <= _flag_kinds(edit)
    assert "max_rel_weight_change=1e-06" in text and "min_gap_closed=0.99" in text and "set forget_leverage" in text
    large = [f for f in edit.report.flags if f["kind"] == "large_weight_change"]
    assert sorted(f["layer"] for f in large) == [1, 2] and all(f["rel_weight_change"] > 1e-6 for f in large)
    for row in edit.report.layers.values():
        assert 0.0 < row["leverage_mean"] < 1.0 and row["forget_weight_fk"] == cfg.closed_form.forget_weight_k
    edit.save(tmp_path / "e")
    assert _flag_kinds(Edit.load(tmp_path / "e")) == _flag_kinds(edit)
    assert "target_not_reached" in str(edit.report)
    edit.restore()
    assert _same(model, before)


def test_leverage_rule_raises_the_forget_weight_and_closes_more_of_the_gap():
    # the paper's weights as set, the reference's absolute step (with the scale-free one this random model's
    # targets lie where free targets meet the projector: the gap turns negative, test_residual.py)
    model, tok, cfg, stats = _setup(v_num_grad_steps=10, forget_leverage=None, targets={"lr_relative": False})
    plain = zu_fast.unlearn(model, tok, REQUESTS, cfg, stats=stats, context_templates=TEMPLATES)
    gap_plain = plain.report.targets["z_gap_closed"]
    plain.restore()
    ruled = zu_fast.unlearn(model, tok, REQUESTS, cfg.replace(forget_leverage=0.9), stats=stats,
                            context_templates=TEMPLATES)
    rows = ruled.report.layers.values()
    assert all(r["leverage_mean"] == pytest.approx(0.9, abs=1e-6) for r in rows)
    assert all(r["forget_weight_fk"] > cfg.closed_form.forget_weight_k for r in rows)
    assert ruled.report.targets["z_gap_closed"] > gap_plain
    ruled.restore()


def test_unreached_targets_are_retried_with_a_wider_clamp_only_for_those_rows():
    from zu_fast.method.targets import retry_unreached

    # a tight ball (the loss stays high) and, on this random model, a retry that may or may not help
    model, tok, cfg, _ = _setup(v_num_grad_steps=6, clamp_norm_factor=0.05, v_weight_decay=0.0, kl_factor=0.0)
    reqs = normalize_requests(REQUESTS)
    eos = [continuation_ids(tok, None)] * len(reqs)
    first = optimize_deltas(model, tok, reqs, cfg, TEMPLATES, 2, eos, progress=False)
    warn = float(first.final_loss.median())  # half the rows count as "not reached"
    cfg = cfg.replace(target_warn_loss=warn, target_retry_clamp=20.0)
    res, retried, improved = retry_unreached(model, tok, reqs, cfg, TEMPLATES, 2, eos, first)
    bad = first.final_loss > warn
    assert retried == int(bad.sum()) >= 1 and improved >= 1, (retried, improved)
    assert torch.equal(res.delta[~bad], first.delta[~bad]) and torch.equal(res.final_loss[~bad], first.final_loss[~bad])
    assert (res.final_loss[bad] <= first.final_loss[bad]).all()  # a retry is kept only when it ends lower
    assert improved == int((res.final_loss < first.final_loss).sum())
    kept = bad & (res.final_loss < first.final_loss)
    assert torch.equal(res.delta[bad & ~kept], first.delta[bad & ~kept])
    assert (res.delta[kept].norm(dim=1) > 0.05 * res.h_init[kept].norm(dim=1) * 1.01).all()  # outside the old ball
    assert (res.steps[bad] > first.steps[bad]).all()
    off = cfg.replace(target_retry_clamp=None)
    assert retry_unreached(model, tok, reqs, off, TEMPLATES, 2, eos, first)[1:] == (0, 0)
    with pytest.raises(ZuFastError, match="retry_clamp"):
        cfg.replace(target_retry_clamp=1.0)
