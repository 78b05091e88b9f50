"""Steps 2 and 3 through the cached prefix (``zu_fast/method/prefix_cache.py``) compute what full-length steps
compute, on fewer tokens; where the cache does not reproduce the clean forward, or the model takes no cache,
the optimisation goes back to full-length steps and its result is the full-length one."""

from __future__ import annotations

import warnings

import pytest
import torch
from family_models import build
from tiny_models import REQUESTS, tokenizer

from zu_fast import UnlearnConfig
from zu_fast.method import prefix_cache
from zu_fast.method.targets import optimize_deltas
from zu_fast.requests import normalize_requests

# context templates of different lengths, so the subjects' last tokens sit at different positions in one batch
TEMPLATES = [["{}"], ["Because I. {}", "You and every company filled the hall. {}"]]
TARGETS = [[7, 9], [11], [13, 5, 6]]  # targets of different lengths: suffixes of different lengths


def _run(model, cfg, layer: int = 1, **kw):
    """optimize_deltas, and the number of input tokens the model was called with."""
    tokens = []
    handle = model.register_forward_pre_hook(
        lambda m, args, k: tokens.append(int(k["input_ids"].numel())), with_kwargs=True)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            res = optimize_deltas(model, tokenizer(), normalize_requests(REQUESTS), cfg, TEMPLATES, layer, TARGETS,
                                  **kw)
    finally:
        handle.remove()
    return res, sum(tokens)


def _same(a, b, rtol: float = 1e-4) -> None:
    scale = float(b.delta.norm())
    assert float((a.delta - b.delta).norm()) <= rtol * scale + 1e-7
    assert a.steps.tolist() == b.steps.tolist()
    assert torch.allclose(a.final_loss, b.final_loss, rtol=1e-4, atol=1e-6)
    assert torch.allclose(a.target, b.target, rtol=1e-4, atol=1e-6)


def _cfg(model, **kw):
    return UnlearnConfig.for_model(model, v_num_grad_steps=5, progress=False, **kw)


# llama: rotary positions; gpt2: learned positions, Conv1D; gemma2: post-norms, sliding window, soft-capping;
# deepseek_v3: MLA (keys and values of different widths); falcon: parallel attention and MLP
@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma2", "deepseek_v3", "falcon"])
@pytest.mark.parametrize("at_module", [False, True])
def test_cached_steps_equal_full_length_steps(family, at_module):
    model = build(family).eval()
    cfg = _cfg(model)
    cached, n_cached = _run(model, cfg, at_module=at_module)
    full, n_full = _run(model, cfg, at_module=at_module, suffix_cache=False)
    _same(cached, full)
    assert n_cached < 0.7 * n_full  # the prefixes were not forwarded again at every step


@pytest.mark.parametrize("position", ["subject_last", "last"])
@pytest.mark.parametrize("layer,at_module", [(0, True), (0, False), (2, False), (2, True)])
def test_key_positions_and_edge_layers(position, layer, at_module):
    """δ at the prompt's last token (the suffix is then the target only), in layer 0 (nothing below to stand in
    for) and in the top layer."""
    model = build("llama").eval()
    cfg = _cfg(model)
    cached, _ = _run(model, cfg, layer, at_module=at_module, position=position)
    full, _ = _run(model, cfg, layer, at_module=at_module, position=position, suffix_cache=False)
    _same(cached, full)


def test_offset_free_basis_warm_start_and_chunks():
    """targets.orthogonal's offset and free basis, a warm start, requests in chunks of 2 and one length bucket."""
    model = build("llama").eval()
    cfg = _cfg(model, targets_batch_size=2, targets_length_buckets=1)
    d = model.config.hidden_size
    g = torch.Generator().manual_seed(0)
    offset = 0.05 * torch.randn(len(REQUESTS), d, generator=g)  # [N, d]
    basis = torch.linalg.qr(torch.randn(d, 2, generator=g))[0]  # [d, 2]
    init = 0.02 * torch.randn(len(REQUESTS), d, generator=g)
    kw = dict(at_module=True, offset=offset, free_basis=basis, init=init)
    cached, n_cached = _run(model, cfg, **kw)
    full, n_full = _run(model, cfg, suffix_cache=False, **kw)
    _same(cached, full)
    assert n_cached < n_full
    free = cached.delta - offset
    assert float((free @ basis).abs().max()) < 1e-5  # the free part stayed orthogonal to the basis


