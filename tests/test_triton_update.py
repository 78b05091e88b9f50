"""The Triton ``multiplicative_update_`` kernel (kernels/multiplicative_update.py).

On CPU the kernel runs under ``TRITON_INTERPRET=1`` (conftest.py) against float64 on awkward shapes,
dtypes, forms and layouts; its rounding bit for bit against the torch rounding model
(``stochastic_round``) on the same seed and index; compiled for sm_90 and sm_100 in a subprocess
(Triton's own ptxas, no GPU). ``gpu`` tests run it compiled at real shapes. The tensor-core model
of its accumulation (bit for bit under the interpreter) is in test_tc_numerics.py.
"""

from __future__ import annotations

import os

import pytest
import torch

from zu_fast import ops
from zu_fast.errors import ZuFastError
from zu_fast.ops import registry
from zu_fast.ops.multiplicative_update import multiplicative_update_torch, stochastic_round

HAS_CUDA = torch.cuda.is_available()
DEV = "cuda" if HAS_CUDA else "cpu"

try:
    import triton  # noqa: F401

    HAS_TRITON = True
except Exception:  # pragma: no cover - depends on the install
    HAS_TRITON = False

TRITON_RUNS = HAS_TRITON and (HAS_CUDA or os.environ.get("TRITON_INTERPRET") == "1")
needs_triton = pytest.mark.skipif(not TRITON_RUNS, reason="needs triton (CUDA or TRITON_INTERPRET=1)")


@pytest.fixture(autouse=True)
def _no_autotune_for_small_cases(request, monkeypatch):
    """On a GPU the awkward small cases run the first candidate (one compile each, no benchmark)."""
    if HAS_CUDA and "gpu" not in request.keywords:
        monkeypatch.setenv("ZU_FAST_UPDATE_AUTOTUNE", "0")


def triton_fn():
    return ops.backend_fn("multiplicative_update_", "triton")


def exact_update(W: torch.Tensor, M: torch.Tensor, form: str) -> torch.Tensor:
    from zu_fast.kernels.multiplicative_update import reference

    return reference(W, M, form)


