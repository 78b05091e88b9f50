"""Step 3: an orthonormal basis of the original representations and the projector P.

P = (1+ε) I_d − U Uᵀ is only ever applied, never formed (except by ``dense()`` for verification).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import ZuFastError


def representation_basis(R: torch.Tensor, rtol: float = 1e-6) -> torch.Tensor:
    """U  # [d, r]: right singular vectors of Rᵀ (R [d, N] has representations as columns).

    Directions with singular value ≤ rtol · σ_max are dropped (r ≤ N); an all-zero R is an error.
    """
    if R.dim() != 2:
        raise ZuFastError(f"representations must be [d, N], got {tuple(R.shape)}")
    if not bool(torch.isfinite(R).all()):
        raise ZuFastError("the original representations contain NaN/Inf")
    Rt = R.t().to(torch.float64)  # [N, d]
    _, S, Vh = torch.linalg.svd(Rt, full_matrices=False)  # Vh [min(N,d), d]
    if S.numel() == 0 or float(S[0]) == 0.0:
        raise ZuFastError("the original representations are all zero: no direction to forget")
    keep = S > rtol * S[0]
    return Vh[keep].t().contiguous()  # [d, r]


@dataclass
class Projector:
    """P = (1+eps) I − U Uᵀ with U [d, r] orthonormal."""

    U: torch.Tensor  # [d, r] float64
    eps: float = 0.01

    def apply(self, Y: torch.Tensor) -> torch.Tensor:
        """P Y  for Y [d, m]: (1+eps) Y − U (Uᵀ Y), O(d·r·m)."""
        U = self.U.to(Y.device, Y.dtype)
        return (1.0 + self.eps) * Y - U @ (U.t() @ Y)

    def dense(self) -> torch.Tensor:
        """P as a dense [d, d] matrix (verification only)."""
        d = self.U.shape[0]
        eye = torch.eye(d, dtype=self.U.dtype, device=self.U.device)
        return (1.0 + self.eps) * eye - self.U @ self.U.t()