@pytest.mark.parametrize("init", [False, True])
def test_a_cache_that_does_not_reproduce_the_clean_forward_falls_back(monkeypatch, init):
    """Wrong cached keys and values (here: zeros) fail the first step's check; the steps then run at full length
    and give the full-length result."""
    model = build("llama").eval()
    cfg = _cfg(model)
    kw = dict(at_module=True)
    if init:
        kw["init"] = 0.01 * torch.ones(len(REQUESTS), model.config.hidden_size)
    full, n_full = _run(model, cfg, suffix_cache=False, **kw)
    rows = prefix_cache.PrefixKV.rows

    def zeroed(self, sel, split):
        return {i: (torch.zeros_like(k), torch.zeros_like(v)) for i, (k, v) in rows(self, sel, split).items()}

    monkeypatch.setattr(prefix_cache.PrefixKV, "rows", zeroed)
    fallen, n_fallen = _run(model, cfg, **kw)
    _same(fallen, full, rtol=1e-6)
    assert n_fallen > n_full  # every full-length step, plus the cached attempt that was refused


def test_a_model_without_a_cache_argument_runs_full_length(monkeypatch):
    model = build("llama").eval()
    cfg = _cfg(model)
    full, n_full = _run(model, cfg, suffix_cache=False)

    def refuse(model):
        raise prefix_cache.CacheUnsupported("no cache here")

    monkeypatch.setattr(prefix_cache, "cache_kwarg", refuse)
    res, n = _run(model, cfg)
    _same(res, full, rtol=0)
    assert n == n_full


def test_suffix_views_right_align_prefixes():
    """``PrefixKV.rows``: row b's prefix (positions < split_b) ends in the last slot; slots in front are filled
    (masked by the caller), and keys and values of different widths are cut alike."""
    k = torch.arange(3 * 5, dtype=torch.float32).view(3, 1, 5, 1).expand(3, 2, 5, 4).contiguous()  # [S, h, T, dk]
    v = k[..., :3] * 10  # [S, h, T, dv]: another width
    pk = prefix_cache.PrefixKV({0: (k, v)}, 1, "past_key_values")
    sel, split = torch.tensor([2, 0]), torch.tensor([3, 1])
    out_k, out_v = pk.rows(sel, split)[0]
    assert out_k.shape == (2, 2, 3, 4) and out_v.shape == (2, 2, 3, 3)
    assert out_k[0, 0, :, 0].tolist() == [10.0, 11.0, 12.0]  # row 2, positions 0..2
    assert out_k[1, 0, -1, 0].item() == 0.0  # row 0, position 0 in the last slot
    assert torch.equal(out_v, out_k[..., :3] * 10)


@pytest.mark.parametrize("at_module", [False, True])
def test_requests_done_at_delta_zero_take_no_step(at_module):
    """At δ = 0 the first step's loss is the clean forward's: requests already below stop_loss are not forwarded
    again, and when all are, the clean forward is the only one. The results are those of the path that runs
    the first step (a warm start at 0 takes it)."""
    model = build("llama").eval()
    zero = torch.zeros(len(REQUESTS), model.config.hidden_size)
    every = _cfg(model, v_early_stop_loss=1e3)  # every request is done at δ = 0
    calls = []
    handle = model.register_forward_pre_hook(lambda m, a, k: calls.append(1), with_kwargs=True)
    try:
        res, n = _run(model, every, at_module=at_module)
    finally:
        handle.remove()
    assert len(calls) == 1  # the clean forward, nothing else (no step, no probe)
    ran, n_ran = _run(model, every, at_module=at_module, init=zero)
    assert res.steps.tolist() == [0, 0, 0] and float(res.delta.abs().max()) == 0.0
    assert torch.allclose(res.final_loss, ran.final_loss, rtol=1e-5) and res.steps.tolist() == ran.steps.tolist()
    assert n < n_ran  # the clean forward only
    nll0 = res.final_loss.sort().values  # [3]
    some = _cfg(model, v_early_stop_loss=float(nll0[:2].mean()))  # the lowest request is done at δ = 0
    res, n = _run(model, some, at_module=at_module)
    ran, n_ran = _run(model, some, at_module=at_module, init=zero)
    assert int((res.steps == 0).sum()) == 1
    _same(res, ran)
    assert n < n_ran