def w_ulp(exact: torch.Tensor, W_before: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """One ulp of ``dtype`` at max(|exact|, |W before|): an output that nearly cancels has a tiny ulp
    of its own that an fp32 sum of O(|W|) terms cannot resolve (as in update_table.accuracy)."""
    mant = {torch.bfloat16: 7, torch.float16: 10, torch.float32: 23}[dtype]
    mag = torch.maximum(exact.abs(), W_before.double().abs()).clamp_min(torch.finfo(dtype).tiny)
    return torch.exp2(torch.floor(torch.log2(mag)) - mant)


def check_update(W_after, W_before, M, form):
    """fp32 W with fp32 M: fp32-accumulation error (as the torch default's test); otherwise within
    one ulp of the exact result and nearly always its correctly rounded value."""
    exact = exact_update(W_before, M, form)
    dtype = W_after.dtype
    if dtype == torch.float32 and M.dtype == torch.float32:
        scale = float(W_before.double().abs().max().clamp_min(1.0))
        assert torch.allclose(W_after.double(), exact, rtol=1e-5, atol=1e-5 * scale)
        return
    err = (W_after.double() - exact).abs() / w_ulp(exact, W_before, dtype)
    assert float(err.max()) <= 1.0, float(err.max())
    wrong = float((W_after != exact.to(dtype)).double().mean())
    assert wrong < (2e-3 if M.dtype == torch.float64 else 1e-2), wrong


SHAPES = {  # id: (d, d_in, chunk_cols)
    "1x1": (1, 1, None),
    "7x13_chunk5": (7, 13, 5),  # ragged chunks, everything smaller than one tile
    "33x70": (33, 70, None),
    "130x300_chunk64": (130, 300, 64),  # past one hand-off (128 rows) and one 64-row tile
}
DTYPES = [torch.bfloat16, torch.float16, torch.float32]


def _float64_cases():
    """(shape, W dtype, M dtype, form). Interpreted: the full grid. Compiled (a GPU), each case is
    its own specialisation, one compile (~2 s): every shape for the path real edits take (bf16 W,
    fp32 E, delta), every dtype/form combination at the largest shape."""
    out = []
    for shape in SHAPES:
        for dt in DTYPES:
            for md in (torch.float32, torch.float64):
                for form in ("delta", "multiplier"):
                    real_path = dt == torch.bfloat16 and md == torch.float32 and form == "delta"
                    if HAS_CUDA and not (real_path or shape == "130x300_chunk64"):
                        continue
                    out.append(pytest.param(shape, dt, md, form, id=f"{shape}-{dt}-{md}-{form}"))
    return out


# --------------------------------------------------------------------------------------------------
# Registration
# --------------------------------------------------------------------------------------------------


def test_triton_registered_not_preferred():
    op = registry.get_op("multiplicative_update_")
    b = op.backends["triton"]
    assert b.device_types == ("cuda",)
    assert "triton" not in op.preference.get("cuda", [])  # preferred only by measurement (preferences.py)
    assert b.is_available() == (HAS_TRITON and HAS_CUDA)
    assert ops.choose("multiplicative_update_", "cpu").name == "torch"


# --------------------------------------------------------------------------------------------------
# Against float64 (interpreted on CPU)
# --------------------------------------------------------------------------------------------------


@needs_triton
@pytest.mark.parametrize("shape,dtype,m_dtype,form", _float64_cases())
def test_matches_float64(shape, dtype, m_dtype, form):
    d, d_in, chunk = SHAPES[shape]
    g = torch.Generator().manual_seed(d + d_in)
    W = torch.randn(d, d_in, generator=g).to(dtype).to(DEV)
    E = 0.01 * torch.eye(d, dtype=torch.float64) + 0.05 * torch.randn(d, d, generator=g, dtype=torch.float64)
    M = (E if form == "delta" else torch.eye(d, dtype=torch.float64) + E).to(m_dtype).to(DEV)
    W_before = W.clone()
    ptr = W.data_ptr()
    out = triton_fn()(W, M, form=form, chunk_cols=chunk)
    assert out is W and W.data_ptr() == ptr  # in place
    check_update(W, W_before, M, form)


@needs_triton
@pytest.mark.parametrize("layout", ["col", "slice", "general"])
@pytest.mark.parametrize("dtype", [torch.bfloat16] + ([] if HAS_CUDA else [torch.float16]), ids=str)
def test_layouts_update_only_the_view(layout, dtype):
    """W as a view: column-major (a transposed weight), a slice with another row stride at an odd
    offset, and a view with no unit stride. The view is updated; the rest of its storage is not."""
    g = torch.Generator().manual_seed(7)
    d, d_in = 40, 66
    if layout == "col":
        base = torch.randn(d_in, d, generator=g).to(dtype).to(DEV)
        W = base.t()
    elif layout == "slice":
        base = torch.randn(d, d_in + 5, generator=g).to(dtype).to(DEV)
        W = base[:, 3 : 3 + d_in]
    else:
        base = torch.randn(2 * d, 3 * d_in, generator=g).to(dtype).to(DEV)
        W = base[::2, ::3]
    before = base.clone()
    W_before = W.clone()
    E = (0.02 * torch.randn(d, d, generator=g)).to(DEV)
    triton_fn()(W, E, form="delta", chunk_cols=32)
    check_update(W, W_before, E, "delta")
    touched = torch.zeros_like(base, dtype=torch.bool)
    if layout == "col":
        touched[:] = True
    elif layout == "slice":
        touched[:, 3 : 3 + d_in] = True
    else:
        touched[::2, ::3] = True
    assert torch.equal(base[~touched], before[~touched])


@needs_triton
def test_column_offsets_past_int32(monkeypatch):
    """Column-major W whose column offset col × stride passes 2^31 elements (a 70B down_proj seen
    transposed): the kernel addresses it with int64. The 4 GiB storage is virtual: only the three
    columns used are ever written."""
    if HAS_CUDA:
        pytest.skip("CPU (interpreter) variant; the GPU runs real shapes")
    d, stride = 40, 2**30 + 64  # column 2 starts at element 2^31 + 128
    try:
        storage = torch.empty(2 * stride + d, dtype=torch.bfloat16)
    except RuntimeError:
        pytest.skip("cannot reserve 4 GiB of address space here")
    W = torch.as_strided(storage, (d, 3), (1, stride))
    g = torch.Generator().manual_seed(9)
    vals = torch.randn(d, 3, generator=g).to(torch.bfloat16)
    for c in range(3):
        W[:, c] = vals[:, c]
    E = 0.05 * torch.randn(d, d, generator=g)
    triton_fn()(W, E, form="delta")
    got = torch.stack([W[:, c] for c in range(3)], 1)
    check_update(got, vals, E, "delta")


@needs_triton
def test_empty_and_bad_arguments():
    W = torch.zeros(0, 5, device=DEV, dtype=torch.bfloat16)
    assert triton_fn()(W, torch.zeros(0, 0, device=DEV), form="delta") is W
    W = torch.ones(3, 0, device=DEV, dtype=torch.bfloat16)
    triton_fn()(W, torch.eye(3, device=DEV))
    with pytest.raises(ZuFastError, match="need W"):
        triton_fn()(torch.zeros(3, 4, device=DEV), torch.zeros(4, 4, device=DEV))
    with pytest.raises(ZuFastError, match="float32 or float64"):
        triton_fn()(torch.zeros(3, 4, device=DEV), torch.zeros(3, 3, device=DEV, dtype=torch.float16))
    with pytest.raises(ZuFastError, match="chunk_cols"):
        triton_fn()(torch.zeros(3, 4, device=DEV), torch.eye(3, device=DEV), chunk_cols=0)


@needs_triton
def test_cpu_without_interpreter_is_refused(monkeypatch):
    if HAS_CUDA:
        pytest.skip("only meaningful without a GPU")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ZuFastError, match="needs CUDA"):
        triton_fn()(torch.zeros(3, 4), torch.eye(3))


