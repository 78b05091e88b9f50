"""Triton kernel for ``cov_accumulate``: kk += KᵀK (upper-triangle tiles), ks += Σk, [vk += VᵀK, vs += Σv].

Imported as ``zu_fast.kernels.cov_accumulate`` (lazily, by ``zu_fast.ops.triton_backend``), never as a
top-level ``kernels`` module. Same contract as ``zu_fast.ops.cov_accumulate.cov_accumulate_torch``.

Design (one launch per call):

* The activations are read where the hook left them: ``[batch, seq, width]`` with any batch/seq strides
  (unit stride in the last dim is typical but any column stride works), bf16/fp16/fp32. Row ``r`` of
  the flattened ``batch*seq`` rows lives at ``(r // seq) * stride_b + (r % seq) * stride_s``; the
  attention mask (``[batch, seq]``, bool or 0/1) is loaded per row chunk and folded into the load
  masks, so padding rows are never read and contribute exactly zero. No gathered copy of the kept
  rows is ever made.
* 1-D grid of independent programs, each owning one output tile (read-modify-write once at the end,
  so no atomics):
    - ``T*(T+1)/2`` programs for the upper-triangle BLOCK×BLOCK tiles ``(i ≤ j)`` of the
      ``d_ff×d_ff`` output (``T = cdiv(d_ff, BLOCK)``); the strict lower triangle outside the
      diagonal tiles is never touched (``zu_fast.ops.symmetrize_upper_`` fills it for the consumer);
    - when fused, ``Tv*T`` programs for the BLOCK×BLOCK tiles of the ``d×d_ff`` VᵀK output;
    - ``T`` (+ ``Tv``) light programs that each sum one BLOCK-wide column strip of K (of V) over
      the kept rows (elementwise accumulation, one reduction at the end) for Σk (Σv). They read the
      activations once more inside the same launch (≈ 1/T of the tile programs' traffic) and keep
      the Gram main loop free of branches.
  Each tile program loops over the rows in BLOCK_K chunks: it loads K[rows, i-block] and
  K[rows, j-block] (masked rows/columns → 0) and does ``acc += tl.dot(aᵀ, b)`` with fp32
  accumulation (tensor cores for bf16/fp16, whose products are exact in fp32; ``input_precision=
  "ieee"`` for fp32 inputs so nothing is rounded to tf32).
* ``n += kept rows`` is a tiny device-side ``n.add_(count_nonzero(mask))`` (no host sync).

On CUDA the tile configuration is chosen per problem key by a small benchmark on a sub-problem
(written into scratch accumulators, never into the caller's), cached for the process;
``ZU_FAST_COV_TRITON_CONFIG=BLOCK,BLOCK_K,num_warps,num_stages`` forces one, and
``ZU_FAST_COV_AUTOTUNE=0`` uses the default without benchmarking. Under ``TRITON_INTERPRET=1``
(CPU tensors) a small fixed configuration is used.
"""

from __future__ import annotations

import contextlib
import os

import torch
import triton
import triton.language as tl

from ..errors import ZuFastError
from ..ops.cov_accumulate import check_cov_args

# ---------------------------------------------------------------------------------------------------
# Triton device code
# ---------------------------------------------------------------------------------------------------


@triton.jit
def _keep_rows(rows, R, S, mask_ptr, m_sb, m_ss, HAS_MASK: tl.constexpr):
    """Which of the flattened rows exist and are kept by the mask; also their (batch, seq) indices."""
    row_ok = rows < R
    b = rows // S
    s = rows - b * S
    keep = row_ok
    if HAS_MASK:
        m = tl.load(mask_ptr + b.to(tl.int64) * m_sb + s.to(tl.int64) * m_ss, mask=row_ok, other=0)
        keep = row_ok & (m != 0)
    return keep, b.to(tl.int64), s.to(tl.int64)


