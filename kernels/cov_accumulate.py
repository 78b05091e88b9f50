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
  K[rows, j-block] (masked rows/columns → 0) and does ``part = tl.dot(aᵀ, b, part)`` with fp32
  accumulation (tensor cores for bf16/fp16, whose products are exact in fp32; ``input_precision=
  "ieee"`` for fp32 inputs so nothing is rounded to tf32). Tensor cores truncate the accumulator
  (round toward zero) at every k16 step, so ``part`` is handed off to a round-to-nearest fp32
  ``acc`` every ROWS_PER_ACC = 256 rows: at most 16 truncating steps per accumulator whatever the
  batch (modelled error at 8B/70B shapes, 16k-token batches: 3.3e-7 relative; one accumulator per
  call: 2.2e-5; tests/test_tc_numerics.py).
* The kk and vk tiles share one GEMM call site (their A operand and output are selected per
  program): Triton allocates the pipeline buffers per inlined call site, so two call sites would
  double the shared memory (256 KiB at (128, 64, 8, 4), over an H100's 227 KiB).
* Offsets are int64 wherever a column index meets a stride (column-major keys past ~75k rows at
  d_ff 28672 overflow int32), and the strides the shared call site selects are cast to int64
  before the branch (Triton passes a stride ≥ 2^31 as i64, a smaller one as i32: keys and values
  whose batch strides straddle 2^31 would otherwise not compile).
* ``n += kept rows`` is a tiny device-side ``n.add_(count_nonzero(mask))`` (no host sync).

On CUDA the tile configuration is chosen per problem key by a small benchmark on a sub-problem
(written into scratch accumulators, never into the caller's), cached for the process; configs
whose compiled kernel needs more shared memory than the device allows are dropped first and
reported (``TUNING_REPORT``, logged);
``ZU_FAST_COV_TRITON_CONFIG=BLOCK,BLOCK_K,num_warps,num_stages`` forces one, and
``ZU_FAST_COV_AUTOTUNE=0`` uses the default without benchmarking. Under ``TRITON_INTERPRET=1``
(CPU tensors) a small fixed configuration is used.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable

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
    HANDOFF: tl.constexpr,
):
    """out[i0:i0+BLOCK, j0:j0+BLOCK] += A[kept rows, i-block]ᵀ B[kept rows, j-block].

    Tensor cores accumulate with truncation: ``part`` takes at most HANDOFF row chunks
    (HANDOFF·BLOCK_K ≤ ROWS_PER_ACC rows) before it is added to ``acc`` with a plain
    round-to-nearest fp32 add and restarted, so no accumulator sees more than ROWS_PER_ACC/16
    truncating steps (tests/test_tc_numerics.py has the error model). ``part`` is loop-carried
    and reset conditionally, so Triton's dot(a, b, 0) + c → dot(a, b, c) rewrite cannot fold the
    hand-off back into one long chain.
    """
    # int64 column offsets: col × column-stride overflows int32 for column-major keys past
    # ~75k rows at d_ff 28672
    offs_i = i0 + tl.arange(0, BLOCK)
    offs_j = j0 + tl.arange(0, BLOCK)
    i_ok = offs_i < a_width
    j_ok = offs_j < b_width
    col_a = offs_i.to(tl.int64) * a_sc
    col_b = offs_j.to(tl.int64) * b_sc
    acc = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
    part = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
    n_it = tl.cdiv(R, BLOCK_K)
    for it in range(0, n_it):
        rows = it * BLOCK_K + tl.arange(0, BLOCK_K)
        keep, bi, si = _keep_rows(rows, R, S, mask_ptr, m_sb, m_ss, HAS_MASK)
        a = tl.load(
            a_ptr + (bi * a_sb + si * a_ss)[:, None] + col_a[None, :],
            mask=keep[:, None] & i_ok[None, :],
            other=0.0,
        )  # [BLOCK_K, BLOCK]
        b = tl.load(
            b_ptr + (bi * b_sb + si * b_ss)[:, None] + col_b[None, :],
            mask=keep[:, None] & j_ok[None, :],
            other=0.0,
        )  # [BLOCK_K, BLOCK]
        if DOT_F32:
            part = tl.dot(tl.trans(a.to(tl.float32)), b.to(tl.float32), part, input_precision="ieee")
        else:
            part = tl.dot(tl.trans(a), b, part)
        if it % HANDOFF == HANDOFF - 1:  # hand the partial sum off to the fp32 sum
            acc += part
            part = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
    acc += part
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
    col = offs_c.to(tl.int64) * x_sc  # int64: see _gram_tile
    if SUM_F64:
        acc = tl.zeros((BLOCK_K, BLOCK), dtype=tl.float64)
    else:
        acc = tl.zeros((BLOCK_K, BLOCK), dtype=tl.float32)
    for r0 in range(0, R, BLOCK_K):
        rows = r0 + tl.arange(0, BLOCK_K)
        keep, bi, si = _keep_rows(rows, R, S, mask_ptr, m_sb, m_ss, HAS_MASK)
        x = tl.load(
            x_ptr + (bi * x_sb + si * x_ss)[:, None] + col[None, :],
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
    BLOCK: tl.constexpr, BLOCK_K: tl.constexpr, HANDOFF: tl.constexpr, ONE_GEMM: tl.constexpr,
):
    pid = tl.program_id(0)
    T = tl.cdiv(d_ff, BLOCK)
    n_kk = T * (T + 1) // 2
    if FUSED:
        Tv = tl.cdiv(d_v, BLOCK)
    else:
        Tv = 0
    n_vk = Tv * T
    if pid < n_kk + n_vk:
        if ONE_GEMM:
            # One call site for the kk and vk tiles (they differ only in the A operand and the
            # output): Triton allocates shared memory per inlined call site, so two call sites
            # would keep two copies of the pipeline buffers (256 KiB at (128, 64, 8, 4)).
            # Every value chosen by the branch has one type on both sides: Triton types an integer
            # argument i64 once it reaches 2^31 (a batch stride of keys past 75k rows at 70B
            # shapes) and i32 below, and a then/else pair of different types does not compile.
            k_sb64, k_ss64, k_sc64 = tl.cast(k_sb, tl.int64), tl.cast(k_ss, tl.int64), tl.cast(k_sc, tl.int64)
            v_sb64, v_ss64, v_sc64 = tl.cast(v_sb, tl.int64), tl.cast(v_ss, tl.int64), tl.cast(v_sc, tl.int64)
            if pid < n_kk:
                i, j = upper_tile(pid)
                a_ptr, a_sb, a_ss, a_sc, a_w = k_ptr, k_sb64, k_ss64, k_sc64, tl.cast(d_ff, tl.int32)
                o_ptr, o_s0, o_s1 = kk_ptr, tl.cast(kk_s0, tl.int64), tl.cast(kk_s1, tl.int64)
            else:
                q = pid - n_kk
                i = q // T
                j = q - i * T
                a_ptr, a_sb, a_ss, a_sc, a_w = v_ptr, v_sb64, v_ss64, v_sc64, tl.cast(d_v, tl.int32)
                o_ptr, o_s0, o_s1 = vk_ptr, tl.cast(vk_s0, tl.int64), tl.cast(vk_s1, tl.int64)
            _gram_tile(
                a_ptr, a_sb, a_ss, a_sc, a_w, i * BLOCK,
                k_ptr, k_sb, k_ss, k_sc, d_ff, j * BLOCK,
                o_ptr, o_s0, o_s1,
                mask_ptr, m_sb, m_ss, R, S,
                HAS_MASK, KK_F32, BLOCK, BLOCK_K, HANDOFF,
            )
        else:  # values of another dtype than keys: two call sites (the vk one on the fp32 dot)
            if pid < n_kk:
                i, j = upper_tile(pid)
                _gram_tile(
                    k_ptr, k_sb, k_ss, k_sc, d_ff, i * BLOCK,
                    k_ptr, k_sb, k_ss, k_sc, d_ff, j * BLOCK,
                    kk_ptr, kk_s0, kk_s1,
                    mask_ptr, m_sb, m_ss, R, S,
                    HAS_MASK, KK_F32, BLOCK, BLOCK_K, HANDOFF,
                )
            else:
                q = pid - n_kk
                a = q // T
                j = q - a * T
                _gram_tile(
                    v_ptr, v_sb, v_ss, v_sc, d_v, a * BLOCK,
                    k_ptr, k_sb, k_ss, k_sc, d_ff, j * BLOCK,
                    vk_ptr, vk_s0, vk_s1,
                    mask_ptr, m_sb, m_ss, R, S,
                    HAS_MASK, VK_F32, BLOCK, BLOCK_K, HANDOFF,
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

# Rows per tensor-core accumulator before the hand-off to a plain fp32 sum (_gram_tile): at most
# ROWS_PER_ACC / 16 = 16 truncating steps on one accumulator, whatever the batch size. Modelled
# error at 8B/70B shapes with 16k-token batches: 3.3e-7 relative (unbounded: 2.2e-5), see
# tests/test_tc_numerics.py.
ROWS_PER_ACC = 256

# (BLOCK, BLOCK_K, num_warps, num_stages)
Config = tuple[int, int, int, int]
INTERPRETER_CONFIG: Config = (64, 64, 4, 1)
# Candidates benchmarked on CUDA (Hopper-typical first). BLOCK is the square output tile. Shared
# memory (sm_90 compile, one GEMM call site): stages × 2 operands × BLOCK_K × BLOCK × 2 bytes,
# e.g. 128 KiB at (128, 64, 8, 4), 192 KiB at (128, 128, 8, 3); configs over the device's limit
# are dropped before tuning (filter_configs) and reported. A 128×128 tile needs 8 warps: the
# hand-off keeps two fp32 accumulators (acc and part), 128 registers per thread at 8 warps; at 4
# warps (128, 64, 4, 3) spills 1.4 KB per thread (ptxas, sm_90a), so it is not a candidate.
GPU_CONFIGS_16BIT: list[Config] = [
    (128, 64, 8, 3),
    (128, 64, 8, 4),
    (128, 64, 8, 5),
    (128, 32, 8, 4),
    (128, 128, 8, 3),
    (64, 64, 4, 4),
]
GPU_CONFIGS_F32: list[Config] = [
    (64, 32, 4, 3),
    (128, 32, 8, 3),
    (64, 16, 4, 4),
    (128, 16, 8, 3),
]
# Tuning runs on a sub-problem at most this wide (tiles are independent, so their speed does not
# depend on d_ff once the GPU is full), into scratch accumulators of that size.
_TUNE_MAX_WIDTH = 6144
_TUNED: dict[tuple, Config] = {}
# Per problem key: the configs tried, their times, the chosen one and the ones dropped (and why).
TUNING_REPORT: dict[tuple, dict] = {}

log = logging.getLogger(__name__)


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


def handoff_for(block_k: int) -> int:
    """Row chunks per tensor-core accumulator: ROWS_PER_ACC // BLOCK_K (≥ 2, see _parse_config)."""
    return max(1, ROWS_PER_ACC // block_k)


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


def _parse_config(text: str) -> Config:
    try:
        block, block_k, warps, stages = (int(t) for t in text.split(","))
    except ValueError:
        raise ZuFastError(
            f"ZU_FAST_COV_TRITON_CONFIG={text!r}: expected BLOCK,BLOCK_K,num_warps,num_stages"
        ) from None
    if block < 16 or block_k < 16 or block & (block - 1) or block_k & (block_k - 1):
        raise ZuFastError(f"ZU_FAST_COV_TRITON_CONFIG={text!r}: BLOCK and BLOCK_K must be powers of 2 >= 16")
    if block_k > ROWS_PER_ACC // 2:
        # with one chunk per hand-off the compiler may fold the hand-off into one long chain
        raise ZuFastError(f"ZU_FAST_COV_TRITON_CONFIG={text!r}: BLOCK_K must be <= {ROWS_PER_ACC // 2}")
    return block, block_k, warps, stages


def _constexprs(config: Config, *, fused, kk_f32, vk_f32, ks_f64, vs_f64, has_mask, one_gemm) -> dict:
    block, block_k, _, _ = config
    return dict(
        HAS_MASK=has_mask, FUSED=fused,
        KK_F32=kk_f32, VK_F32=vk_f32, KS_F64=ks_f64, VS_F64=vs_f64,
        BLOCK=block, BLOCK_K=block_k, HANDOFF=handoff_for(block_k), ONE_GEMM=one_gemm,
    )


def _grid(config: Config, d_ff: int, d_v: int, fused: bool) -> tuple[int]:
    T = triton.cdiv(d_ff, config[0])
    Tv = triton.cdiv(d_v, config[0]) if fused else 0
    return (T * (T + 1) // 2 + Tv * T + T + Tv,)


def _launch(args, config, *, d_ff, d_v, **flags):
    _cov_kernel[_grid(config, d_ff, d_v, flags["fused"])](
        *args, **_constexprs(config, **flags), num_warps=config[2], num_stages=config[3],
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


# ---------------------------------------------------------------------------------------------------
# Configs and the device's shared memory
# ---------------------------------------------------------------------------------------------------


def filter_configs(
    candidates: list[Config], shared_bytes: Callable[[Config], int], limit: int,
) -> tuple[list[Config], list[dict]]:
    """Split ``candidates`` into those whose kernel fits ``limit`` bytes of shared memory and the
    dropped ones (each ``{"config", "shared_bytes", "limit"}``), in order."""
    kept, dropped = [], []
    for cfg in candidates:
        need = int(shared_bytes(cfg))
        if need <= limit:
            kept.append(cfg)
        else:
            dropped.append({"config": cfg, "shared_bytes": need, "limit": limit})
    return kept, dropped


def device_shared_limit(device: torch.device) -> int:
    """Largest dynamic shared memory one block may use on ``device`` (opt-in limit), bytes."""
    idx = device.index if device.index is not None else torch.cuda.current_device()
    return int(triton.runtime.driver.active.utils.get_device_properties(idx)["max_shared_mem"])


def compile_for_target(
    config: Config, *, capability: tuple[int, int] = (9, 0), dtype: torch.dtype = torch.bfloat16,
    fused: bool = True, has_mask: bool = True, one_gemm: bool = True, int_types: dict[str, str] | None = None,
):
    """The kernel compiled for ``capability`` without a GPU (Triton compiles with its own ptxas),
    specialised as a launch on contiguous activations and accumulators would be (unit strides as
    constants, 16-byte aligned pointers, strides and widths). ``int_types`` gives integer arguments
    another type than i32, as a launch does for values ≥ 2^31 (e.g. ``{"k_sb": "i64"}``: a batch
    stride of keys past 2^31 elements), without allocating such tensors. Returns Triton's
    CompiledKernel (``.metadata.shared``, ``.asm["ttgir" | "ptx" | "cubin"]``). Needs a process
    without TRITON_INTERPRET=1 (the interpreter replaces triton.language's own jit functions)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if interpreting():
        raise ZuFastError("compile_for_target: TRITON_INTERPRET=1 is set; compile in a process without it")
    kernel = _cov_kernel

    elem = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[dtype]
    f32 = dtype == torch.float32
    flags = dict(fused=fused, kk_f32=f32, vk_f32=f32, ks_f64=True, vs_f64=True, has_mask=has_mask,
                 one_gemm=one_gemm)
    consts = _constexprs(config, **flags)
    unit = ("k_sc", "v_sc", "kk_s1", "vk_s1", "ks_s0", "vs_s0", "m_ss")
    ptr_types = {"k_ptr": f"*{elem}", "v_ptr": f"*{elem}", "mask_ptr": "*u8", "kk_ptr": "*fp32",
                 "ks_ptr": "*fp64", "vk_ptr": "*fp32", "vs_ptr": "*fp64"}
    sig, attrs = {}, {}
    for idx, name in enumerate(kernel.arg_names):
        if name in consts or name in unit:
            sig[name] = "constexpr"
        elif name in ptr_types:
            sig[name] = ptr_types[name]
            attrs[(idx,)] = [["tt.divisibility", 16]]
        else:
            sig[name] = (int_types or {}).get(name, "i32")
            if name not in ("R", "S"):  # widths and strides: multiples of 16 at real shapes
                attrs[(idx,)] = [["tt.divisibility", 16]]
    consts.update({name: 1 for name in unit})
    target = GPUTarget("cuda", capability[0] * 10 + capability[1], 32)
    return triton.compile(ASTSource(kernel, sig, consts, attrs), target=target,
                          options=dict(num_warps=config[2], num_stages=config[3]))


def shared_bytes_for_target(config: Config, **kwargs) -> int:
    """Shared memory (bytes) of ``compile_for_target(config, **kwargs)``."""
    return int(compile_for_target(config, **kwargs).metadata.shared)


def precompile(device: torch.device | str = "cuda") -> dict:
    """Compile (without launching) every candidate config for the specialisations real runs and the
    GPU check's table use — bf16 keys (and fp32 keys, the table's accuracy rows) with a mask, fp64
    column sums, KKᵀ alone and fused with VᵀK, widths and strides multiples of 16 — so that later
    tuning and runs find them in Triton's cache. The GPU check runs this in the background while the
    CUDA extension builds. Returns {(dtype, fused, config): shared bytes}."""
    dev = torch.device(device)
    mask = torch.ones(1, 64, device=dev, dtype=torch.bool).view(torch.uint8)
    kk = torch.zeros(256, 256, device=dev)
    ks = torch.zeros(256, device=dev, dtype=torch.float64)
    vk = torch.zeros(128, 256, device=dev)
    vs = torch.zeros(128, device=dev, dtype=torch.float64)
    out = {}
    for dtype, configs, fuseds in ((torch.bfloat16, GPU_CONFIGS_16BIT, (False, True)),
                                   (torch.float32, GPU_CONFIGS_F32, (True,))):
        keys = torch.zeros(1, 64, 256, device=dev, dtype=dtype)
        values = torch.zeros(1, 64, 128, device=dev, dtype=dtype)
        f32 = dtype == torch.float32
        for fused in fuseds:
            flags = dict(fused=fused, kk_f32=f32, vk_f32=f32, ks_f64=True, vs_f64=fused, has_mask=True,
                         one_gemm=True)
            v3, vk_, vs_, d_v = (values, vk, vs, 128) if fused else (keys, kk, ks, 0)
            args = _kernel_args(keys, v3, mask, kk, ks, vk_, vs_, 64, 64, 256, d_v)
            for cfg in configs:
                kernel = _cov_kernel.warmup(*args, grid=_grid(cfg, 256, d_v, fused), **_constexprs(cfg, **flags),
                                            num_warps=cfg[2], num_stages=cfg[3])
                out[(str(dtype), fused, cfg)] = kernel.metadata.shared
    return out


def _tune(key, k3, v3, m2, R, S, d_ff, d_v, flags) -> Config:
    """Benchmark the candidate configs that fit the device's shared memory on a ≤_TUNE_MAX_WIDTH-wide
    slice into scratch accumulators; record what was tried and dropped in TUNING_REPORT[key]."""
    from triton.runtime.errors import OutOfResources
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

    def shared_bytes(cfg: Config) -> int:  # compile only (no launch): the exact number
        kernel = _cov_kernel.warmup(*args, grid=_grid(cfg, wt, wv, flags["fused"]),
                                    **_constexprs(cfg, **flags), num_warps=cfg[2], num_stages=cfg[3])
        return kernel.metadata.shared

    limit = device_shared_limit(dev)
    kept, dropped = filter_configs(cands, shared_bytes, limit)
    report = {"limit": limit, "dropped": dropped, "times_ms": {}, "chosen": None}
    TUNING_REPORT[key] = report
    for d in dropped:
        log.info("cov_accumulate (triton): config %s needs %d bytes of shared memory > %d: dropped",
                 d["config"], d["shared_bytes"], limit)
    best, best_t = None, float("inf")
    for cfg in kept:
        try:
            t = do_bench(lambda cfg=cfg: _launch(args, cfg, d_ff=wt, d_v=wv, **flags), warmup=5, rep=25)
        except OutOfResources as e:  # registers, or a limit the compile-time check did not see
            report["dropped"].append({"config": cfg, "error": str(e)})
            continue
        report["times_ms"][cfg] = t
        if t < best_t:
            best, best_t = cfg, t
    if best is None:
        raise ZuFastError(f"cov_accumulate (triton): no candidate config runs for {key}: {report['dropped']}")
    report["chosen"] = best
    return best


def _choose_config(key, k3, v3, m2, R, S, d_ff, d_v, flags) -> Config:
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
        vk_f32 = fused and (
            values.dtype == torch.float32
            or values.dtype != keys.dtype
            or (interp and values.dtype == torch.bfloat16)
        )
        flags = dict(
            fused=fused,
            kk_f32=keys.dtype == torch.float32 or (interp and keys.dtype == torch.bfloat16),
            vk_f32=vk_f32,
            ks_f64=ks.dtype == torch.float64,
            vs_f64=fused and vs.dtype == torch.float64,
            has_mask=mask is not None,
        )
        # one GEMM call site unless the values need another dot (and pointer type) than the keys
        flags["one_gemm"] = not fused or (values.dtype == keys.dtype and flags["kk_f32"] == vk_f32)
        key = (dev.index, d_ff, d_v, keys.dtype, values.dtype if fused else None, tuple(sorted(flags.items())))
        config = _choose_config(key, k3, v3, m2, R, S, d_ff, d_v, flags)
        with torch.cuda.device(dev) if dev.type == "cuda" else contextlib.nullcontext():
            _launch(_kernel_args(k3, v3, m2, kk, ks, vk, vs, R, S, d_ff, d_v), config,
                    d_ff=d_ff, d_v=d_v, **flags)
    elif R > 0 and fused and d_v > 0:
        # no key columns (vk is [d, 0]): only Σv is left, a plain reduction
        v = values.reshape(R, d_v)
        if mask is not None:
            v = v[mask.reshape(-1).to(torch.bool)]
        vs.add_(v.sum(0, dtype=vs.dtype))
    n.add_(torch.count_nonzero(mask) if mask is not None else R)
