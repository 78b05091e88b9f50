"""The stream-to-module mapping for blocks that normalise the MLP's output (Gemma 2/3, OLMo 2), and the
orthogonal targets (``targets.orthogonal``) built on it."""

from __future__ import annotations

import pytest
import torch
from tiny_models import REQUESTS, llama
from torch import nn

from zu_fast import UnlearnConfig
from zu_fast.method.residual import to_module_space
from zu_fast.method.targets import optimize_deltas
from zu_fast.method.unlearn import orthogonal_start
from zu_fast.model import continuation_ids
from zu_fast.requests import normalize_requests


class _RMSNorm(nn.Module):
    """RMSNorm with either gain convention: g ⊙ x/ρ (Llama, OLMo 2) or (1 + g) ⊙ x/ρ (Gemma)."""

    def __init__(self, d: int, offset: float, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d, dtype=torch.float64) * 0.5 + (0.0 if offset else 1.0))
        self.offset, self.eps = offset, eps

    def forward(self, x):
        return (self.offset + self.weight) * x / x.pow(2).mean(-1, keepdim=True).add(self.eps).sqrt()


@pytest.mark.parametrize("offset", [0.0, 1.0])
@pytest.mark.parametrize("n, d, scale", [(1, 7, 1.0), (5, 33, 40.0), (3, 96, 0.05)])
def test_module_change_realises_the_stream_change(offset, n, d, scale):
    torch.manual_seed(d)
    norm = _RMSNorm(d, offset)
    o = torch.randn(n, d, dtype=torch.float64) * scale  # [n, d] module outputs, at awkward scales
    # a stream change the norm can produce: gain ⊙ y with y ⊥ o (a radial change of o never changes N(o))
    y = torch.randn(n, d, dtype=torch.float64)
    unit = o / o.norm(dim=1, keepdim=True)
    y = y - unit * (unit * y).sum(1, keepdim=True)
    with torch.no_grad():
        r = (offset + norm.weight) * y  # [n, d]
        r = r * 1e-3 * norm(o).norm(dim=1, keepdim=True) / r.norm(dim=1, keepdim=True)
    dO = to_module_space(norm, o, r)  # [n, d]
    with torch.no_grad():
        got = norm(o + dO) - norm(o)
    # N's image is a sphere-like surface: N(o) + r is reachable to first order only, the rest is ~‖r‖²
    assert torch.allclose(got, r, rtol=0, atol=1e-2 * float(r.abs().max()))
    # the naive answer (Δo = r) is wrong by the norm's scale: the mapping matters
    with torch.no_grad():
        naive = norm(o + r) - norm(o)
    assert (naive - r).norm() > 10 * (got - r).norm()


def test_no_norm_is_the_identity():
    r = torch.randn(3, 8)
    assert to_module_space(None, torch.randn(3, 8), r) is r


def test_orthogonal_targets_keep_the_free_part_off_the_basis():
    """δ = offset + free part, the free part orthogonal to the clean outputs' basis; the offset is what
    removing those components does to the stream (no post-MLP norm: −(o Uᵀ)U)."""
    model, tok = llama()
    cfg = UnlearnConfig.for_model(model, layers=[0, 1], progress=False, v_num_grad_steps=8, v_lr=0.5,
                                  v_weight_decay=0.0, clamp_norm_factor=4.0)
    reqs = normalize_requests(REQUESTS)
    clean = torch.randn(len(reqs), model.config.hidden_size)  # [N, d]
    offset, U = orthogonal_start(clean, cfg)  # [N, d], [d, r]
    assert torch.allclose(offset, -(clean @ U) @ U.t(), atol=1e-5)
    eos = [continuation_ids(tok, None)] * len(reqs)
    templates = [["{}"], ["Because I. {}", "You. {}"]]
    free = optimize_deltas(model, tok, reqs, cfg, templates, 1, eos)
    res = optimize_deltas(model, tok, reqs, cfg, templates, 1, eos, offset=offset, free_basis=U)
    part = res.delta - offset  # [N, d]
    assert part.norm() > 0  # it moved
    assert (part @ U).abs().max() < 1e-4 * part.norm()
    assert not torch.allclose(res.delta, free.delta)
