"""benchmarks/work_count.py counts token-layer evaluations exactly: forward (real and padded tokens, also over a
cached prefix), backward through whole layers only, per (nested) phase; wrapped functions are restored."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest
import torch
from tiny_models import llama

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from work_count import Work, WorkCounter, merge  # noqa: E402

from zu_fast.method.prefix_cache import cache_kwarg  # noqa: E402

LAYERS = 4


def _batch(b: int, t: int, pad: list[int]):
    ids = torch.randint(3, 200, (b, t))
    mask = torch.ones(b, t, dtype=torch.long)
    for i, p in enumerate(pad):
        if p:
            mask[i, t - p:] = 0  # right padding
    return ids, mask


@pytest.mark.parametrize("b,t,pad", [(1, 5, [0]), (3, 7, [0, 2, 6]), (2, 1, [0, 0])])
def test_forward_counts_real_and_padded_tokens_per_layer(b, t, pad):
    model, _ = llama(layers=LAYERS)
    ids, mask = _batch(b, t, pad)
    with WorkCounter(model, "model.layers.{}") as counter, torch.no_grad():
        with counter.phase("a"):
            model(input_ids=ids, attention_mask=mask)
    w = counter.work["a"]
    assert w == Work(fwd_real=int(mask.sum()) * LAYERS, fwd_padded=b * t * LAYERS, calls=LAYERS)


def test_a_cached_prefix_counts_only_the_new_tokens():
    model, _ = llama(layers=LAYERS)
    ids, mask = _batch(2, 6, [0, 0])
    with torch.no_grad():
        cache = model(input_ids=ids[:, :4], attention_mask=mask[:, :4], use_cache=True).past_key_values
    mask[1, 5] = 0  # a padded new token
    with WorkCounter(model, "model.layers.{}") as counter, torch.no_grad():
        with counter.phase("suffix"):
            model(input_ids=ids[:, 4:], attention_mask=mask, **{cache_kwarg(model): cache}, use_cache=True)
    assert counter.work["suffix"] == Work(fwd_real=3 * LAYERS, fwd_padded=4 * LAYERS, calls=LAYERS)


@pytest.mark.parametrize("at", [0, 1, 3])
def test_backward_counts_the_layers_above_the_first_gradient(at):
    """δ added at decoder layer ``at``'s output: a gradient flows back through layers at+1.., not through
    ``at`` itself nor below (their inputs need none)."""
    model, _ = llama(layers=LAYERS)
    for p in model.parameters():
        p.requires_grad_(False)
    ids, mask = _batch(2, 5, [0, 1])
    delta = torch.zeros(model.config.hidden_size, requires_grad=True)

    def add(module, args, out):
        h = out[0] if isinstance(out, tuple) else out
        h = h + delta
        return (h, *out[1:]) if isinstance(out, tuple) else h

    handle = model.model.layers[at].register_forward_hook(add)
    try:
        with WorkCounter(model, "model.layers.{}") as counter:
            with counter.phase("step"):
                loss = model(input_ids=ids, attention_mask=mask).logits.float().square().mean()
            with counter.phase("other phase"):  # the gradient counts for the phase of the forward
                loss.backward()
    finally:
        handle.remove()
    w = counter.work["step"]
    above = LAYERS - 1 - at
    assert (w.bwd_real, w.bwd_padded) == (9 * above, 10 * above)
    assert (w.fwd_real, w.fwd_padded) == (9 * LAYERS, 10 * LAYERS)
    assert "other phase" not in counter.work


def test_phases_nest_with_exclusive_time_and_wrapped_functions_are_restored():
    model, _ = llama(layers=LAYERS)
    ids, mask = _batch(1, 3, [0])

    class Mod:
        @staticmethod
        def run(n):
            time.sleep(0.02)
            with torch.no_grad():
                model(input_ids=ids[:, :n], attention_mask=mask[:, :n])
            return n

    original = Mod.run
    counter = WorkCounter(model, "model.layers.{}")
    counter.wrap(Mod, "run", lambda a, k: f"inner {a[0]}", record=True)
    with counter:
        with counter.phase("outer"):
            time.sleep(0.02)
            assert Mod.run(2) == 2
            assert Mod.run(3) == 3
        with counter.phase(None):  # no phase of its own: to the enclosing one ("other" at the top)
            with torch.no_grad():
                model(input_ids=ids, attention_mask=mask)
    assert Mod.run is original
    assert [c[0] for c in counter.calls] == ["run", "run"] and [c[3] for c in counter.calls] == [2, 3]
    assert counter.work["inner 2"].fwd_padded == 2 * LAYERS
    assert counter.work["inner 3"].fwd_padded == 3 * LAYERS
    assert counter.work["other"].fwd_padded == 3 * LAYERS
    assert "outer" not in counter.work  # its forwards ran in the nested phases
    assert 0.015 < counter.seconds["outer"] < counter.seconds["outer"] + counter.seconds["inner 2"]
    assert counter.seconds["inner 2"] >= 0.015
    assert counter.total(["inner 2", "inner 3"]).fwd_padded == 5 * LAYERS
    assert counter.total().calls == 3 * LAYERS


def test_merge_adds_phase_by_phase():
    a = {"x": Work(1, 2, 3, 4, 5)}
    b = {"x": Work(1, 1, 1, 1, 1), "y": Work(0, 1, 0, 1, 1)}
    assert merge(a, b) == {"x": Work(2, 3, 4, 5, 6), "y": Work(0, 1, 0, 1, 1)}
    assert merge(a, b)["x"].real == 6 and merge(a, b)["x"].padded == 8
