"""``multiplicative_update_``: W ← D W in place, plain-PyTorch default.

Contract (every backend): W [d, d_in] in bf16/fp16/fp32 (may be a non-contiguous view, e.g. the
transpose of a GPT-2 Conv1D weight), D [d, d] float32 or float64. The product is accumulated in
D's precision (at least fp32) and rounded to W's dtype once. W is streamed in column chunks, so the
extra memory is O(d · chunk), never a full-size fp32/fp64 copy of W.

Optional stochastic rounding (bf16/fp16 W): round each result up or down with probability given by
its distance to the two neighbours, so that an edit smaller than half an ulp survives on average
instead of being rounded away.
"""

from __future__ import annotations

import torch

from ..errors import ZuFastError

DEFAULT_CHUNK_BYTES = 64 * 2**20  # temporaries per chunk: D-precision copy of the column block


def check_update_args(W: torch.Tensor, D: torch.Tensor) -> None:
    if W.dim() != 2 or D.dim() != 2 or D.shape[0] != D.shape[1] or D.shape[1] != W.shape[0]:
        raise ZuFastError(f"multiplicative_update_: need W [d, d_in] and D [d, d], got {tuple(W.shape)}, "
                          f"{tuple(D.shape)}")
    if W.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ZuFastError(f"multiplicative_update_: W must be fp32/fp16/bf16, got {W.dtype}")
    if D.dtype not in (torch.float32, torch.float64):
        raise ZuFastError(f"multiplicative_update_: D must be float32 or float64, got {D.dtype}")


def stochastic_round(x: torch.Tensor, dtype: torch.dtype, generator: torch.Generator | None = None):
    """Round fp32 ``x`` to bf16 (or fp16) stochastically; unbiased: E[round(x)] = x."""
    x = x.float()
    if dtype == torch.bfloat16:
        bits = x.contiguous().view(torch.int32)
        noise = torch.randint(0, 1 << 16, bits.shape, device=x.device, dtype=torch.int32, generator=generator)
        # adding uniform noise below the kept 16 bits then truncating = round up with prob. frac
        rounded = ((bits + noise) & ~0xFFFF).view(torch.float32)
        # values whose exponent would overflow, NaN/Inf: keep round-to-nearest
        ok = torch.isfinite(rounded) & torch.isfinite(x)
        return torch.where(ok, rounded, x).to(torch.bfloat16)
    if dtype == torch.float16:
        lo = x.to(torch.float16)
        lo_f = lo.float()
        # neighbour on the other side of x
        inf = torch.tensor(float("inf"), dtype=torch.float16, device=x.device)
        other = torch.where(lo_f > x, torch.nextafter(lo, -inf), torch.nextafter(lo, inf))
        gap = (other.float() - lo_f).abs()
        p_other = torch.where(gap > 0, (x - lo_f).abs() / gap, torch.zeros_like(x))
        u = torch.rand(x.shape, device=x.device, generator=generator)
        return torch.where(u < p_other, other, lo)
    return x.to(dtype)


def multiplicative_update_torch(
    W: torch.Tensor,
    D: torch.Tensor,
    *,
    chunk_cols: int | None = None,
    stochastic_rounding: bool = False,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """W ← D W in place, column chunk by column chunk, one rounding (plain PyTorch, any device)."""
    check_update_args(W, D)
    d, d_in = W.shape
    acc = torch.float64 if D.dtype == torch.float64 else torch.float32
    D = D.to(device=W.device, dtype=acc)
    if chunk_cols is None:
        chunk_cols = max(1, DEFAULT_CHUNK_BYTES // (d * torch.finfo(acc).bits // 8))
    with torch.no_grad():
        for j in range(0, d_in, chunk_cols):
            block = W[:, j : j + chunk_cols]  # [d, c] view into W
            out = D @ block.to(acc)  # [d, c] in D's precision: the one place the product lives
            if stochastic_rounding and W.dtype != torch.float32:
                block.copy_(stochastic_round(out, W.dtype, generator))
            else:
                block.copy_(out)
    return W
