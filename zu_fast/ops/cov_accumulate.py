"""``cov_accumulate``: the corpus statistics op, plain-PyTorch default.

Contract (every backend): in place,
    kk += Kᵀ K      kk  # [d_ff, d_ff] fp32; the UPPER triangle (with the diagonal) is what counts,
                     #   a backend may leave the strict lower triangle stale: call symmetrize_upper_
    ks += Σ_rows k  ks  # [d_ff] fp32 or fp64
    n  += rows      n   # 0-d int64 tensor (stays on the device: no host sync per batch)
and, when ``values`` is given,
    vk += Vᵀ K      vk  # [d, d_ff] fp32
    vs += Σ_rows v  vs  # [d]
over the rows that ``mask`` keeps. ``keys`` is [..., d_ff] (e.g. [batch, seq, d_ff] straight from a
hook), ``values`` [..., d] with the same leading shape, ``mask`` the same leading shape (bool or
0/1 integers; None keeps every row). Activations may be bf16, fp16 or fp32; products of bf16/fp16
are exact in fp32, so accumulating in fp32 on tensor cores loses nothing over fp32 inputs.
"""

from __future__ import annotations

import functools

import torch

from ..errors import ZuFastError


def check_cov_args(kk, ks, n, keys, mask, values, vk, vs) -> None:
    """Shape/dtype/device validation shared by every backend (cheap: no device sync)."""
    d_ff = keys.shape[-1]
    if kk.shape != (d_ff, d_ff):
        raise ZuFastError(f"cov_accumulate: kk is {tuple(kk.shape)}, keys have width {d_ff}")
    if ks.shape != (d_ff,):
        raise ZuFastError(f"cov_accumulate: ks is {tuple(ks.shape)}, expected ({d_ff},)")
    if kk.dtype != torch.float32:
        raise ZuFastError(f"cov_accumulate: kk must be float32, got {kk.dtype}")
    if ks.dtype not in (torch.float32, torch.float64):
        raise ZuFastError(f"cov_accumulate: ks must be float32 or float64, got {ks.dtype}")
    if n.dim() != 0 or n.dtype != torch.int64:
        raise ZuFastError("cov_accumulate: n must be a 0-d int64 tensor")
    if keys.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ZuFastError(f"cov_accumulate: keys must be fp32/fp16/bf16, got {keys.dtype}")
    for name, t in (("kk", kk), ("ks", ks), ("n", n)):
        if t.device != keys.device:
            raise ZuFastError(f"cov_accumulate: {name} on {t.device}, keys on {keys.device}")
    if mask is not None and tuple(mask.shape) != tuple(keys.shape[:-1]):
        raise ZuFastError(
            f"cov_accumulate: mask shape {tuple(mask.shape)} != keys leading shape {tuple(keys.shape[:-1])}"
        )
    if values is not None:
        if vk is None or vs is None:
            raise ZuFastError("cov_accumulate: values given without vk and vs accumulators")
        d = values.shape[-1]
        if tuple(values.shape[:-1]) != tuple(keys.shape[:-1]):
            raise ZuFastError("cov_accumulate: values and keys differ in their leading shape")
        if vk.shape != (d, d_ff) or vs.shape != (d,):
            raise ZuFastError(f"cov_accumulate: vk/vs shapes {tuple(vk.shape)}/{tuple(vs.shape)} wrong")
        if vk.dtype != torch.float32:
            raise ZuFastError(f"cov_accumulate: vk must be float32, got {vk.dtype}")


@functools.cache
def _mm_out_dtype_ok(device_type: str, dtype: torch.dtype) -> bool:
    """Whether torch.mm(a, b, out_dtype=float32) works for this device/dtype (torch >= 2.9 on CUDA)."""
    if device_type != "cuda" or dtype == torch.float32:
        return False
    try:
        a = torch.ones(2, 2, device=device_type, dtype=dtype)
        torch.mm(a, a, out_dtype=torch.float32)
        return True
    except Exception:
        return False


def _gram_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """aᵀ b with fp32 accumulation and output, without a fp32 copy of bf16/fp16 inputs on CUDA."""
    if _mm_out_dtype_ok(a.device.type, a.dtype) and a.dtype == b.dtype:
        return torch.mm(a.t(), b, out_dtype=torch.float32)
    return a.t().float() @ b.float()


def cov_accumulate_torch(kk, ks, n, keys, mask=None, *, values=None, vk=None, vs=None) -> None:
    """Accumulate Kᵀ K, Σk, n (and Vᵀ K, Σv) over the kept rows (plain PyTorch, any device)."""
    check_cov_args(kk, ks, n, keys, mask, values, vk, vs)
    d_ff = keys.shape[-1]
    k = keys.reshape(-1, d_ff)  # [rows, d_ff]
    v = values.reshape(-1, values.shape[-1]) if values is not None else None  # [rows, d]
    if mask is not None:
        keep = mask.reshape(-1).to(torch.bool)
        k = k[keep]
        v = v[keep] if v is not None else None
    kk.add_(_gram_fp32(k, k))
    ks.add_(k.sum(0, dtype=ks.dtype))
    n.add_(k.shape[0])
    if v is not None:
        vk.add_(_gram_fp32(v, k))
        vs.add_(v.sum(0, dtype=vs.dtype))


def symmetrize_upper_(kk: torch.Tensor) -> torch.Tensor:
    """Copy the upper triangle of a square matrix onto its lower triangle, in place."""
    lower = torch.tril(torch.ones_like(kk, dtype=torch.bool), diagonal=-1)
    kk.copy_(torch.where(lower, kk.t(), kk))
    return kk