def test_default_chunk_bounds_the_staging_buffer():
    from zu_fast.kernels.multiplicative_update import STAGING_MAX_COLS, default_chunk_cols

    for d_in in (1, 7, 100, 513, 4096, 11008, 28672):
        c = default_chunk_cols(d_in)
        assert 1 <= c <= d_in
        assert c <= max(d_in // 16, STAGING_MAX_COLS)
    assert default_chunk_cols(28672) == 1792  # 1/16 of a 70B down_proj, a multiple of 128


def test_bf16_split_is_the_torch_defaults():
    """The kernel's E_hi + E_lo split (row blocks, to bound its temporaries) is bit for bit the torch
    default's (and the CUDA kernel's split2): hi the nearest bf16 of E, lo that of the exact remainder."""
    from zu_fast.kernels.multiplicative_update import bf16_split

    from zu_fast.ops.multiplicative_update import _bf16_split

    E = torch.randn(3000, 3000, generator=torch.Generator().manual_seed(4)) * 1e-2  # 3 row blocks
    hi, lo = bf16_split(E)
    want_hi, want_lo = _bf16_split(E)
    assert torch.equal(hi, want_hi) and torch.equal(lo, want_lo)
    assert hi.is_contiguous() and lo.is_contiguous()


# --------------------------------------------------------------------------------------------------
# Rounding: bit for bit the torch rounding model (and so the CUDA kernels', which share the hash)
# --------------------------------------------------------------------------------------------------


def _rounding_kernel():
    import triton
    import triton.language as tl
    from zu_fast.kernels import multiplicative_update as umod

    # a jit function resolves names in its module's globals: make the helpers globals here
    globals().update(random_u32=umod.random_u32, bf16_bits_nearest=umod.bf16_bits_nearest,
                     bf16_bits_stochastic=umod.bf16_bits_stochastic, f16_bits_stochastic=umod.f16_bits_stochastic)

    @triton.jit
    def round_kernel(x_ptr, idx_ptr, out_ptr, seed, N, KIND: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        m = offs < N
        x = tl.load(x_ptr + offs, mask=m, other=0.0)
        idx = tl.load(idx_ptr + offs, mask=m, other=0)
        rnd = random_u32(tl.cast(seed, tl.int64).to(tl.uint64, bitcast=True), idx)  # noqa: F821
        if KIND == 0:
            b = bf16_bits_nearest(x)  # noqa: F821
        elif KIND == 1:
            b = bf16_bits_stochastic(x, rnd)  # noqa: F821
        else:
            b = f16_bits_stochastic(x, rnd)  # noqa: F821
        tl.store(out_ptr + offs, b.to(tl.int32), mask=m)

    return round_kernel


def _rounding_inputs(n: int = 6000) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(11)
    scales = torch.tensor([1.0, 1e-3, 1e-6, 3e-8, 1e4, 6e4, 3e38])  # fp16 subnormals, fp16/bf16 overflow
    x = torch.randn(n, generator=g) * scales[torch.randint(0, len(scales), (n,), generator=g)]
    edge = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 65504.0, 65519.0, 65520.0,
                         -65519.0, 3.3895e38, -3.3895e38, 1.0, 2.0**-24, 2.0**-25, 1.5 * 2.0**-24, 1.0 + 2.0**-8])
    x = torch.cat([edge, x])
    idx = torch.randint(0, 2**62, (x.numel(),), generator=g, dtype=torch.int64)
    idx[:4] = torch.tensor([0, 1, 2**31 - 1, 2**32 + 5])
    return x, idx


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16).to(torch.int32) & 0xFFFF


