"""From the residual stream to the edited module's output: what a layer's edit must change in its own output.

The residual r_i of a layer (docs/algorithm.md, step 5) is a change of the z layer's output, i.e. of the
residual stream. In most blocks the MLP's output joins the stream as it is (h = x + attn + mlp(·)), so the
module's output must change by r itself. Some blocks normalise the MLP's output first (Gemma 2/3, OLMo 2:
h = x + N(o), N an RMSNorm with a gain g): changing o by r then changes the stream by about (g/ρ(o))·r,
which on such models' scales is hundreds of times too much (measured on random Gemma 2 and OLMo 2: layers
moved by 150–450 times their norm and the output away from the targets). :func:`to_module_space` solves
N(o + Δo) ≈ N(o) + r for Δo instead: the minimum-norm solution of the linearised norm, refined by a few
fixed-point steps through the norm module itself (any gain convention, ε, offset).
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["through_norm", "to_module_space"]


@torch.no_grad()
def through_norm(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``norm(x)`` in float64 on x's device, run in the norm's own dtype and device."""
    dev = next((p.device for p in norm.parameters()), x.device)
    dtype = next((p.dtype for p in norm.parameters()), torch.float32)
    return norm(x.to(dev, dtype)).to(x.device, torch.float64)


@torch.no_grad()
def to_module_space(norm: nn.Module | None, o: torch.Tensor, r: torch.Tensor, iterations: int = 3) -> torch.Tensor:
    """Δo  # [N, d] with norm(o + Δo) ≈ norm(o) + r, for module outputs o  # [N, d] and stream changes r  # [N, d].

    ``norm`` None (the output joins the stream as it is): r itself. Else RMSNorm-like N(o) = g ⊙ o / ρ(o),
    linearised at o: J = diag(g)/ρ · (I − ô ôᵀ) (radial changes of o do not change N(o)); the minimum-norm
    solution ρ (I − ô ôᵀ)(r ⊘ g), then ``iterations`` corrections with the module's own outputs.
    """
    if norm is None:
        return r
    dev = next((p.device for p in norm.parameters()), o.device)
    o64, r64 = o.to(dev, torch.float64), r.to(dev, torch.float64)  # [N, d]

    def apply(x: torch.Tensor) -> torch.Tensor:
        return through_norm(norm, x)

    d = o64.shape[1]
    gain = apply(torch.ones(1, d, dtype=torch.float64, device=dev))[0]  # g (ρ(1) = 1 up to ε)
    gain = torch.where(gain.abs() < 1e-12, torch.full_like(gain, 1e-12), gain)
    rho = o64.pow(2).mean(1, keepdim=True).sqrt().clamp_min(1e-12)  # [N, 1]
    unit = o64 / o64.norm(dim=1, keepdim=True).clamp_min(1e-30)  # [N, d]

    def step(residual: torch.Tensor) -> torch.Tensor:
        x = residual / gain
        return rho * (x - unit * (unit * x).sum(1, keepdim=True))

    base = apply(o64)
    dO = step(r64)
    for _ in range(iterations):
        dO = dO + step(r64 - (apply(o64 + dO) - base))
    return dO.to(r.device, r.dtype)
