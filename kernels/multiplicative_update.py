"""Triton kernel for ``multiplicative_update_``: W ← W + E·W in place (E = D − I), column chunk by chunk.

Imported as ``zu_fast.kernels.multiplicative_update`` (lazily, by ``zu_fast.ops.triton_backend``),
never as a top-level ``kernels`` module. Same contract as the plain-PyTorch default
``zu_fast.ops.multiplicative_update.multiplicative_update_torch`` and the CUDA kernel
(csrc/multiplicative_update.cu), whose form it follows:

* Every path computes W + E·W and rounds once (``form="delta"``: the matrix given is E; the
  multiplier form ``form="multiplier"`` gives D and E = D − I is formed first). Tensor cores
  truncate their accumulator (round toward zero after every k16 step); in W + E·W that error
  touches only E·W, the edit, instead of the whole weight (tests/test_tc_numerics.py).
* bf16 W with a float32 E (what a saved edit stores): tensor cores. E is split into two bf16 terms
  E = E_hi + E_lo (+ O(2^-17 |E|)), rounded to nearest exactly as the torch default does
  (``_bf16_split``) and as the CUDA kernel's ``split2``; W is bf16, so every product is exact in
  fp32. Per BLOCK_K slab of the reduction, ``part = dot(E_lo, W, part)`` then
  ``part = dot(E_hi, W, part)``; ``part`` is handed off to a round-to-nearest fp32 ``acc`` every
  ROWS_PER_ACC rows, so no accumulator sees more than 2·ROWS_PER_ACC/16 = 16 truncating steps.
  The split is made once per call on the host (two bf16 copies of E, d×d each: the same bytes as
  E in fp32), so the main loop is two plain bf16 GEMMs sharing the W tile.
* Every other combination (fp16/fp32 W, or a float64 E/D): the product in E's precision —
  fp32 ``tl.dot(..., input_precision="ieee")`` (no tf32), or fp64 (DMMA on sm_80+). For a 16-bit
  W with a float64 E each chunk of W is first copied to float64 (exact; quarter-size chunks, so the
  copy is at most 1/16 of W's bytes, like the staging buffer): Triton 3.8 cannot lower an fp64 dot
  whose operand was converted from a 16-bit tile ("fp64 don't support largeK MMA").
* One rounding to W's dtype in the epilogue: round to nearest even (written with integer
  operations for bf16: the interpreter's own fp32→bf16 cast truncates), or stochastic rounding
  with the stateless splitmix64 hash of (seed, element index) shared with the torch default
  (``sr_random_bits``) and the CUDA kernels (csrc/common.cuh ``random_u32``): the same value and
  index round the same way in all three. A float64 result goes to fp32 first (as torch rounds it).
* In place: every output tile reads all d rows of its columns, so W is walked in column chunks;
  each chunk's result goes to a staging buffer of W's dtype laid out like W (at most 1/16 of W,
  or 512 columns) and is copied back once the chunk is done. Offsets are int64 wherever an index
  meets a stride (a column-major 70B down_proj: column × stride passes 2^31).
* Programs are ordered in groups of GROUP_M row blocks per column block (as in Triton's matmul
  tutorial), so the W column blocks and E row blocks in flight stay in L2.

On CUDA the tile configuration is chosen per problem key by timing the candidates on the first
chunk (written into a scratch staging buffer, never into W), after dropping those whose compiled
kernel needs more shared memory than the device has (``TUNING_REPORT``);
``ZU_FAST_UPDATE_TRITON_CONFIG=BM,BN,BK,num_warps,num_stages`` forces one and
``ZU_FAST_UPDATE_AUTOTUNE=0`` takes the first candidate. Under ``TRITON_INTERPRET=1`` (CPU tensors)
a small fixed configuration is used, and the bf16 tiles are multiplied as fp32 (the interpreter's
tl.dot multiplies bf16 as raw integers; bf16 products are exact in fp32 either way).
"""

from __future__ import annotations

import contextlib
import logging
import os