@needs_triton
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # the interpreter's numpy casts
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # of Inf/NaN/overflowing inputs
@pytest.mark.parametrize("seed", [0, 5, 2**62 + 12345])
def test_rounding_bit_for_bit_with_torch_model(seed):
    """The kernel's rounding helpers on fp32 values (NaN/Inf, overflow, fp16 subnormals, ties) and
    int64 indices across the range give the bit patterns of torch's round-to-nearest and of
    ``stochastic_round(x, dtype, seed, index)``: the same hash, the same rounding rule."""
    from zu_fast.ops.multiplicative_update import sr_stream_seed

    x, idx = _rounding_inputs()
    stream = sr_stream_seed(seed)
    stream = stream - (1 << 64) if stream >= 1 << 63 else stream
    k = _rounding_kernel()
    N, BLOCK = x.numel(), 1024
    xd, idd = x.to(DEV), idx.to(DEV)
    nan = torch.isnan(x)
    for kind, want in ((0, x.to(torch.bfloat16)), (1, stochastic_round(x, torch.bfloat16, seed, idx)),
                       (2, stochastic_round(x, torch.float16, seed, idx))):
        out = torch.empty(N, dtype=torch.int32, device=DEV)
        k[(triton.cdiv(N, BLOCK),)](xd, idd, out, stream, N, KIND=kind, BLOCK=BLOCK)
        got = out.cpu()
        ref = _bits(want)
        assert torch.equal(got[~nan], ref[~nan]), (kind, int((got[~nan] != ref[~nan]).sum()))
        exp_mask, mant_mask = (0x7F80, 0x7F) if kind < 2 else (0x7C00, 0x3FF)
        assert bool(((got[nan] & exp_mask) == exp_mask).all() and ((got[nan] & mant_mask) != 0).all())  # NaN


def _exact_diagonal_edit(d: int, g: torch.Generator) -> torch.Tensor:
    """E = diag(k · 2^-14), k in [-64, 64]: E·W and W + E·W are computed the same way by every
    backend (one product per output, E exactly one bf16 term), so the value rounded is the same."""
    k = torch.randint(-64, 65, (d,), generator=g).float()
    return torch.diag(k * 2.0**-14)


