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
are exact in fp32.

Tensor cores add those products into fp32 accumulators with truncation (round toward zero, after
every k16 step), which biases a long same-sign sum (the diagonal of KᵀK) by ≈ −2.15e-8 per step:
−2.2e-5 relative for one accumulator over a 16k-row batch. Every backend therefore bounds the
rows that go through one tensor-core accumulator before a round-to-nearest fp32 hand-off:
this default ``TORCH_ROWS_PER_MM`` (one cuBLAS call per row chunk, added into kk by the GEMM's
epilogue), the Triton kernel 256 rows, the CUDA kernel 64 rows. The error model and the bounds
at 8B/70B shapes are in tests/tc_rounding.py and tests/test_tc_numerics.py.
"""

from __future__ import annotations

import functools
import math

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


# Rows per cuBLAS call on the 16-bit tensor-core path: at most 128 truncating k16 steps on one
# accumulator (modelled error 2.5e-6 at 8B/70B shapes with 16k-token batches, against 2.2e-5 for one
# call over the batch). Each further call costs one read and write of the fp32 output in the GEMM's
# epilogue: ≈ 4·FLOP-rate / (bandwidth · rows) of the product, ~25% on an H100; cov_table.py
# measures it beside one unchunked torch.mm(out_dtype=fp32).
TORCH_ROWS_PER_MM = 2048


@functools.cache
def _mm_out_dtype_mode(device_type: str, dtype: torch.dtype) -> str:
    """How to get fp32 output from 16-bit inputs here: "addmm" (torch.addmm out_dtype into the
    accumulator, in place), "mm" (torch.mm out_dtype, then add), or "" (upcast; CPU / fp32)."""
    if device_type != "cuda" or dtype == torch.float32:
        return ""
    a = torch.ones(2, 2, device=device_type, dtype=dtype)
    try:
        c = torch.full((2, 2), 1.0, device=device_type)
        torch.ops.aten.addmm.dtype_out(c, a, a, torch.float32, out=c)
        if bool((c == 3.0).all()):  # really accumulated in place: c + a @ a
            return "addmm"
    except Exception:  # op missing in this torch build, or refusing the aliasing
        pass
    try:
        torch.mm(a, a, out_dtype=torch.float32)
        return "mm"
    except Exception:
        return ""


def _add_gram_(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """out += aᵀ b (a [rows, m], b [rows, n], out [m, n] fp32) with fp32 accumulation.

    On CUDA with 16-bit inputs, cuBLAS runs on tensor cores straight from the 16-bit inputs (no
    fp32 copy) in calls of at most TORCH_ROWS_PER_MM rows, each added into ``out`` by the GEMM
    epilogue (round to nearest), so no accumulator truncates more than 128 times. Elsewhere the
    inputs are upcast and multiplied in fp32 (round-to-nearest FMA; nothing to bound).
    """
    mode = _mm_out_dtype_mode(a.device.type, a.dtype) if a.dtype == b.dtype else ""
    if not mode:
        out.add_(a.t().float() @ b.float())
        return
    for r0 in range(0, a.shape[0], TORCH_ROWS_PER_MM):
        _addmm_fp32_(out, a[r0 : r0 + TORCH_ROWS_PER_MM].t(), b[r0 : r0 + TORCH_ROWS_PER_MM], mode)


def _mm_fp32(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """x @ y for 16-bit x, y with fp32 accumulation and output (one cuBLAS call)."""
    return torch.mm(x, y, out_dtype=torch.float32)


def _addmm_fp32_(out: torch.Tensor, x: torch.Tensor, y: torch.Tensor, mode: str) -> None:
    """out += x @ y for 16-bit x, y with fp32 accumulation and output (one cuBLAS call)."""
    if mode == "addmm":
        torch.ops.aten.addmm.dtype_out(out, x, y, torch.float32, out=out)
    else:
        out.add_(_mm_fp32(x, y))


def cov_accumulate_torch(kk, ks, n, keys, mask=None, *, values=None, vk=None, vs=None) -> None:
    """Accumulate Kᵀ K, Σk, n (and Vᵀ K, Σv) over the kept rows (plain PyTorch, any device)."""
    check_cov_args(kk, ks, n, keys, mask, values, vk, vs)
    d_ff = keys.shape[-1]
    rows = math.prod(keys.shape[:-1])  # explicit: reshape(-1, 0) is ambiguous when d_ff == 0
    k = keys.reshape(rows, d_ff)  # [rows, d_ff]
    v = values.reshape(rows, values.shape[-1]) if values is not None else None  # [rows, d]
    if mask is not None:
        keep = mask.reshape(-1).to(torch.bool)
        k = k[keep]
        v = v[keep] if v is not None else None
    _add_gram_(kk, k, k)
    ks.add_(k.sum(0, dtype=ks.dtype))
    n.add_(k.shape[0])
    if v is not None:
        _add_gram_(vk, v, k)
        vs.add_(v.sum(0, dtype=vs.dtype))


def symmetrize_upper_(kk: torch.Tensor) -> torch.Tensor:
    """Copy the upper triangle of a square matrix onto its lower triangle, in place."""
    lower = torch.tril(torch.ones_like(kk, dtype=torch.bool), diagonal=-1)
    kk.copy_(torch.where(lower, kk.t(), kk))
    return kk