import torch
import triton
import triton.language as tl

from ..errors import ZuFastError
from ..ops.multiplicative_update import check_update_args, edit_seed, sr_stream_seed

# ---------------------------------------------------------------------------------------------------
# Triton device code
# ---------------------------------------------------------------------------------------------------

MODE_TC: tl.constexpr = tl.constexpr(0)  # bf16 W, fp32 E split in two bf16 terms: tensor cores
MODE_F32: tl.constexpr = tl.constexpr(1)  # fp32 product (ieee, no tf32)
MODE_F64: tl.constexpr = tl.constexpr(2)  # fp64 product
OUT_F32: tl.constexpr = tl.constexpr(0)
OUT_BF16: tl.constexpr = tl.constexpr(1)
OUT_F16: tl.constexpr = tl.constexpr(2)


@triton.jit
def random_u32(stream, index):
    """32 random bits for each element ``index`` (int64) of stream ``stream`` (uint64): splitmix64's
    finaliser of stream + (index + 1)·golden, bit for bit csrc/common.cuh's random_u32."""
    z = stream + (index.to(tl.uint64, bitcast=True) + 1) * 0x9E3779B97F4A7C15
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9
    z = (z ^ (z >> 27)) * 0x94D049BB133111EB
    z = z ^ (z >> 31)
    return (z >> 32).to(tl.uint32)


@triton.jit
def _finite_f32(bits):
    return (bits & 0x7F800000) != 0x7F800000


@triton.jit
def bf16_bits_nearest(x):
    """fp32 → bf16 bit pattern (uint32 in [0, 2^16)), round to nearest even; NaN → 0x7FC0 (torch's)."""
    bits = x.to(tl.uint32, bitcast=True)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return tl.where(x != x, 0x7FC0, rounded)


@triton.jit
def bf16_bits_stochastic(x, rnd):
    """fp32 → bf16 bit pattern, stochastic: 16 random bits added below the kept 16, then truncated
    (rounds the magnitude up with probability equal to the dropped fraction); NaN, Inf and
    overflow round to nearest. Bit for bit torch's ``stochastic_round`` and the CUDA kernels'."""
    bits = x.to(tl.uint32, bitcast=True)
    up = (bits + (rnd & 0xFFFF)) & 0xFFFF0000
    ok = _finite_f32(bits) & _finite_f32(up)
    return tl.where(ok, up >> 16, bf16_bits_nearest(x))


@triton.jit
def f16_bits_stochastic(x, rnd):
    """fp32 → fp16 bit pattern (uint32), stochastic: |x| rounded toward zero, one step up with
    probability (|x| − lo) / ulp, the sign last; NaN, Inf and |x| ≥ 65504 round to nearest."""
    bits = x.to(tl.uint32, bitcast=True)
    a = tl.abs(x)
    near = x.to(tl.float16).to(tl.uint16, bitcast=True).to(tl.uint32)
    lo = a.to(tl.float16).to(tl.uint16, bitcast=True).to(tl.uint32)  # nearest; one step down if above
    lo = tl.where(lo.to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32) > a, lo - 1, lo)
    hi = lo + 1
    lof = lo.to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
    gap = hi.to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32) - lof
    p = tl.where(lof != a, (a - lof) / gap, 0.0)  # exact: a − lof is exact, gap a power of two
    u = (rnd >> 8).to(tl.float32) * (1.0 / 16777216.0)  # uniform in [0, 1)
    mag = tl.where(u < p, hi, lo)
    out = tl.where((bits >> 31) != 0, mag | 0x8000, mag)
    return tl.where(_finite_f32(bits) & (a < 65504.0), out, near)


