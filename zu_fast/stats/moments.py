"""LayerStats: the raw sums of one edited layer, and the moments docs/algorithm.md (step 4) derives from them."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..errors import ZuFastError
from ..ops import symmetrize_upper_


@dataclass
class LayerStats:
    """Corpus sums at one edited module: Σkkᵀ, Σk, n (and, in measured mode, Σvkᵀ, Σv)."""

    layer: int
    kk: torch.Tensor  # [d_in, d_in] fp32, Σ_t k_t k_tᵀ (symmetric once finalised)
    ks: torch.Tensor  # [d_in] fp64, Σ_t k_t
    n: int  # tokens counted (padding never)
    vk: torch.Tensor | None = None  # [d, d_in] fp32, Σ_t v_t k_tᵀ (measured mode)
    vs: torch.Tensor | None = None  # [d] fp64, Σ_t v_t
    info: dict = field(default_factory=dict)

    @property
    def d_in(self) -> int:
        return self.kk.shape[0]

    def check(self) -> None:
        """Raise ZuFastError when the statistic cannot be used (NaN/Inf, no tokens)."""
        if self.n < 2:
            raise ZuFastError(f"layer {self.layer}: statistics over {self.n} tokens; need at least 2")
        for name in ("kk", "ks", "vk", "vs"):
            t = getattr(self, name)
            if t is not None and not bool(torch.isfinite(t).all()):
                raise ZuFastError(
                    f"layer {self.layer}: statistic {name} contains NaN/Inf (overflowing activations? "
                    "collect in a wider dtype)"
                )

    def to(self, device) -> LayerStats:
        mv = lambda t: None if t is None else t.to(device)  # noqa: E731
        return LayerStats(self.layer, mv(self.kk), mv(self.ks), self.n, mv(self.vk), mv(self.vs), dict(self.info))

    # ---------------------------------------------------------------- moments ----------
    def second_moment(self, dtype=torch.float32) -> torch.Tensor:
        """C = (1/n) Σ k kᵀ   # [d_in, d_in]"""
        return self.kk.to(dtype) / self.n

    def mean_key(self, dtype=torch.float64) -> torch.Tensor:
        """μ_k   # [d_in]"""
        return self.ks.to(dtype) / self.n

    def cross_moment(self, W: torch.Tensor, bias: torch.Tensor | None, centered: bool) -> torch.Tensor:
        """X  # [d, d_in] dense, float64: the reference's value-key cross moment.

        uncentred: X = (1/(n−1)) Σ v kᵀ = (n/(n−1)) (W C + b μ_kᵀ)   (the default: what the reference's
                   code computes, its running-mean merge shrinking the means to ~0)
        centred:   X = (1/(n−1)) Σ (v − μ_v)(k − μ_k)ᵀ   (what its code was written to compute)
        Measured from Σvkᵀ when available, else derived exactly from v = W k + b.
        (For verification paths only: the fast closed form never forms X.)
        """
        n = self.n
        mu_k = self.mean_key().to(W.device)
        if self.vk is not None:
            vk = self.vk.to(W.device, torch.float64)
            mu_v = (self.vs.to(W.device, torch.float64) / n)
            if centered:
                return (vk - n * torch.outer(mu_v, mu_k)) / (n - 1)
            return vk / (n - 1)
        Wd = W.to(torch.float64)
        C = self.second_moment(torch.float64).to(W.device)
        if centered:
            return Wd @ ((C - torch.outer(mu_k, mu_k)) * (n / (n - 1)))
        X = Wd @ C
        if bias is not None:
            X = X + torch.outer(bias.to(torch.float64), mu_k)
        return X * (n / (n - 1))


def new_layer_stats(layer: int, d_in: int, device, d: int | None = None) -> tuple[LayerStats, torch.Tensor]:
    """Zeroed accumulators (and the 0-d int64 token counter the ops update on the device)."""
    kk = torch.zeros(d_in, d_in, dtype=torch.float32, device=device)
    ks = torch.zeros(d_in, dtype=torch.float64, device=device)
    vk = torch.zeros(d, d_in, dtype=torch.float32, device=device) if d is not None else None
    vs = torch.zeros(d, dtype=torch.float64, device=device) if d is not None else None
    n = torch.zeros((), dtype=torch.int64, device=device)
    return LayerStats(layer, kk, ks, 0, vk, vs), n


def finalize(stats: LayerStats, n: torch.Tensor) -> LayerStats:
    """Symmetrise Σkkᵀ from its upper triangle (backends may write only that) and fix n."""
    symmetrize_upper_(stats.kk)
    stats.n = int(n.item())
    return stats