@triton.jit
def upper_tile(t):
    """Index t of an upper-triangle tile -> (i, j), i <= j, enumerated column by column
    (t = j(j+1)/2 + i), so consecutive programs share the j-block. Works elementwise on tensors."""
    j = ((tl.sqrt((8 * t + 1).to(tl.float32)) - 1.0) * 0.5).to(tl.int32)
    j = tl.where(j * (j + 1) // 2 > t, j - 1, j)  # correct sqrt rounding either way
    j = tl.where((j + 1) * (j + 2) // 2 <= t, j + 1, j)
    return t - j * (j + 1) // 2, j


@triton.jit
def _gram_tile(
    a_ptr, a_sb, a_ss, a_sc, a_width, i0,
    b_ptr, b_sb, b_ss, b_sc, b_width, j0,
    out_ptr, o_s0, o_s1,
    mask_ptr, m_sb, m_ss, R, S,
    HAS_MASK: tl.constexpr, DOT_F32: tl.constexpr, BLOCK: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """out[i0:i0+BLOCK, j0:j0+BLOCK] += A[kept rows, i-block]ᵀ B[kept rows, j-block]."""
    offs_i = i0 + tl.arange(0, BLOCK)
    offs_j = j0 + tl.arange(0, BLOCK)
    i_ok = offs_i < a_width
    j_ok = offs_j < b_width
    acc = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
    for r0 in range(0, R, BLOCK_K):
        rows = r0 + tl.arange(0, BLOCK_K)
        keep, bi, si = _keep_rows(rows, R, S, mask_ptr, m_sb, m_ss, HAS_MASK)
        a = tl.load(
            a_ptr + (bi * a_sb + si * a_ss)[:, None] + offs_i[None, :] * a_sc,
            mask=keep[:, None] & i_ok[None, :],
            other=0.0,
        )  # [BLOCK_K, BLOCK]
        b = tl.load(
            b_ptr + (bi * b_sb + si * b_ss)[:, None] + offs_j[None, :] * b_sc,
            mask=keep[:, None] & j_ok[None, :],
            other=0.0,
        )  # [BLOCK_K, BLOCK]
        if DOT_F32:
            acc = tl.dot(tl.trans(a.to(tl.float32)), b.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(tl.trans(a), b, acc)
    out = out_ptr + offs_i.to(tl.int64)[:, None] * o_s0 + offs_j.to(tl.int64)[None, :] * o_s1
    o_mask = i_ok[:, None] & j_ok[None, :]
    tl.store(out, tl.load(out, mask=o_mask, other=0.0) + acc, mask=o_mask)


@triton.jit
def _col_sums(
    x_ptr, x_sb, x_ss, x_sc, width, c0,
    out_ptr, o_s0,
    mask_ptr, m_sb, m_ss, R, S,
    HAS_MASK: tl.constexpr, SUM_F64: tl.constexpr, BLOCK: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """out[c0:c0+BLOCK] += Σ_{kept rows} X[row, c0:c0+BLOCK]."""
    offs_c = c0 + tl.arange(0, BLOCK)
    c_ok = offs_c < width
    if SUM_F64:
        acc = tl.zeros((BLOCK_K, BLOCK), dtype=tl.float64)
    else:
        acc = tl.zeros((BLOCK_K, BLOCK), dtype=tl.float32)
    for r0 in range(0, R, BLOCK_K):
        rows = r0 + tl.arange(0, BLOCK_K)
        keep, bi, si = _keep_rows(rows, R, S, mask_ptr, m_sb, m_ss, HAS_MASK)
        x = tl.load(
            x_ptr + (bi * x_sb + si * x_ss)[:, None] + offs_c[None, :] * x_sc,
            mask=keep[:, None] & c_ok[None, :],
            other=0.0,
        )
        acc += x.to(tl.float32).to(acc.dtype)  # bf16/fp16 -> fp32 is exact; fp64 via fp32 too
    total = tl.sum(acc, axis=0)
    out = out_ptr + offs_c.to(tl.int64) * o_s0
    old = tl.load(out, mask=c_ok, other=0.0)
    tl.store(out, old + total.to(old.dtype), mask=c_ok)


@triton.jit
def _cov_kernel(
    k_ptr, k_sb, k_ss, k_sc,
    v_ptr, v_sb, v_ss, v_sc,
    mask_ptr, m_sb, m_ss,
    kk_ptr, kk_s0, kk_s1,
    ks_ptr, ks_s0,
    vk_ptr, vk_s0, vk_s1,
    vs_ptr, vs_s0,
    R, S, d_ff, d_v,
    HAS_MASK: tl.constexpr, FUSED: tl.constexpr,
    KK_F32: tl.constexpr, VK_F32: tl.constexpr, KS_F64: tl.constexpr, VS_F64: tl.constexpr,
    BLOCK: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    T = tl.cdiv(d_ff, BLOCK)
    n_kk = T * (T + 1) // 2
    if FUSED:
        Tv = tl.cdiv(d_v, BLOCK)
    else:
        Tv = 0
    n_vk = Tv * T
    if pid < n_kk:
        i, j = upper_tile(pid)
        _gram_tile(
            k_ptr, k_sb, k_ss, k_sc, d_ff, i * BLOCK,
            k_ptr, k_sb, k_ss, k_sc, d_ff, j * BLOCK,
            kk_ptr, kk_s0, kk_s1,
            mask_ptr, m_sb, m_ss, R, S,
            HAS_MASK, KK_F32, BLOCK, BLOCK_K,
        )
    elif pid < n_kk + n_vk:
        q = pid - n_kk
        a = q // T
        j = q - a * T
        _gram_tile(
            v_ptr, v_sb, v_ss, v_sc, d_v, a * BLOCK,
            k_ptr, k_sb, k_ss, k_sc, d_ff, j * BLOCK,
            vk_ptr, vk_s0, vk_s1,
            mask_ptr, m_sb, m_ss, R, S,
            HAS_MASK, VK_F32, BLOCK, BLOCK_K,
        )
    elif pid < n_kk + n_vk + T:
        c = pid - n_kk - n_vk
        _col_sums(
            k_ptr, k_sb, k_ss, k_sc, d_ff, c * BLOCK,
            ks_ptr, ks_s0,
            mask_ptr, m_sb, m_ss, R, S,
            HAS_MASK, KS_F64, BLOCK, BLOCK_K,
        )
    else:
        if FUSED:
            c = pid - n_kk - n_vk - T
            _col_sums(
                v_ptr, v_sb, v_ss, v_sc, d_v, c * BLOCK,
                vs_ptr, vs_s0,
                mask_ptr, m_sb, m_ss, R, S,
                HAS_MASK, VS_F64, BLOCK, BLOCK_K,
            )


# ---------------------------------------------------------------------------------------------------
# Host side
# ---------------------------------------------------------------------------------------------------

# (BLOCK, BLOCK_K, num_warps, num_stages)
INTERPRETER_CONFIG = (64, 64, 4, 1)
# Candidates benchmarked on CUDA (Hopper-typical first). BLOCK is the square output tile.
GPU_CONFIGS_16BIT = [
    (128, 64, 8, 3),
    (128, 64, 8, 4),
    (128, 32, 8, 4),
    (128, 64, 4, 3),
    (64, 64, 4, 4),
]
GPU_CONFIGS_F32 = [
    (64, 32, 4, 3),
    (128, 32, 8, 3),
    (64, 16, 4, 4),
    (128, 16, 8, 3),
]
# Tuning runs on a sub-problem at most this wide (tiles are independent, so their speed does not
# depend on d_ff once the GPU is full), into scratch accumulators of that size.
_TUNE_MAX_WIDTH = 6144
_TUNED: dict[tuple, tuple[int, int, int, int]] = {}


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


def _as_rows(x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """View ``x`` ([..., w]) as [B, S, w] without copying when possible; returns (x3, B, S)."""
    if x.dim() == 1:
        x = x.unsqueeze(0)
    if x.dim() == 2:
        return x.unsqueeze(0), 1, x.shape[0]
    if x.dim() > 3:
        try:
            x = x.view(-1, x.shape[-2], x.shape[-1])
        except RuntimeError:
            x = x.reshape(-1, x.shape[-2], x.shape[-1])  # only for exotic >3-D non-viewable layouts
    return x, x.shape[0], x.shape[1]


def _mask_rows(mask: torch.Tensor, B: int, S: int) -> torch.Tensor:
    """The mask as a [B, S] tensor (view when possible); bool reinterpreted as uint8 (no copy)."""
    if mask.dtype == torch.bool:
        mask = mask.view(torch.uint8)
    if mask.dim() <= 1:
        return mask.reshape(1, -1)
    if mask.dim() == 2:
        return mask
    try:
        return mask.view(B, S)
    except RuntimeError:
        return mask.reshape(B, S)


def _parse_config(text: str) -> tuple[int, int, int, int]:
    try:
        block, block_k, warps, stages = (int(t) for t in text.split(","))
    except ValueError:
        raise ZuFastError(
            f"ZU_FAST_COV_TRITON_CONFIG={text!r}: expected BLOCK,BLOCK_K,num_warps,num_stages"
        ) from None
    if block < 16 or block_k < 16 or block & (block - 1) or block_k & (block_k - 1):
        raise ZuFastError(f"ZU_FAST_COV_TRITON_CONFIG={text!r}: BLOCK and BLOCK_K must be powers of 2 >= 16")
    return block, block_k, warps, stages


def _launch(args, config, *, d_ff, d_v, fused, kk_f32, vk_f32, ks_f64, vs_f64, has_mask):
    block, block_k, num_warps, num_stages = config
    T = triton.cdiv(d_ff, block)
    Tv = triton.cdiv(d_v, block) if fused else 0
    grid = (T * (T + 1) // 2 + Tv * T + T + Tv,)
    _cov_kernel[grid](
        *args,
        HAS_MASK=has_mask, FUSED=fused,
        KK_F32=kk_f32, VK_F32=vk_f32, KS_F64=ks_f64, VS_F64=vs_f64,
        BLOCK=block, BLOCK_K=block_k,
        num_warps=num_warps, num_stages=num_stages,
    )


def _kernel_args(k3, v3, m2, kk, ks, vk, vs, R, S, d_ff, d_v):
    return (
        k3, k3.stride(0), k3.stride(1), k3.stride(2),
        v3, v3.stride(0), v3.stride(1), v3.stride(2),
        m2, m2.stride(0), m2.stride(1),
        kk, kk.stride(0), kk.stride(1),
        ks, ks.stride(0),
        vk, vk.stride(0), vk.stride(1),
        vs, vs.stride(0),
        R, S, d_ff, d_v,
    )


def _tune(key, k3, v3, m2, R, S, d_ff, d_v, flags) -> tuple[int, int, int, int]:
    """Benchmark the candidate configs on a ≤_TUNE_MAX_WIDTH-wide slice into scratch accumulators."""
    from triton.testing import do_bench

    cands = GPU_CONFIGS_F32 if flags["kk_f32"] else GPU_CONFIGS_16BIT
    wt = min(d_ff, _TUNE_MAX_WIDTH)
    wv = min(d_v, _TUNE_MAX_WIDTH // 2) if flags["fused"] else d_v
    kt = k3[..., :wt]
    vt = v3[..., :wv] if flags["fused"] else v3
    dev = k3.device
    kk = torch.zeros(wt, wt, device=dev, dtype=torch.float32)
    ks = torch.zeros(wt, device=dev, dtype=torch.float64 if flags["ks_f64"] else torch.float32)
    if flags["fused"]:
        vk = torch.zeros(wv, wt, device=dev, dtype=torch.float32)
        vs = torch.zeros(wv, device=dev, dtype=torch.float64 if flags["vs_f64"] else torch.float32)
    else:
        vk, vs = kk, ks
    args = _kernel_args(kt, vt, m2, kk, ks, vk, vs, R, S, wt, wv)
    best, best_t = None, float("inf")
    for cfg in cands:
        try:
            t = do_bench(lambda cfg=cfg: _launch(args, cfg, d_ff=wt, d_v=wv, **flags), warmup=5, rep=25)
        except Exception:  # e.g. out of shared memory for this config on this GPU
            continue
        if t < best_t:
            best, best_t = cfg, t
    if best is None:
        raise ZuFastError(f"cov_accumulate (triton): no candidate config runs for {key}")
    return best


def _choose_config(key, k3, v3, m2, R, S, d_ff, d_v, flags) -> tuple[int, int, int, int]:
    forced = os.environ.get("ZU_FAST_COV_TRITON_CONFIG", "").strip()
    if forced:
        return _parse_config(forced)
    if k3.device.type != "cuda":
        return INTERPRETER_CONFIG
    if key not in _TUNED:
        if os.environ.get("ZU_FAST_COV_AUTOTUNE", "1").strip() == "0":
            _TUNED[key] = (GPU_CONFIGS_F32 if flags["kk_f32"] else GPU_CONFIGS_16BIT)[0]
        else:
            _TUNED[key] = _tune(key, k3, v3, m2, R, S, d_ff, d_v, flags)
    return _TUNED[key]


def cov_accumulate_triton(kk, ks, n, keys, mask=None, *, values=None, vk=None, vs=None) -> None:
    """Triton backend of ``cov_accumulate`` (upper-triangle tiles of kk; same contract as the default)."""
    check_cov_args(kk, ks, n, keys, mask, values, vk, vs)
    dev = keys.device
    if dev.type != "cuda" and not interpreting():
        raise ZuFastError(
            f"cov_accumulate (triton): tensors on {dev.type}; the Triton kernel needs CUDA "
            "(or TRITON_INTERPRET=1 set before the kernel module is imported, for CPU tests)"
        )
    fused = values is not None
    tensors = [("mask", mask)] + ([("values", values), ("vk", vk), ("vs", vs)] if fused else [])
    for name, t in tensors:
        if t is not None and t.device != dev:
            raise ZuFastError(f"cov_accumulate: {name} on {t.device}, keys on {dev}")
    if fused:
        if values.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ZuFastError(f"cov_accumulate: values must be fp32/fp16/bf16, got {values.dtype}")
        if vs.dtype not in (torch.float32, torch.float64):
            raise ZuFastError(f"cov_accumulate: vs must be float32 or float64, got {vs.dtype}")

    d_ff = keys.shape[-1]
    k3, B, S = _as_rows(keys)
    R = B * S
    if fused:
        v3, _, _ = _as_rows(values)
        d_v = values.shape[-1]
    else:
        v3, d_v, vk, vs = k3, 0, kk, ks  # placeholders, never touched (FUSED=False)
    m2 = _mask_rows(mask, B, S) if mask is not None else k3  # placeholder when no mask
    if R > 0 and d_ff > 0:
        # The interpreter's tl.dot multiplies bf16 as its raw uint16 bits (Triton 3.8), so bf16 tiles
        # are upcast to fp32 there: the same arithmetic (bf16 products are exact in fp32).
        interp = dev.type != "cuda"
        flags = dict(
            fused=fused,
            kk_f32=keys.dtype == torch.float32 or (interp and keys.dtype == torch.bfloat16),
            vk_f32=fused and (
                values.dtype == torch.float32
                or values.dtype != keys.dtype
                or (interp and values.dtype == torch.bfloat16)
            ),
            ks_f64=ks.dtype == torch.float64,
            vs_f64=fused and vs.dtype == torch.float64,
            has_mask=mask is not None,
        )
        key = (dev.index, d_ff, d_v, keys.dtype, values.dtype if fused else None, tuple(sorted(flags.items())))
        config = _choose_config(key, k3, v3, m2, R, S, d_ff, d_v, flags)
        with torch.cuda.device(dev) if dev.type == "cuda" else contextlib.nullcontext():
            _launch(_kernel_args(k3, v3, m2, kk, ks, vk, vs, R, S, d_ff, d_v), config,
                    d_ff=d_ff, d_v=d_v, **flags)
    n.add_(torch.count_nonzero(mask) if mask is not None else R)