@needs_triton
@pytest.mark.parametrize("m_dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_stochastic_update_bit_matches_torch(dtype, m_dtype):
    """Stochastic rounding in the update: the Triton kernel and the torch default give the same
    bits on the same seed, in every chunking and layout and in both forms; the default seed is
    ``edit_seed`` of the matrix given, and no random generator is touched."""
    g = torch.Generator().manual_seed(12)
    d, d_in = 37, 90
    W0 = torch.randn(d, d_in, generator=g).to(dtype)
    E = _exact_diagonal_edit(d, g).to(m_dtype)
    D = torch.eye(d, dtype=m_dtype) + E  # exact: 1 + k·2^-14
    ref = multiplicative_update_torch(W0.clone(), E, form="delta", stochastic_rounding=True, seed=77)
    assert not torch.equal(ref, (W0.double() + E.double() @ W0.double()).to(dtype))  # really stochastic
    rng = torch.random.get_rng_state()
    variants = [(f, lay, c) for f in ("delta", "multiplier") for lay in ("row", "col") for c in (None, 7)]
    if HAS_CUDA:  # compiled: each variant is a compile; two cover both forms, layouts and chunkings
        variants = [("delta", "row", None), ("multiplier", "col", 7)]
    for form, layout, chunk in variants:
        M = E if form == "delta" else D
        W = W0.clone() if layout == "row" else W0.t().contiguous().t()
        W = W.to(DEV)
        triton_fn()(W, M.to(DEV), form=form, chunk_cols=chunk, stochastic_rounding=True, seed=77)
        assert torch.equal(W.cpu(), ref), (form, layout, chunk)
    assert torch.equal(torch.random.get_rng_state(), rng)
    W = W0.clone().to(DEV)
    triton_fn()(W, E.to(DEV), form="delta", stochastic_rounding=True)  # seed from the edit
    want = multiplicative_update_torch(W0.clone(), E, form="delta", stochastic_rounding=True)
    assert torch.equal(W.cpu(), want)
    assert torch.equal(want, multiplicative_update_torch(W0.clone(), E, form="delta", stochastic_rounding=True,
                                                         seed=ops.edit_seed(E)))


# --------------------------------------------------------------------------------------------------
# Compiled for sm_90 and sm_100 on CPU (Triton ships ptxas; no GPU needed)
# --------------------------------------------------------------------------------------------------

_COMPILE_SCRIPT = r"""
import json, re, subprocess, sys, tempfile
from pathlib import Path
import torch, triton
from zu_fast.kernels import multiplicative_update as m

bin_dir = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
HANDOFF = (r"scf\.if [^\n]*-> \(tensor<{bm}x{bn}xf32[^\n]*\{{\n(?:[^\n]*\n){{0,3}}?"
           r"[^\n]*arith\.addf[^\n]*tensor<{bm}x{bn}xf32")

def ptxas(k, arch):
    exe = bin_dir / ("ptxas-blackwell" if arch.startswith("sm_10") and (bin_dir / "ptxas-blackwell").exists()
                     else "ptxas")
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "k.ptx").write_text(k.asm["ptx"])
        r = subprocess.run([str(exe), "-v", "--gpu-name", arch, str(Path(tmp) / "k.ptx"), "-o",
                            str(Path(tmp) / "k.cubin")], capture_output=True, text=True)
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", r.stderr)
    return r.returncode, sum(int(a) + int(b) for a, b in spills)

def compile_one(job):
    cap, arch, cfg, layout, wd, md = job
    # stochastic rounding on (the longer epilogue); a row stride past 2^31 for row-major W on sm_90
    k = m.compile_for_target(cfg, capability=cap, w_dtype=wd, m_dtype=md, layout=layout, stochastic=True,
                             int_types={"w_sr": "i64"} if layout == "row" and cap == (9, 0) else None)
    tt = k.asm["ttgir"]
    rc, spill = ptxas(k, arch)
    first_mma = min([i for i in (tt.find("warp_group_dot "), tt.find("tc_gen5_mma ")) if i >= 0], default=-1)
    loop = tt[first_mma:] if first_mma >= 0 else ""
    return {"arch": arch, "config": list(cfg), "layout": layout, "w": str(wd), "m": str(md),
            "shared": k.metadata.shared, "wgmma": "ttng.warp_group_dot" in tt, "tcgen05": "ttng.tc_gen5_mma" in tt,
            "dmma": "mma.sync.aligned.m8n8k4.row.col.f64" in k.asm["ptx"],
            "handoff": bool(re.search(HANDOFF.format(bm=cfg[0], bn=cfg[1]), loop)),
            "ptxas_rc": rc, "spill_bytes": spill}

jobs = [((9, 0), "sm_90a", cfg, "row", torch.bfloat16, torch.float32) for cfg in m.GPU_CONFIGS["tc"]]
jobs += [((9, 0), "sm_90a", m.GPU_CONFIGS["tc"][0], "col", torch.bfloat16, torch.float32),
         ((9, 0), "sm_90a", m.GPU_CONFIGS["f32"][0], "row", torch.float16, torch.float32),
         ((9, 0), "sm_90a", m.GPU_CONFIGS["f64"][0], "col", torch.bfloat16, torch.float64)]
jobs += [((10, 0), "sm_100a", cfg, lay, torch.bfloat16, torch.float32)
         for cfg in (m.GPU_CONFIGS["tc"][0], (128, 64, 64, 8, 4)) for lay in ("row", "col")]
if __name__ == "__main__":
    import multiprocessing as mp
    import os
    with mp.get_context("fork").Pool(max(1, min(4, os.cpu_count() or 1))) as pool:  # compiles are single-threaded
        print(json.dumps(pool.map(compile_one, jobs)))
"""


@pytest.fixture(scope="module")
def compiled():
    """The kernel compiled for sm_90a and sm_100a on CPU, in a process without TRITON_INTERPRET."""
    import json
    import subprocess
    import sys
    import tempfile
    from pathlib import Path

    if not HAS_TRITON:
        pytest.skip("needs triton")
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / "compile_update.py"
        script.write_text(_COMPILE_SCRIPT)
        r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


H100_SMEM = 232448  # 227 KiB: the opt-in shared memory per block on H100/H200 (and B200)


def test_compiled_sm90_tensor_cores_handoff_no_spills(compiled):
    """sm_90a: every tensor-core candidate compiles to wgmma with the partial sum handed off inside
    the loop (an scf.if adding it to the fp32 sum: not folded back into one chain), fits an H100's
    shared memory and spills no registers; fp16 W (fp32 product) and fp64 E (DMMA) compile too."""
    sm90 = [c for c in compiled if c["arch"] == "sm_90a"]
    tc = [c for c in sm90 if c["m"] == "torch.float32" and c["w"] == "torch.bfloat16"]
    assert len(tc) >= 4
    for c in tc:
        assert c["wgmma"] and c["handoff"], c
        assert c["ptxas_rc"] == 0 and c["spill_bytes"] == 0, c
        assert c["shared"] <= H100_SMEM, c
    f64 = [c for c in sm90 if c["m"] == "torch.float64"]
    assert f64 and all(c["dmma"] and c["ptxas_rc"] == 0 for c in f64)
    f16 = [c for c in sm90 if c["w"] == "torch.float16"]
    assert f16 and all(c["ptxas_rc"] == 0 and not c["wgmma"] for c in f16)  # ieee fp32: no tensor cores


def test_compiled_sm100(compiled):
    """sm_100a: the tensor-core path compiles to tcgen05 MMAs with the hand-off, fits shared memory;
    (128, 64, 64, 8, 4) — a candidate — spills nothing in either layout (the 128×128 row-major tile
    does, a few dozen bytes: see GPU_CONFIGS)."""
    sm100 = [c for c in compiled if c["arch"] == "sm_100a"]
    assert len(sm100) == 4
    for c in sm100:
        assert c["tcgen05"] and c["handoff"] and c["ptxas_rc"] == 0, c
        assert c["shared"] <= H100_SMEM, c
    from zu_fast.kernels.multiplicative_update import GPU_CONFIGS

    assert (128, 64, 64, 8, 4) in GPU_CONFIGS["tc"]
    clean = [c for c in sm100 if tuple(c["config"]) == (128, 64, 64, 8, 4)]
    assert len(clean) == 2 and all(c["spill_bytes"] == 0 for c in clean), clean


def test_parse_config():
    from zu_fast.kernels.multiplicative_update import ROWS_PER_ACC, _parse_config

    assert _parse_config("128,128,64,8,3") == (128, 128, 64, 8, 3)
    with pytest.raises(ZuFastError, match="BK"):
        _parse_config(f"128,128,{ROWS_PER_ACC},8,3")  # one slab per hand-off: could be folded away
    with pytest.raises(ZuFastError, match="powers of 2"):
        _parse_config("100,128,64,8,3")


# --------------------------------------------------------------------------------------------------
# On a GPU, compiled
# --------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("layout", ["row", "col"])
def test_real_shape_gpu_triton(layout):
    """70B down_proj width (d 8192, 2048 of its 28672 columns), a real-edit E (1% scaling + rank 64)
    in fp32: ≥ 99.9% correctly rounded bf16 outputs, ≤ 1 ulp off, extra memory ≤ the bf16 split of
    E, one staging chunk and the split's 32 MiB of temporaries."""
    if not TRITON_RUNS:
        pytest.skip("triton not installed")
    g = torch.Generator(device="cuda").manual_seed(21)
    d, d_in = 8192, 2048
    W = (0.02 * torch.randn(d, d_in, device="cuda", generator=g)).to(torch.bfloat16)
    if layout == "col":
        W = W.t().contiguous().t()
    U = torch.randn(d, 64, device="cuda", generator=g, dtype=torch.float64) / d**0.5
    V = torch.randn(d, 64, device="cuda", generator=g, dtype=torch.float64) * (0.3 / 8)
    E64 = 0.01 * torch.eye(d, device="cuda", dtype=torch.float64) + U @ V.T
    W_before = W.clone()
    E32 = E64.float()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    triton_fn()(W, E32, form="delta")
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    assert extra <= 2 * d * d * 2 + d * max(d_in // 16, 512) * 2 + 33 * 2**20
    exact = W_before.double() + E64 @ W_before.double()
    wrong = float((W != exact.to(torch.bfloat16)).double().mean())
    err = float(((W.double() - exact).abs() / w_ulp(exact, W_before, torch.bfloat16)).max())
    print(f"{layout}: {wrong:.2e} not correctly rounded, max {err:.2f} ulp, extra {extra / 2**20:.0f} MiB")
    assert wrong < 1e-3 and err <= 1.0


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_stochastic_rounding_same_hash_as_torch_gpu_triton(dtype):
    """Compiled: the same bits as the torch default on the same seed (E as in the CPU test)."""
    if not TRITON_RUNS:
        pytest.skip("triton not installed")
    g = torch.Generator().manual_seed(8)
    d, d_in = 96, 1000
    W0 = torch.randn(d, d_in, generator=g).to(dtype).cuda()
    E = _exact_diagonal_edit(d, g).cuda()
    a, b = W0.clone(), W0.clone()
    triton_fn()(a, E, form="delta", stochastic_rounding=True, seed=77)
    multiplicative_update_torch(b, E, form="delta", stochastic_rounding=True, seed=77)
    assert torch.equal(a, b)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
def test_every_candidate_config_gpu_triton(monkeypatch):
    """Whichever config the tuner picks must be right: each tensor-core candidate that fits this
    GPU, forced in turn, on a ragged case (d 1000, d_in 700, chunks of 256), against float64."""
    if not TRITON_RUNS:
        pytest.skip("triton not installed")
    from triton.runtime.errors import OutOfResources
    from zu_fast.kernels import multiplicative_update as umod

    g = torch.Generator(device="cuda").manual_seed(2)
    W0 = torch.randn(1000, 700, device="cuda", generator=g).to(torch.bfloat16)
    E = 0.02 * torch.randn(1000, 1000, device="cuda", generator=g)
    ran = 0
    for cfg in umod.GPU_CONFIGS["tc"]:
        monkeypatch.setenv("ZU_FAST_UPDATE_TRITON_CONFIG", ",".join(map(str, cfg)))
        W = W0.clone()
        try:
            triton_fn()(W, E, form="delta", chunk_cols=256)
        except OutOfResources as e:
            print(f"{cfg}: does not fit this GPU: {e}")
            continue
        check_update(W, W0, E, "delta")
        ran += 1
    assert ran >= len(umod.GPU_CONFIGS["tc"]) - 1
