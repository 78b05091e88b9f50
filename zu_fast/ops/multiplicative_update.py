"""``multiplicative_update_``: W ← D W in place, plain-PyTorch default.

Contract (every backend): W [d, d_in] in bf16/fp16/fp32 (may be a non-contiguous view, e.g. the
transpose of a GPT-2 Conv1D weight) and one [d, d] matrix M in float32 or float64, given in one of
two forms:

* ``form="multiplier"`` (default): M = D, the multiplier itself;
* ``form="delta"``: M = E = D − I, what a saved edit stores. This is the form the fast paths
  want: tensor cores accumulate with truncation, and W + E·W puts that error on E·W (the edit,
  small) instead of on D·W (the whole weight). bf16 W with a float32 E runs on tensor cores (E
  split into two bf16 terms); a float64 E, or a float64 D, runs in float64.

The product is accumulated in M's precision (at least fp32) and rounded to W's dtype once. W is
streamed in column chunks, so the extra memory is O(d · chunk), never a full-size fp32/fp64 copy
of W (the delta form's bf16 split of E on CUDA is d×d: two bf16 copies of E).

Rounding is to nearest. Stochastic rounding (bf16/fp16 W, ``stochastic_rounding=True``) rounds
each result up or down with probability given by its distance to the two neighbours, so an edit
smaller than half an ulp survives on average. Its random bits come from a stateless hash of
(seed, element index) — the same hash in every backend (``sr_random_bits``; csrc/common.cuh;
kernels/multiplicative_update.py) — with the seed given, or derived from the bytes of M
(``edit_seed``): the same edit rounds the same way on every call, and no random generator (global
or other) is touched.
"""

from __future__ import annotations

import hashlib
import importlib

import torch

from ..errors import ZuFastError

# the module, looked up at call time (tests route its cuBLAS calls through the tensor-core model)
_cov = importlib.import_module(".cov_accumulate", __package__)

DEFAULT_CHUNK_BYTES = 64 * 2**20  # temporaries per chunk: M-precision copy of the column block
FORMS = ("multiplier", "delta")

_MASK64 = (1 << 64) - 1


def check_update_args(W: torch.Tensor, D: torch.Tensor, form: str = "multiplier", seed: int | None = None) -> None:
    """Shape/dtype/form validation shared by every backend (a seed, when given, is in [0, 2^63))."""
    if seed is not None and not 0 <= int(seed) < 2**63:
        raise ZuFastError(f"multiplicative_update_: seed must be in [0, 2**63), got {seed}")
    if form not in FORMS:
        raise ZuFastError(f"multiplicative_update_: form must be one of {FORMS}, got {form!r}")
    if W.dim() != 2 or D.dim() != 2 or D.shape[0] != D.shape[1] or D.shape[1] != W.shape[0]:
        raise ZuFastError(f"multiplicative_update_: need W [d, d_in] and D [d, d], got {tuple(W.shape)}, "
                          f"{tuple(D.shape)}")
    if W.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ZuFastError(f"multiplicative_update_: W must be fp32/fp16/bf16, got {W.dtype}")
    if D.dtype not in (torch.float32, torch.float64):
        raise ZuFastError(f"multiplicative_update_: D must be float32 or float64, got {D.dtype}")


# ---------------------------------------------------------------------------------- random bits
def _u64(x: int) -> int:
    """Python int in [0, 2^64) as the int64 tensor value with the same bits."""
    return x - (1 << 64) if x >= 1 << 63 else x


