"""Tests of the CUDA C++ extension (csrc/) and its backend (zu_fast/ops/cuda_backend.py).

* Compile-only (runs in CI, CPU-only with nvcc): every .cu in csrc/ through nvcc for sm_90a and
  sm_80 with torch's nvcc flags, bindings.cpp through the host compiler with torch's and Python's
  headers (syntax only), and the ptxas report checked for register spills. Skipped only when nvcc
  is missing outside CI; with CI set, a missing nvcc fails.
* ``gpu`` tests (skipped without CUDA): both ops against float64 references at awkward and real
  shapes, strided and misaligned inputs, in-place behaviour, extra memory, stochastic rounding.
  Tests whose id contains ``small`` are the ones to run under compute-sanitizer.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest
import torch

from zu_fast import ops
from zu_fast.ops import cuda_backend
from zu_fast.ops.registry import get_op

CSRC = Path(__file__).resolve().parents[1] / "csrc"
HAS_CUDA = torch.cuda.is_available()
TOL = 1e-5  # relative error vs float64


# ============================================================================ compile-only (CI)
def _nvcc_or_skip() -> str:
    nvcc = cuda_backend.find_nvcc()
    if nvcc is None:
        if os.environ.get("CI"):
            pytest.fail("CI is set but nvcc was not found: the CUDA sources must be compile-checked in CI")
        pytest.skip("nvcc not found (set CUDA_HOME or put nvcc on PATH)")
    return nvcc


def _torch_include_args() -> list[str]:
    from torch.utils import cpp_extension

    try:
        paths = cpp_extension.include_paths(device_type="cuda")
    except TypeError:  # older torch: include_paths(cuda=True)
        paths = cpp_extension.include_paths(cuda=True)
    return [f"-I{p}" for p in paths]


def _compile_jobs(nvcc: str, tmp: Path) -> list[tuple[str, list[str]]]:
    from torch.utils import cpp_extension

    py_inc = f"-I{sysconfig.get_paths()['include']}"
    cuda_inc = [f"-I{d}" for d in cuda_backend.cuda_include_dirs(nvcc)]
    jobs = []
    for cu in sorted(CSRC.glob("*.cu")):
        cmd = [
            nvcc, "-c", str(cu), "-o", str(tmp / (cu.stem + ".o")),
            "-O3", "-std=c++17", "-Xptxas", "-v", "-Xcompiler", "-Wall",
            *cpp_extension.COMMON_NVCC_FLAGS,
            "-gencode=arch=compute_90a,code=sm_90a",
            "-gencode=arch=compute_80,code=sm_80",
            f"-I{CSRC}", *_torch_include_args(), py_inc,
        ]
        jobs.append((cu.name, cmd))
    # bindings.cpp: the host compiler, torch's and Python's headers, syntax only (its codegen is
    # trivial; what can go wrong is the torch / pybind11 API use).
    cxx = os.environ.get("CXX") or "c++"
    abi = int(getattr(torch._C, "_GLIBCXX_USE_CXX11_ABI", 1))
    jobs.append((
        "bindings.cpp",
        [cxx, "-std=c++20", "-fsyntax-only", "-Wall", "-DTORCH_EXTENSION_NAME=_C", "-DTORCH_API_INCLUDE_EXTENSION_H",
         f"-D_GLIBCXX_USE_CXX11_ABI={abi}", f"-I{CSRC}", *_torch_include_args(), *cuda_inc, py_inc,
         str(CSRC / "bindings.cpp")],
    ))
    return jobs


def test_cuda_sources_compile(tmp_path):
    nvcc = _nvcc_or_skip()
    assert cuda_backend.cuda_include_dirs(nvcc), f"CUDA headers not found for {nvcc}"
    jobs = _compile_jobs(nvcc, tmp_path)
    assert len(jobs) >= 3, "expected at least two .cu files and bindings.cpp in csrc/"
    t0 = time.perf_counter()
    procs = [(name, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
             for name, cmd in jobs]
    outputs = {}
    for name, p in procs:
        out, _ = p.communicate(timeout=600)
        outputs[name] = out
        assert p.returncode == 0, f"compiling {name} failed:\n{out[-6000:]}"
    elapsed = time.perf_counter() - t0
    report = []
    for name, out in outputs.items():
        warnings = [ln for ln in out.splitlines() if "warning" in ln.lower()]
        assert not warnings, f"{name} compiled with warnings:\n" + "\n".join(warnings)
        # ptxas -v: "Compiling entry function 'X' for 'sm_90a'" then "N bytes stack frame, S bytes spill
        # stores, L bytes spill loads" and "Used R registers".
        kernel, arch = None, None
        for ln in out.splitlines():
            m = re.search(r"Compiling entry function '(\S+)' for '(sm_\w+)'", ln)
            if m:
                kernel, arch = m.group(1), m.group(2)
            m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", ln)
            if m and kernel:
                report.append((name, arch, kernel, int(m.group(1)), int(m.group(2))))
    assert report, "no ptxas report parsed"
    spills = [r for r in report if r[3] or r[4]]
    assert not spills, f"register spills: {spills}"
    print(f"compiled {len(jobs)} files in {elapsed:.1f}s; {len(report)} kernel builds, no spills")


def test_sources_are_shipped_and_found():
    src = cuda_backend.source_dir()
    assert src is not None
    for f in cuda_backend.SOURCES + cuda_backend.HEADERS:
        assert (src / f).is_file()
    import tomllib

    meta = tomllib.loads((CSRC.parent / "pyproject.toml").read_text())
    st = meta["tool"]["setuptools"]
    assert st["package-dir"]["zu_fast.csrc"] == "csrc"
    assert "zu_fast.csrc" in st["packages"]
    assert "*.cu" in st["package-data"]["zu_fast.csrc"]


def test_backend_registered_and_build_status():
    for op in ("cov_accumulate", "multiplicative_update_"):
        b = get_op(op).backends["cuda"]
        assert b.device_types == ("cuda",)
        assert "cuda" not in get_op(op).preference.get("cuda", [])  # not preferred until measured
    status = cuda_backend.build_status()
    for key in ("prebuilt", "jit_able", "nvcc", "reason", "cuda_device", "loaded"):
        assert key in status
    if not HAS_CUDA:
        assert not get_op("cov_accumulate").backends["cuda"].is_available()
        assert "CUDA" in cuda_backend.why_unavailable()


def test_arch_flags():
    assert cuda_backend.arch_flags((9, 0)) == ["-gencode=arch=compute_90a,code=sm_90a"]
    assert cuda_backend.arch_flags((8, 0)) == ["-gencode=arch=compute_80,code=sm_80"]


def test_default_chunk_is_small():
    for d_in in (1, 7, 100, 1000, 4096, 11008, 28672):
        c = cuda_backend.default_chunk_cols(d_in)
        assert 1 <= c <= d_in
        assert c <= max(1, d_in // 16)


# ============================================================================ GPU tests
@pytest.fixture(scope="module")
def ext():
    if not HAS_CUDA:
        pytest.skip("needs a CUDA device")
    try:
        return cuda_backend.load_extension()
    except Exception as e:  # on a GPU machine the extension must build
        pytest.fail(f"CUDA extension unavailable on a GPU machine: {e}")


def cov_fn():
    return ops.backend_fn("cov_accumulate", "cuda")


def upd_fn():
    return ops.backend_fn("multiplicative_update_", "cuda")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-300))


def _cov_case(rows_shape, d_ff, d, dtype, masked, fused, seed=0, key_view=None):
    g = torch.Generator(device="cuda").manual_seed(seed)
    dev = "cuda"
    keys = torch.randn(*rows_shape, d_ff, device=dev, generator=g).to(dtype)
    if key_view == "slice":  # row stride != d_ff (and unaligned when d_ff is odd)
        wide = torch.randn(*rows_shape, d_ff + 3, device=dev, generator=g).to(dtype)
        keys = wide[..., 1 : d_ff + 1]  # 2-byte offset: not 16-byte aligned
    values = torch.randn(*rows_shape, d, device=dev, generator=g).to(dtype) if fused else None
    mask = None
    if masked:
        mask = torch.rand(*rows_shape, device=dev, generator=g) > 0.3
        mask.view(-1)[: max(1, mask.numel() // 5)] = False  # a hole at the start
    kk = torch.randn(d_ff, d_ff, device=dev, generator=g)  # non-zero start: += semantics
    ks = torch.randn(d_ff, device=dev, generator=g)
    n = torch.tensor(5, device=dev, dtype=torch.int64)
    vk = torch.randn(d, d_ff, device=dev, generator=g) if fused else None
    vs = torch.randn(d, device=dev, generator=g, dtype=torch.float64) if fused else None
    return keys, values, mask, kk, ks, n, vk, vs


def _cov_check(keys, values, mask, kk, ks, n, vk, vs):
    d_ff = keys.shape[-1]
    k64 = keys.reshape(-1, d_ff).double()
    v64 = values.reshape(-1, values.shape[-1]).double() if values is not None else None
    if mask is not None:
        keep = mask.reshape(-1).bool()
        k64 = k64[keep]
        v64 = v64[keep] if v64 is not None else None
    ref = (kk.double() + k64.T @ k64, ks.double() + k64.sum(0), int(n) + k64.shape[0])
    vref = (vk.double() + v64.T @ k64, vs.double() + v64.sum(0)) if v64 is not None else None
    cov_fn()(kk, ks, n, keys, mask, values=values, vk=vk, vs=vs)
    torch.cuda.synchronize()
    up = torch.triu(torch.ones_like(kk, dtype=torch.bool))
    assert rel(kk[up], ref[0][up]) <= TOL, rel(kk[up], ref[0][up])
    assert rel(ks, ref[1]) <= TOL
    assert int(n) == ref[2]
    if vref is not None:
        assert rel(vk, vref[0]) <= TOL
        assert rel(vs, vref[1]) <= TOL


COV_SHAPES = {  # id: (leading shape, d_ff, d)
    "small_1": ((1,), 1, 1),
    "small_odd": ((3, 13), 100, 50),
    "small_tiles": ((2, 150), 257, 129),
    "mid": ((4, 250), 384, 200),
}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("fused", [False, True], ids=["kk", "fused"])
@pytest.mark.parametrize("case", list(COV_SHAPES), ids=str)
@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_cov_vs_float64(ext, case, fused, masked, dtype):
    lead, d_ff, d = COV_SHAPES[case]
    _cov_check(*_cov_case(lead, d_ff, d, dtype, masked, fused))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("d_ff", [96, 101], ids=["small_aligned", "small_ragged"])
@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_cov_strided_misaligned_keys(ext, d_ff, dtype):
    _cov_check(*_cov_case((3, 70), d_ff, 40, dtype, True, True, key_view="slice"))


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_cov_all_masked_and_empty(ext):
    keys, values, mask, kk, ks, n, vk, vs = _cov_case((2, 9), 64, 8, torch.bfloat16, True, True)
    mask.zero_()
    kk0, ks0, vk0 = kk.clone(), ks.clone(), vk.clone()
    cov_fn()(kk, ks, n, keys, mask, values=values, vk=vk, vs=vs)
    assert torch.equal(kk, kk0) and torch.equal(ks, ks0) and torch.equal(vk, vk0) and int(n) == 5
    cov_fn()(kk, ks, n, keys[:0], None, values=values[:0], vk=vk, vs=vs)
    assert int(n) == 5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_cov_real_shape(ext, dtype):
    """d_ff 14336 (Llama-3-8B MLP), 8192 rows with padding, fused values d 4096."""
    keys, values, mask, kk, ks, n, vk, vs = _cov_case((4, 2048), 14336, 4096, dtype, True, True, seed=1)
    _cov_check(keys, values, mask, kk, ks, n, vk, vs)


# ---------------------------------------------------------------------------- multiplicative update
MANT = {torch.bfloat16: (7, -126), torch.float16: (10, -14), torch.float32: (23, -126)}


def _update_check(W, D, W_before, *, acc_tol=1e-5):
    """Every element within half an ulp of the float64 result (plus a small accumulation slack)."""
    ref = D.double() @ W_before.double()
    bits, emin = MANT[W.dtype]
    mag = ref.abs()
    e = torch.floor(torch.log2(mag.clamp_min(2.0**emin))).clamp_min(emin)
    ulp = torch.exp2(e - bits)
    slack = acc_tol * (D.double().abs() @ W_before.double().abs())
    err = (W.double() - ref).abs()
    bad = err > 0.5 * ulp + slack
    assert not bool(bad.any()), f"{int(bad.sum())} elements off by more than half an ulp; max err {err.max():.3e}"


def _make_W(d, d_in, dtype, layout, g):
    if layout == "row":
        base = torch.randn(d, d_in, device="cuda", generator=g).to(dtype)
        return base, base
    if layout == "col":  # transpose of a contiguous weight (GPT-2 Conv1D)
        base = torch.randn(d_in, d, device="cuda", generator=g).to(dtype)
        return base, base.t()
    if layout == "slice":  # columns 3.. of a wider matrix: unit column stride, unaligned rows
        base = torch.randn(d, d_in + 5, device="cuda", generator=g).to(dtype)
        return base, base[:, 3 : 3 + d_in]
    if layout == "colslice":  # rows 1.. of a transposed weight: unit row stride, unaligned
        base = torch.randn(d_in, d + 3, device="cuda", generator=g).to(dtype)
        return base, base[:, 1 : 1 + d].t()
    if layout == "general":  # no unit stride at all: falls back to the torch default
        base = torch.randn(2 * d, 2 * d_in, device="cuda", generator=g).to(dtype)
        return base, base[::2, ::2]
    raise AssertionError(layout)


UPD_SHAPES = {"small_1": (1, 1), "small_odd": (7, 5), "small_tiles": (129, 300), "mid": (256, 1000)}


@pytest.mark.parametrize("ddtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("layout", ["row", "col", "slice", "colslice", "general"])
@pytest.mark.parametrize("case", list(UPD_SHAPES), ids=str)
@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_update_vs_float64(ext, case, layout, dtype, ddtype):
    d, d_in = UPD_SHAPES[case]
    g = torch.Generator(device="cuda").manual_seed(3)
    base, W = _make_W(d, d_in, dtype, layout, g)
    D = (torch.eye(d, device="cuda") + 0.3 * torch.randn(d, d, device="cuda", generator=g) / d**0.5).to(ddtype)
    W_before = W.clone()
    base_before = base.clone()
    ptr = W.data_ptr()
    out = upd_fn()(W, D, chunk_cols=64 if d_in > 64 else None)
    torch.cuda.synchronize()
    assert out is W and W.data_ptr() == ptr
    _update_check(W, D, W_before)
    # nothing outside the view changed
    outside = torch.ones_like(base, dtype=torch.bool)
    if layout in ("row", "col"):
        outside.zero_()
    elif layout == "slice":
        outside[:, 3 : 3 + d_in] = False
    elif layout == "colslice":
        outside[:, 1 : 1 + d] = False
    else:
        outside[::2, ::2] = False
    assert torch.equal(base[outside], base_before[outside])


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_update_kernel_choice(ext):
    W = torch.zeros(16, 32, device="cuda", dtype=torch.bfloat16)
    D = torch.eye(16, device="cuda")
    assert ext.update_kernel(W, D).startswith("update_delta_bf16_tc")
    assert ext.update_kernel(W.float(), D) == "update_simt<fp32>"
    assert ext.update_kernel(W, D.double()) == "update_simt<fp64>"


@pytest.mark.parametrize("layout", ["row", "col"])
@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_update_real_shape_and_memory(ext, layout):
    """70B down_proj shape: d 8192, d_in 28672, bf16; extra memory stays under 10% of W."""
    d, d_in = 8192, 28672
    g = torch.Generator(device="cuda").manual_seed(4)
    _, W = _make_W(d, d_in, torch.bfloat16, layout, g)
    D = torch.eye(d, device="cuda") + 1e-3 * torch.randn(d, d, device="cuda", generator=g)
    cols = slice(0, 4096)  # reference on a column slice (float64 of the whole W is 1.9 GB; fine, but slow)
    W_before = W[:, cols].clone()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    upd_fn()(W, D)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    w_bytes = W.numel() * W.element_size()
    assert extra <= 0.10 * w_bytes, f"extra memory {extra / 2**20:.0f} MiB > 10% of W ({w_bytes / 2**20:.0f} MiB)"
    _update_check(W[:, cols], D, W_before)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_stochastic_rounding_small_unbiased_bf16(ext):
    """A relative edit of 1/8 ulp: nearest rounding loses it entirely, stochastic keeps it on average."""
    d, d_in = 64, 1 << 14
    W0 = torch.ones(d, d_in, device="cuda", dtype=torch.bfloat16)
    delta = 2.0**-10  # ulp of bf16 at 1.0 is 2^-7
    D = torch.eye(d, device="cuda") * (1 + delta)
    target = 1 + delta
    W_rn = W0.clone()
    upd_fn()(W_rn, D)
    assert torch.equal(W_rn, W0)  # round to nearest: the edit vanishes
    W_sr = W0.clone()
    upd_fn()(W_sr, D, stochastic_rounding=True, seed=123)
    vals = W_sr.double()
    assert set(torch.unique(vals).tolist()) <= {1.0, 1.0 + 2.0**-7}
    p = delta / 2.0**-7
    sigma = 2.0**-7 * (p * (1 - p) / vals.numel()) ** 0.5
    assert abs(float(vals.mean()) - target) < 6 * sigma
    # deterministic for a seed, independent of the chunking; another seed differs
    W_again = W0.clone()
    upd_fn()(W_again, D, stochastic_rounding=True, seed=123, chunk_cols=1000)
    assert torch.equal(W_again, W_sr)
    W_other = W0.clone()
    upd_fn()(W_other, D, stochastic_rounding=True, seed=124)
    assert not torch.equal(W_other, W_sr)


@pytest.mark.parametrize("ddtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_stochastic_rounding_small_unbiased_fp16(ext, ddtype):
    d, d_in = 32, 1 << 14
    W0 = torch.full((d, d_in), 1.5, device="cuda", dtype=torch.float16)
    ulp = 2.0**-10  # fp16 at 1.5
    frac = 0.3
    D = (torch.eye(d, device="cuda", dtype=torch.float64) * (1 + frac * ulp / 1.5)).to(ddtype)
    W_sr = W0.clone()
    upd_fn()(W_sr, D, stochastic_rounding=True, seed=7)
    vals = W_sr.double()
    assert set(torch.unique(vals).tolist()) <= {1.5, 1.5 + ulp}
    sigma = ulp * (frac * (1 - frac) / vals.numel()) ** 0.5
    assert abs(float(vals.mean()) - (1.5 + frac * ulp)) < 6 * sigma


def survival(W0: torch.Tensor, W1: torch.Tensor, exact: torch.Tensor) -> float:
    """Fraction of the exact edit ΔW found in the rounded result: <W1 - W0, ΔW> / ‖ΔW‖²."""
    got = W1.double() - W0.double()
    return float((got * exact).sum() / (exact * exact).sum())


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_edit_survives_with_stochastic_rounding(ext):
    """D = I + a small rank-4 edit on a bf16 W: how much of ‖ΔW‖ survives rounding."""
    d, d_in = 1024, 4096
    g = torch.Generator(device="cuda").manual_seed(5)
    W0 = (0.02 * torch.randn(d, d_in, device="cuda", generator=g)).to(torch.bfloat16)
    U = torch.randn(d, 4, device="cuda", generator=g, dtype=torch.float64)
    V = torch.randn(d, 4, device="cuda", generator=g, dtype=torch.float64)
    E = U @ V.T
    # scale the edit so that |ΔW| is about 5% of a bf16 ulp of W: below half an ulp everywhere, so
    # nearest rounding gives W back unchanged, while stochastic rounding keeps it on average
    E *= 0.05 * 2.0**-7 * float(W0.double().abs().mean()) / float((E @ W0.double()).abs().mean())
    D = torch.eye(d, device="cuda", dtype=torch.float64) + E
    exact = E @ W0.double()
    W_rn, W_sr = W0.clone(), W0.clone()
    upd_fn()(W_rn, D.float())
    upd_fn()(W_sr, D.float(), stochastic_rounding=True, seed=9)
    s_rn, s_sr = survival(W0, W_rn, exact), survival(W0, W_sr, exact)
    print(f"fraction of the edit kept: nearest {s_rn:.3f}, stochastic {s_sr:.3f}")
    assert 0.95 < s_sr < 1.05
    assert s_rn < 0.5


@pytest.mark.parametrize("edtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("layout", ["row", "col", "slice", "colslice", "general"])
@pytest.mark.parametrize("case", list(UPD_SHAPES), ids=str)
@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_update_delta_vs_float64(ext, case, layout, dtype, edtype):
    """form="delta" (E = D − I, what an edit stores): W + E W within half an ulp (+ slack) of float64."""
    d, d_in = UPD_SHAPES[case]
    g = torch.Generator(device="cuda").manual_seed(13)
    _, W = _make_W(d, d_in, dtype, layout, g)
    E = (0.01 * torch.eye(d, device="cuda") + 0.3 * torch.randn(d, d, device="cuda", generator=g) / d**0.5).to(edtype)
    W_before = W.clone()
    upd_fn()(W, E, form="delta", chunk_cols=64 if d_in > 64 else None)
    torch.cuda.synchronize()
    _update_check(W, torch.eye(d, device="cuda", dtype=torch.float64) + E.double(), W_before)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_update_delta_real_edit_rounds_correctly(ext):
    """d 4096: a real-edit-like E (1% scaling + rank 64): ≥ 99.9% of the bf16 outputs are the
    correctly rounded exact result (the previous D·W kernel: ~1% wrong, tests/test_tc_numerics.py)."""
    d, d_in = 4096, 2048
    g = torch.Generator(device="cuda").manual_seed(21)
    W = (0.02 * torch.randn(d, d_in, device="cuda", generator=g)).to(torch.bfloat16)
    U = torch.randn(d, 64, device="cuda", generator=g, dtype=torch.float64) / d**0.5
    V = torch.randn(d, 64, device="cuda", generator=g, dtype=torch.float64) * (0.3 / 8)
    E64 = 0.01 * torch.eye(d, device="cuda", dtype=torch.float64) + U @ V.T
    exact = (W.double() + E64 @ W.double()).to(torch.bfloat16)
    D32 = (torch.eye(d, device="cuda", dtype=torch.float64) + E64).float()
    for form, M in (("delta", E64.float()), ("multiplier", D32)):
        W1 = W.clone()
        upd_fn()(W1, M, form=form)
        wrong = float((W1 != exact).double().mean())
        print(f"{form}: {wrong:.2e} of outputs differ from the correctly rounded result")
        assert wrong < (1e-3 if form == "delta" else 1e-2)  # fp32 D itself carries 2^-24 |D| of error


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_update_delta_real_shape_and_memory(ext):
    """70B down_proj shape in the delta form: extra memory ≤ 10% of W, results vs float64."""
    d, d_in = 8192, 28672
    g = torch.Generator(device="cuda").manual_seed(4)
    _, W = _make_W(d, d_in, torch.bfloat16, "row", g)
    E = 0.01 * torch.eye(d, device="cuda") + 1e-3 * torch.randn(d, d, device="cuda", generator=g)
    cols = slice(0, 2048)
    W_before = W[:, cols].clone()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    upd_fn()(W, E, form="delta")
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    assert extra <= 0.10 * W.numel() * W.element_size()
    _update_check(W[:, cols], torch.eye(d, device="cuda", dtype=torch.float64) + E.double(), W_before)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_stochastic_rounding_same_hash_as_torch(ext, dtype):
    """With an exactly representable update (E = c·I, c with few bits, so W + E W is exact in fp32 in
    both backends) stochastic rounding draws the same bits in the CUDA kernel and the torch default."""
    d, d_in = 96, 1000
    g = torch.Generator(device="cuda").manual_seed(8)
    W0 = torch.randn(d, d_in, device="cuda", generator=g).to(dtype)
    E = torch.eye(d, device="cuda") * (2.0**-12 + 2.0**-15)
    a, b = W0.clone(), W0.clone()
    upd_fn()(a, E, form="delta", stochastic_rounding=True, seed=77)
    ops.backend_fn("multiplicative_update_", "torch")(b, E, form="delta", stochastic_rounding=True, seed=77)
    assert torch.equal(a, b)
    assert not torch.equal(a, (W0.float() * (1 + 2.0**-12 + 2.0**-15)).to(dtype))  # really stochastic
    rng = torch.cuda.get_rng_state()
    c = W0.clone()
    upd_fn()(c, E, form="delta", stochastic_rounding=True)  # seed derived from E
    assert torch.equal(torch.cuda.get_rng_state(), rng)
    assert torch.equal(c, ops.backend_fn("multiplicative_update_", "torch")(
        W0.clone(), E, form="delta", stochastic_rounding=True, seed=ops.edit_seed(E)))


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_cov_column_sums_are_deterministic(ext):
    """No floating-point atomics: the same batch gives bit-identical ks / vs / kk every run."""
    keys, values, mask, kk, ks, n, vk, vs = _cov_case((4, 3000), 300, 100, torch.bfloat16, True, True, seed=3)
    outs = []
    for _ in range(3):
        acc = [kk.clone(), ks.clone(), n.clone(), vk.clone(), vs.clone()]
        cov_fn()(acc[0], acc[1], acc[2], keys, mask, values=values, vk=acc[3], vs=acc[4])
        outs.append(acc)
    for a in outs[1:]:
        assert all(torch.equal(x, y) for x, y in zip(a, outs[0]))


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_cov_small_no_key_columns(ext):
    """F == 0: nothing to multiply, but n (and vs, with values) must still be accumulated."""
    keys = torch.randn(2, 9, 0, device="cuda", dtype=torch.bfloat16)
    values = torch.randn(2, 9, 6, device="cuda", dtype=torch.bfloat16)
    mask = torch.rand(2, 9, device="cuda") > 0.4
    kk = torch.zeros(0, 0, device="cuda")
    ks = torch.zeros(0, device="cuda")
    n = torch.tensor(2, device="cuda")
    cov_fn()(kk, ks, n, keys, mask)
    assert int(n) == 2 + int(mask.sum())
    vk = torch.zeros(6, 0, device="cuda")
    vs = torch.zeros(6, device="cuda", dtype=torch.float64)
    cov_fn()(kk, ks, n, keys, None, values=values, vk=vk, vs=vs)
    assert int(n) == 2 + int(mask.sum()) + 18
    assert rel(vs, values.reshape(-1, 6).double().sum(0)) <= TOL


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_forced_backend_dispatch(ext):
    """ZU_FAST_BACKEND=cuda reaches the extension through the public ops."""
    d_ff = 48
    keys = torch.randn(2, 5, d_ff, device="cuda", dtype=torch.bfloat16)
    kk = torch.zeros(d_ff, d_ff, device="cuda")
    ks = torch.zeros(d_ff, device="cuda")
    n = torch.zeros((), device="cuda", dtype=torch.int64)
    with ops.use_backend("cuda"):
        assert ops.choose("cov_accumulate", "cuda").name == "cuda"
        ops.cov_accumulate(kk, ks, n, keys)
        W = torch.randn(8, 16, device="cuda", dtype=torch.bfloat16)
        ops.multiplicative_update_(W, torch.eye(8, device="cuda"))
    assert int(n) == 10


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-v", "-s"]))