@triton.jit(do_not_specialize=["col0", "seed"])
def _update_kernel(
    a_ptr, a2_ptr, d,
    w_ptr, w_sr, w_sc,
    o_ptr, o_sr, o_sc,
    ncols, col0, d_in, seed,
    MODE: tl.constexpr, SUB_EYE: tl.constexpr, DOT_F32: tl.constexpr, OUT: tl.constexpr,
    STOCHASTIC: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, HANDOFF: tl.constexpr, GROUP_M: tl.constexpr,
):
    """out[rows, cols] = round(W[rows, cols] + (E · W[:, cols])[rows]) for one BM×BN tile of a chunk.

    MODE_TC: ``a_ptr`` E_hi, ``a2_ptr`` E_lo (bf16, [d, d] contiguous); else ``a_ptr`` E (or D with
    SUB_EYE) in fp32/fp64. W element (k, n) of the chunk at k·w_sr + n·w_sc, output at
    i·o_sr + n·o_sc; its stochastic-rounding index is i·d_in + col0 + n.
    """
    pid = tl.program_id(0)
    n_m = tl.cdiv(d, BM)
    n_n = tl.cdiv(ncols, BN)
    per_group = GROUP_M * n_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(n_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows

    rows = pid_m * BM + tl.arange(0, BM)
    cols = pid_n * BN + tl.arange(0, BN)
    r_ok = rows < d
    c_ok = cols < ncols
    rows64 = rows.to(tl.int64)
    w_col = cols.to(tl.int64) * tl.cast(w_sc, tl.int64)  # int64: column × stride passes 2^31
    a_row = rows64 * tl.cast(d, tl.int64)
    if MODE == MODE_F64:
        acc = tl.zeros((BM, BN), dtype=tl.float64)
    else:
        acc = tl.zeros((BM, BN), dtype=tl.float32)
    part = tl.zeros((BM, BN), dtype=tl.float32)
    for it in range(0, tl.cdiv(d, BK)):
        ks = it * BK + tl.arange(0, BK)
        k_ok = ks < d
        a_off = a_row[:, None] + ks.to(tl.int64)[None, :]
        a_mask = r_ok[:, None] & k_ok[None, :]
        w = tl.load(w_ptr + ks.to(tl.int64)[:, None] * w_sr + w_col[None, :],
                    mask=k_ok[:, None] & c_ok[None, :], other=0.0)  # [BK, BN]
        if MODE == MODE_TC:
            e_hi = tl.load(a_ptr + a_off, mask=a_mask, other=0.0)  # [BM, BK] bf16
            e_lo = tl.load(a2_ptr + a_off, mask=a_mask, other=0.0)
            if DOT_F32:  # the interpreter: the same exact products, in fp32
                wf = w.to(tl.float32)
                part = tl.dot(e_lo.to(tl.float32), wf, part, input_precision="ieee")  # small term first
                part = tl.dot(e_hi.to(tl.float32), wf, part, input_precision="ieee")
            else:
                part = tl.dot(e_lo, w, part)  # small term first
                part = tl.dot(e_hi, w, part)
            if it % HANDOFF == HANDOFF - 1:  # hand the truncated partial sum off to the fp32 sum
                acc += part
                part = tl.zeros((BM, BN), dtype=tl.float32)
        else:
            e = tl.load(a_ptr + a_off, mask=a_mask, other=0.0)  # [BM, BK] in E's precision
            if SUB_EYE:  # D given: E = D − I on the fly (exact for a diagonal entry in [0.5, 2])
                e = tl.where(rows[:, None] == ks[None, :], e - 1.0, e)
            if MODE == MODE_F64:
                acc = tl.dot(e, w.to(tl.float32).to(tl.float64), acc)  # bf16 → fp64 via fp32 (exact; no direct cvt)
            else:
                acc = tl.dot(e, w.to(tl.float32), acc, input_precision="ieee")
    if MODE == MODE_TC:
        acc += part

    o_mask = r_ok[:, None] & c_ok[None, :]
    w_self = tl.load(w_ptr + rows64[:, None] * w_sr + w_col[None, :], mask=o_mask, other=0.0)
    v = w_self.to(tl.float32).to(acc.dtype) + acc  # W + E·W in E's precision: the one value that gets rounded
    out = o_ptr + rows64[:, None] * o_sr + cols.to(tl.int64)[None, :] * o_sc
    if OUT == OUT_F32:
        tl.store(out, v.to(tl.float32), mask=o_mask)
    else:
        v32 = v.to(tl.float32)
        if STOCHASTIC:
            stream = tl.cast(seed, tl.int64).to(tl.uint64, bitcast=True)
            index = rows64[:, None] * tl.cast(d_in, tl.int64) + (tl.cast(col0, tl.int64) + cols.to(tl.int64))[None, :]
            rnd = random_u32(stream, index)
            if OUT == OUT_BF16:
                b = bf16_bits_stochastic(v32, rnd)
            else:
                b = f16_bits_stochastic(v32, rnd)
        else:
            if OUT == OUT_BF16:
                b = bf16_bits_nearest(v32)
            else:
                b = v32.to(tl.float16).to(tl.uint16, bitcast=True).to(tl.uint32)
        if OUT == OUT_BF16:
            tl.store(out, b.to(tl.uint16).to(tl.bfloat16, bitcast=True), mask=o_mask)
        else:
            tl.store(out, b.to(tl.uint16).to(tl.float16, bitcast=True), mask=o_mask)


# ---------------------------------------------------------------------------------------------------
# Host side
# ---------------------------------------------------------------------------------------------------

# Rows of the reduction per tensor-core partial sum before the round-to-nearest fp32 hand-off: each
# BLOCK_K slab adds 2·BLOCK_K/16 truncating steps (E_lo, then E_hi), so a chain has at most
# 2·ROWS_PER_ACC/16 = 16 steps (the CUDA kernel: 64 rows, 8 steps). BLOCK_K ≤ ROWS_PER_ACC / 2: with
# one slab per hand-off Triton's dot(a, b, 0) + c → dot(a, b, c) rewrite could fold it away.
ROWS_PER_ACC = 128

# (BM, BN, BK, num_warps, num_stages); GROUP_M is fixed
Config = tuple[int, int, int, int, int]
GROUP_M = 8
INTERPRETER_CONFIG: Config = (64, 64, 32, 4, 1)
# Candidates on CUDA per mode, Hopper-typical first. Shared memory of the tensor-core path:
# stages × (2·BM·BK + BK·BN) × 2 bytes: 144 KiB at (128, 128, 64, 8, 3), 96 KiB at (128, 128, 32, 8, 4).
# A 128×128 tile needs 8 warps: acc and part are two fp32 accumulators (128 registers per thread).
# Compiled on CPU (ptxas -v): no spills on sm_90a; on sm_100a the row-major 128×128 and 64×128 tiles
# spill 28–288 bytes (the hand-off moves the partial sum out of tensor memory every slab), while
# (128, 64, 64, 8, 4) spills nothing in either layout (tests/test_triton_update.py).
GPU_CONFIGS = {
    "tc": [(128, 128, 64, 8, 3), (128, 128, 32, 8, 4), (128, 64, 64, 8, 4), (64, 128, 64, 4, 4)],
    "f32": [(64, 64, 32, 4, 3), (128, 64, 32, 8, 3), (64, 64, 16, 4, 4)],
    "f64": [(64, 64, 16, 4, 3), (64, 64, 32, 4, 2), (32, 64, 16, 4, 3)],
}
_TUNED: dict[tuple, Config] = {}
TUNING_REPORT: dict[tuple, dict] = {}
STAGING_MAX_COLS = 512  # a chunk is at most max(d_in / 16, 512) columns (the staging buffer)

log = logging.getLogger(__name__)


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


def handoff_for(block_k: int) -> int:
    return max(1, ROWS_PER_ACC // block_k)


def default_chunk_cols(d_in: int) -> int:
    """Columns per chunk: the staging buffer is at most 1/16 of W, or 512 columns for small W."""
    c = max(d_in // 16, min(d_in, STAGING_MAX_COLS), 1)
    if c >= 128:
        c -= c % 128
    return c


def _parse_config(text: str) -> Config:
    try:
        bm, bn, bk, warps, stages = (int(t) for t in text.split(","))
    except ValueError:
        raise ZuFastError(
            f"ZU_FAST_UPDATE_TRITON_CONFIG={text!r}: expected BM,BN,BK,num_warps,num_stages"
        ) from None
    if min(bm, bn, bk) < 16 or any(v & (v - 1) for v in (bm, bn, bk)):
        raise ZuFastError(f"ZU_FAST_UPDATE_TRITON_CONFIG={text!r}: BM, BN and BK must be powers of 2 >= 16")
    if bk > ROWS_PER_ACC // 2:
        raise ZuFastError(f"ZU_FAST_UPDATE_TRITON_CONFIG={text!r}: BK must be <= {ROWS_PER_ACC // 2}")
    return bm, bn, bk, warps, stages


def _mode(w_dtype: torch.dtype, m_dtype: torch.dtype) -> str:
    if m_dtype == torch.float64:
        return "f64"
    return "tc" if w_dtype == torch.bfloat16 else "f32"


_MODES = {"tc": 0, "f32": 1, "f64": 2}
_OUTS = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def _constexprs(config: Config, *, mode: str, sub_eye: bool, dot_f32: bool, out: torch.dtype,
                stochastic: bool) -> dict:
    bm, bn, bk, _, _ = config
    return dict(MODE=_MODES[mode], SUB_EYE=sub_eye, DOT_F32=dot_f32, OUT=_OUTS[out], STOCHASTIC=stochastic,
                BM=bm, BN=bn, BK=bk, HANDOFF=handoff_for(bk), GROUP_M=GROUP_M)


def _grid(config: Config, d: int, ncols: int) -> tuple[int]:
    return (triton.cdiv(d, config[0]) * triton.cdiv(ncols, config[1]),)


def _launch(args: tuple, config: Config, d: int, ncols: int, flags: dict) -> None:
    _update_kernel[_grid(config, d, ncols)](*args, **_constexprs(config, **flags),
                                            num_warps=config[3], num_stages=config[4])


def _chunk_args(a, a2, d, Wc, out, col0, d_in, seed):
    # a stride of a dimension of size 1 never multiplies a non-zero index: 1 keeps the signature stable
    w_sr = Wc.stride(0) if Wc.shape[0] > 1 else 1
    w_sc = Wc.stride(1) if Wc.shape[1] > 1 else 1
    return (a, a2, d, Wc, w_sr, w_sc, out, out.stride(0), out.stride(1), Wc.shape[1], col0, d_in, seed)


def _staging(W: torch.Tensor, d: int, cols: int) -> torch.Tensor:
    """A [d, cols] buffer of W's dtype laid out like W (column-major for a transposed weight)."""
    col_major = d > 1 and W.stride(0) == 1 and not (W.shape[1] > 1 and W.stride(1) == 1)
    if col_major:
        return torch.empty(cols, d, device=W.device, dtype=W.dtype).t()
    return torch.empty(d, cols, device=W.device, dtype=W.dtype)


def bf16_split(E: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """E ≈ hi + lo, both bf16 [d, d] contiguous: hi the nearest bf16 of fp32 E, lo the nearest bf16 of
    the exact fp32 remainder (the torch default's and the CUDA kernel's split). The remainder is
    formed in row blocks, so the fp32 temporaries stay at 2 × 16 MiB whatever d."""
    E32 = E.float()
    hi = E32.to(torch.bfloat16).contiguous()
    lo = torch.empty_like(hi)
    rows = max(1, 2**22 // max(E32.shape[1], 1))
    for r0 in range(0, E32.shape[0], rows):
        lo[r0 : r0 + rows] = E32[r0 : r0 + rows] - hi[r0 : r0 + rows].float()
    return hi, lo


# ---------------------------------------------------------------------------------------------------
# Configs: tuning on CUDA, compiling without a GPU
# ---------------------------------------------------------------------------------------------------


def _tune(key, args: tuple, d: int, ncols: int, flags: dict, device: torch.device) -> Config:
    """Time the candidates that fit the device's shared memory on one chunk (into the scratch
    staging buffer in ``args``: W is only read); record what was tried and dropped."""
    from triton.runtime.errors import OutOfResources
    from triton.testing import do_bench

    from .cov_accumulate import device_shared_limit, filter_configs

    cands = GPU_CONFIGS[flags["mode"]]

    def shared_bytes(cfg: Config) -> int:  # compile only (no launch): the exact number
        kernel = _update_kernel.warmup(*args, grid=_grid(cfg, d, ncols), **_constexprs(cfg, **flags),
                                       num_warps=cfg[3], num_stages=cfg[4])
        return kernel.metadata.shared

    limit = device_shared_limit(device)
    kept, dropped = filter_configs(cands, shared_bytes, limit)
    report = {"limit": limit, "dropped": dropped, "times_ms": {}, "chosen": None}
    TUNING_REPORT[key] = report
    for dr in dropped:
        log.info("multiplicative_update_ (triton): config %s needs %d bytes of shared memory > %d: dropped",
                 dr["config"], dr["shared_bytes"], limit)
    best, best_t = None, float("inf")
    for cfg in kept:
        try:
            t = do_bench(lambda cfg=cfg: _launch(args, cfg, d, ncols, flags), warmup=5, rep=25)
        except OutOfResources as e:  # registers, or a limit the compile-time check did not see
            report["dropped"].append({"config": cfg, "error": str(e)})
            continue
        report["times_ms"][cfg] = t
        if t < best_t:
            best, best_t = cfg, t
    if best is None:
        raise ZuFastError(f"multiplicative_update_ (triton): no candidate config runs for {key}: {report['dropped']}")
    report["chosen"] = best
    return best


def _choose_config(key, args: tuple, d: int, ncols: int, flags: dict, device: torch.device) -> Config:
    forced = os.environ.get("ZU_FAST_UPDATE_TRITON_CONFIG", "").strip()
    if forced:
        return _parse_config(forced)
    if device.type != "cuda":
        return INTERPRETER_CONFIG
    if key not in _TUNED:
        if os.environ.get("ZU_FAST_UPDATE_AUTOTUNE", "1").strip() == "0":
            _TUNED[key] = GPU_CONFIGS[flags["mode"]][0]
        else:
            _TUNED[key] = _tune(key, args, d, ncols, flags, device)
    return _TUNED[key]


def compile_for_target(
    config: Config, *, capability: tuple[int, int] = (9, 0), w_dtype: torch.dtype = torch.bfloat16,
    m_dtype: torch.dtype = torch.float32, layout: str = "row", stochastic: bool = False,
    sub_eye: bool = False, int_types: dict[str, str] | None = None,
):
    """The kernel compiled for ``capability`` without a GPU (Triton compiles with its own ptxas),
    specialised as a launch on a row-major (``layout="row"``: unit column stride) or column-major
    (``"col"``: unit row stride) W would be: 16-byte aligned pointers, d and strides multiples of 16.
    ``int_types`` gives integer arguments another type than i32 (e.g. ``{"w_sc": "i64"}``: a column
    stride past 2^31 elements). Returns Triton's CompiledKernel (``.metadata.shared``,
    ``.asm["ttgir" | "ptx" | "cubin"]``). Needs a process without TRITON_INTERPRET=1."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if interpreting():
        raise ZuFastError("compile_for_target: TRITON_INTERPRET=1 is set; compile in a process without it")
    mode = _mode(w_dtype, m_dtype)
    consts = _constexprs(config, mode=mode, sub_eye=sub_eye, dot_f32=False, out=w_dtype, stochastic=stochastic)
    upcast = mode == "f64" and w_dtype != torch.float32  # W read from a row-major fp64 copy of the chunk
    unit = ("w_sc" if layout == "row" or upcast else "w_sr", "o_sc" if layout == "row" else "o_sr")
    elem = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.float64: "fp64"}
    a_elem = "bf16" if mode == "tc" else elem[m_dtype]
    w_elem = "fp64" if upcast else elem[w_dtype]
    ptr_types = {"a_ptr": f"*{a_elem}", "a2_ptr": f"*{a_elem}", "w_ptr": f"*{w_elem}", "o_ptr": f"*{elem[w_dtype]}"}
    sig, attrs = {}, {}
    for idx, name in enumerate(_update_kernel.arg_names):
        if name in consts or name in unit:
            sig[name] = "constexpr"
        elif name in ptr_types:
            sig[name] = ptr_types[name]
            attrs[(idx,)] = [["tt.divisibility", 16]]
        else:
            sig[name] = (int_types or {}).get(name, "i64" if name == "seed" else "i32")
            if name in ("d", "w_sr", "w_sc", "o_sr", "o_sc", "d_in"):
                attrs[(idx,)] = [["tt.divisibility", 16]]
    consts.update({name: 1 for name in unit})
    target = GPUTarget("cuda", capability[0] * 10 + capability[1], 32)
    return triton.compile(ASTSource(_update_kernel, sig, consts, attrs), target=target,
                          options=dict(num_warps=config[3], num_stages=config[4]))


def precompile(device: torch.device | str = "cuda") -> dict:
    """Compile (without launching) the candidates for bf16 W, row- and column-major, that real edits
    and the GPU check's table use: the tensor-core path with nearest and stochastic rounding, and
    the fp64 path (a float64 D) — so that tuning and runs find them in Triton's cache (the GPU check
    runs this in the background). Returns {(mode, layout, stochastic, config): shared bytes}."""
    dev = torch.device(device)
    d, cols = 256, 256
    hi = torch.zeros(d, d, device=dev, dtype=torch.bfloat16)
    m64 = torch.zeros(d, d, device=dev, dtype=torch.float64)
    w64 = torch.zeros(d, cols, device=dev, dtype=torch.float64)  # the fp64 copy of a chunk
    out = {}
    for layout in ("row", "col"):
        W = torch.zeros(d, cols, device=dev, dtype=torch.bfloat16)
        if layout == "col":
            W = W.t().contiguous().t()
        buf = _staging(W, d, cols)
        for mode, sr in (("tc", False), ("tc", True), ("f64", False)):
            flags = dict(mode=mode, sub_eye=mode == "f64", dot_f32=False, out=torch.bfloat16, stochastic=sr)
            args = (_chunk_args(hi, hi, d, W, buf, 0, cols, 12345) if mode == "tc"
                    else _chunk_args(m64, m64, d, w64, buf, 0, cols, 12345))
            for cfg in GPU_CONFIGS[mode]:
                k = _update_kernel.warmup(*args, grid=_grid(cfg, d, cols), **_constexprs(cfg, **flags),
                                          num_warps=cfg[3], num_stages=cfg[4])
                out[(mode, layout, sr, cfg)] = k.metadata.shared
    return out


# ---------------------------------------------------------------------------------------------------
# The op
# ---------------------------------------------------------------------------------------------------


def reference(W: torch.Tensor, M: torch.Tensor, form: str = "multiplier") -> torch.Tensor:
    """The exact result in float64, out of place: (I + E) W with E = M (``form="delta"``) or M − I.
    Rounded once to W's dtype it is the correctly rounded update every backend aims at."""
    W64 = W.double()
    M64 = M.to(device=W.device, dtype=torch.float64)
    if form == "delta":
        return W64 + M64 @ W64
    return M64 @ W64


def multiplicative_update_triton(
    W: torch.Tensor,
    D: torch.Tensor,
    *,
    form: str = "multiplier",
    chunk_cols: int | None = None,
    stochastic_rounding: bool = False,
    seed: int | None = None,
) -> torch.Tensor:
    """Triton backend of ``multiplicative_update_``: W ← W + E·W (E = D, or D − I for the
    multiplier form) in place, one rounding; any strides of W (int64 offsets)."""
    check_update_args(W, D, form, seed)
    dev = W.device
    if dev.type != "cuda" and not interpreting():
        raise ZuFastError(
            f"multiplicative_update_ (triton): W on {dev.type}; the Triton kernel needs CUDA "
            "(or TRITON_INTERPRET=1 set before the kernel module is imported, for CPU tests)"
        )
    d, d_in = W.shape
    if W.numel() == 0:
        return W
    acc = torch.float64 if D.dtype == torch.float64 else torch.float32
    mode = _mode(W.dtype, acc)
    sr = bool(stochastic_rounding) and W.dtype != torch.float32
    if sr and seed is None:
        seed = edit_seed(D)
    stream = sr_stream_seed(int(seed or 0))
    stream = stream - (1 << 64) if stream >= 1 << 63 else stream  # the same 64 bits as an int64 argument
    M = D.to(device=dev, dtype=acc)
    if mode == "tc":
        if form == "multiplier":
            M = M.clone()
            M.diagonal().sub_(1.0)  # E = D − I (exact for a diagonal entry in [0.5, 2])
        a, a2 = bf16_split(M)  # [d, d] bf16 each
        del M
    else:
        a = M.contiguous()
        a2 = a
    flags = dict(mode=mode, sub_eye=form == "multiplier" and mode != "tc", dot_f32=dev.type != "cuda",
                 out=W.dtype, stochastic=sr)
    # a 16-bit W with an fp64 product: each chunk of W goes through an fp64 copy (see the module doc)
    upcast = mode == "f64" and W.dtype != torch.float32
    if chunk_cols is not None:
        chunk = int(chunk_cols)
    else:
        chunk = default_chunk_cols(d_in)
        if upcast:
            chunk = max(1, chunk * W.element_size() // 8)
    if chunk <= 0:
        raise ZuFastError(f"multiplicative_update_ (triton): chunk_cols must be positive, got {chunk_cols}")
    chunk = min(chunk, d_in)
    buf = _staging(W, d, chunk)
    w64 = torch.empty(d, chunk, device=dev, dtype=torch.float64) if upcast else None  # [d, chunk]
    chunks = []  # (W's column block [d, c] view, the block the kernel reads, its staging view, kernel arguments)
    for j0 in range(0, d_in, chunk):
        c = min(chunk, d_in - j0)
        Wc, out = W[:, j0 : j0 + c], buf[:, :c]
        src = w64[:, :c] if upcast else Wc
        chunks.append((Wc, src, out, _chunk_args(a, a2, d, src, out, j0, d_in, stream)))
    with torch.no_grad(), torch.cuda.device(dev) if dev.type == "cuda" else contextlib.nullcontext():
        Wc0, src0, _, args0 = chunks[0]
        if upcast:
            src0.copy_(Wc0)  # tuning reads it
        key = (dev.index, d, chunk, W.dtype, acc, Wc0.stride(0) == 1, tuple(sorted(flags.items(), key=str)))
        config = _choose_config(key, args0, d, Wc0.shape[1], flags, dev)
        if dev.type == "cuda":
            # Every kernel the chunks need is compiled and loaded before the first write into W: the
            # chunks' pointers may differ in alignment (another specialisation), and a compile or
            # resource error after a written chunk would leave W half updated (registry.call falls
            # back to torch only on an untouched W).
            for Wc, _, _, args in chunks:
                k = _update_kernel.warmup(*args, grid=_grid(config, d, Wc.shape[1]), **_constexprs(config, **flags),
                                          num_warps=config[3], num_stages=config[4])
                if hasattr(k, "_init_handles"):
                    k._init_handles()  # loads the module: raises OutOfResources here, not mid-way
        for Wc, src, out, args in chunks:
            if upcast:
                src.copy_(Wc)  # exact
            _launch(args, config, d, Wc.shape[1], flags)
            Wc.copy_(out)
    return W