def _srl(z: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 bit patterns (torch's >> is arithmetic)."""
    return (z >> s) & ((1 << (64 - s)) - 1)


def _mix64(z: torch.Tensor) -> torch.Tensor:
    """splitmix64's finaliser on int64 tensors (multiplications wrap mod 2^64, as in C)."""
    z = (z ^ _srl(z, 30)) * _u64(0xBF58476D1CE4E5B9)
    z = (z ^ _srl(z, 27)) * _u64(0x94D049BB133111EB)
    return z ^ _srl(z, 31)


def mix64_int(z: int) -> int:
    """The same finaliser on a Python int (the reference the tensor version is tested against)."""
    z &= _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def sr_stream_seed(seed: int) -> int:
    """The stream seed of a user seed (csrc/common.cuh: sr_stream_seed)."""
    return mix64_int((seed & _MASK64) ^ 0x5A17F00D)


def sr_random_bits(seed: int, index: torch.Tensor) -> torch.Tensor:
    """32 random bits (int64 in [0, 2^32)) for each element ``index`` (int64) of stream ``seed``.

    Bit for bit the CUDA kernels' ``random_u32(sr_stream_seed(seed), index)``.
    """
    s = torch.tensor(_u64(sr_stream_seed(seed)), dtype=torch.int64, device=index.device)
    z = s + (index + 1) * _u64(0x9E3779B97F4A7C15)
    return _srl(_mix64(z), 32)


def edit_seed(M: torch.Tensor) -> int:
    """A 63-bit seed derived from the bytes (and shape, dtype) of an edit matrix: the same edit,
    saved and loaded, gives the same seed; different edits give unrelated ones."""
    h = hashlib.blake2b(digest_size=8)
    h.update(f"{tuple(M.shape)}|{M.dtype}".encode())
    h.update(M.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes())
    return int.from_bytes(h.digest(), "little") >> 1


def stochastic_round(
    x: torch.Tensor, dtype: torch.dtype, seed: int, index: torch.Tensor | None = None,
) -> torch.Tensor:
    """Round fp32 ``x`` to bf16 or fp16 stochastically (unbiased: E[round(x)] = x).

    The random bits of element t are ``sr_random_bits(seed, index[t])`` (``index`` defaults to
    the flat position in ``x``), so the result is the CUDA kernels' for the same value and index.
    """
    x = x.float()
    if index is None:
        index = torch.arange(x.numel(), device=x.device, dtype=torch.int64).reshape(x.shape)
    rnd = sr_random_bits(seed, index)
    if dtype == torch.bfloat16:
        bits = x.contiguous().view(torch.int32)
        # adding 16 random bits below the kept 16 bits, then truncating = round the magnitude up
        # with probability equal to the dropped fraction
        rounded = ((bits + (rnd & 0xFFFF).to(torch.int32)) & ~0xFFFF).view(torch.float32)
        ok = torch.isfinite(rounded) & torch.isfinite(x)  # overflow, NaN/Inf: round to nearest
        return torch.where(ok, rounded, x).to(torch.bfloat16)
    if dtype == torch.float16:
        a = x.abs()
        near = x.to(torch.float16)
        lo = a.to(torch.float16)  # round |x| toward zero: nearest, one step down if it went up
        lo = torch.where(lo.float() > a, torch.nextafter(lo, torch.zeros_like(lo)), lo)
        lof = lo.float()
        hi = torch.nextafter(lo, torch.full_like(lo, float("inf")))
        gap = hi.float() - lof
        p = torch.where(lof != a, (a - lof) / gap, torch.zeros_like(a))
        u = (rnd >> 8).to(torch.float32) * (1.0 / 16777216.0)  # uniform in [0, 1)
        mag = torch.where(u < p, hi, lo)
        out = torch.where(torch.signbit(x), -mag, mag)
        return torch.where(torch.isfinite(x) & (a < 65504.0), out, near)
    return x.to(dtype)


# ---------------------------------------------------------------------------------- the default
def _bf16_split(E: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """E ≈ hi + lo, both bf16 (the remainder formed exactly in fp32): 16 of E's 24 bits."""
    E32 = E.float()
    hi = E32.to(torch.bfloat16)
    return hi, (E32 - hi.float()).to(torch.bfloat16)


def _tc_delta_mode(W: torch.Tensor, M: torch.Tensor) -> str:
    """For bf16 W and fp32 E on CUDA, how torch gives fp32 products of bf16 inputs ("addmm" or
    "mm", see cov_accumulate._mm_out_dtype_mode); "" elsewhere (no tensor-core path)."""
    if W.dtype != torch.bfloat16 or M.dtype != torch.float32:
        return ""
    return _cov._mm_out_dtype_mode(W.device.type, torch.bfloat16)


def multiplicative_update_torch(
    W: torch.Tensor,
    D: torch.Tensor,
    *,
    form: str = "multiplier",
    chunk_cols: int | None = None,
    stochastic_rounding: bool = False,
    seed: int | None = None,
) -> torch.Tensor:
    """W ← D W (``form="delta"``: W ← W + D W, D being E = D − I) in place, column chunk by chunk,
    one rounding (plain PyTorch, any device).

    The delta form with bf16 W and fp32 E on CUDA multiplies on tensor cores: E split into two
    bf16 terms, two cuBLAS products with fp32 output, W added in fp32; the truncation of the
    tensor cores then only touches E·W. Everything else accumulates in M's precision.
    """
    check_update_args(W, D, form, seed)
    d, d_in = W.shape
    acc = torch.float64 if D.dtype == torch.float64 else torch.float32
    sr = stochastic_rounding and W.dtype != torch.float32
    if sr and seed is None:
        seed = edit_seed(D)
    M = D.to(device=W.device, dtype=acc)
    tc = _tc_delta_mode(W, M) if form == "delta" else ""
    if tc:
        E_hi, E_lo = _bf16_split(M)  # [d, d] bf16 each
    if chunk_cols is None:
        chunk_cols = max(1, DEFAULT_CHUNK_BYTES // (max(d, 1) * torch.finfo(acc).bits // 8))
    rows = torch.arange(d, device=W.device, dtype=torch.int64)[:, None] * d_in if sr else None
    with torch.no_grad():
        for j in range(0, d_in, chunk_cols):
            block = W[:, j : j + chunk_cols]  # [d, c] view into W
            if tc:
                out = _cov._mm_fp32(E_lo, block)  # [d, c]: the small term first, then E_hi·W added
                _cov._addmm_fp32_(out, E_hi, block, tc)  # in the GEMM's epilogue (round to nearest)
                out += block.float()
            elif form == "delta":
                out = block.to(acc)
                out += M @ out  # [d, c]: W + E W, in M's precision
            else:
                out = M @ block.to(acc)  # [d, c] in D's precision: the one place the product lives
            if sr:
                cols = torch.arange(j, j + block.shape[1], device=W.device, dtype=torch.int64)
                block.copy_(stochastic_round(out, W.dtype, seed, rows + cols[None, :]))
            else:
                block.copy_(out)
    return W
