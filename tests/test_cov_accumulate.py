"""Tests of the ``cov_accumulate`` op: the plain-PyTorch default and the Triton backend.

Everything is compared against a float64 reference computed from the kept rows. On CPU the Triton
kernel runs under ``TRITON_INTERPRET=1`` (set by conftest.py before the kernel module is imported);
the ``gpu`` test runs it compiled at real shapes.
"""

from __future__ import annotations

import os

import pytest
import torch

from zu_fast import ops
from zu_fast.errors import ZuFastError
from zu_fast.ops import registry
from zu_fast.ops.cov_accumulate import cov_accumulate_torch

HAS_CUDA = torch.cuda.is_available()
DEV = "cuda" if HAS_CUDA else "cpu"
TOL = 1e-5  # relative error vs float64 (fp32 accumulation level)

try:
    import triton  # noqa: F401

    HAS_TRITON = True
except Exception:  # pragma: no cover - depends on the install
    HAS_TRITON = False

TRITON_RUNS = HAS_TRITON and (HAS_CUDA or os.environ.get("TRITON_INTERPRET") == "1")
needs_triton = pytest.mark.skipif(not TRITON_RUNS, reason="needs triton (CUDA or TRITON_INTERPRET=1)")

DTYPES = [torch.bfloat16, torch.float16, torch.float32]


@pytest.fixture(autouse=True)
def _no_autotune_for_small_cases(request, monkeypatch):
    """On a GPU the awkward small cases run the default config (one compile each instead of a
    benchmark of every candidate); the ``gpu`` tests tune, and one checks every candidate config."""
    if HAS_CUDA and "gpu" not in request.keywords:
        monkeypatch.setenv("ZU_FAST_COV_AUTOTUNE", "0")


def triton_fn():
    return ops.backend_fn("cov_accumulate", "triton")


def relerr(got: torch.Tensor, ref: torch.Tensor) -> float:
    got, ref = got.double(), ref.double()
    den = ref.norm().item()
    return (got - ref).norm().item() / (den if den > 0 else 1.0)


def make_case(name: str, dtype: torch.dtype, device: str = DEV, seed: int = 0):
    """(keys, mask, values or None) for a named awkward case."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return (torch.randn(*shape, generator=g) * 2).to(dtype).to(device)

    if name == "2d_d40_nomask":  # rows not a multiple of any tile, single partial column tile
        return rnd(77, 40), None, None
    if name == "3d_d130_holes_fused":  # [batch, seq, d_ff] with holes in the mask, d_ff 130, d 72
        keys = rnd(3, 37, 130)
        mask = torch.rand(3, 37, generator=g) > 0.35
        mask[1, :5] = False
        mask[2] = False  # a fully padded sequence
        return keys, mask.to(device), rnd(3, 37, 72)
    if name == "3d_d72_strided_intmask":  # non-contiguous in batch (not viewable as 2-D), int 0/1 mask
        keys = rnd(29, 2, 72).transpose(0, 1)  # [2, 29, 72], strides (72, 144, 1)
        values = rnd(29, 2, 40).transpose(0, 1)
        mask = (torch.rand(2, 29, generator=g) > 0.5).to(torch.int64).to(device)
        return keys, mask, values
    if name == "all_masked_fused":
        return rnd(2, 9, 40), torch.zeros(2, 9, dtype=torch.bool, device=device), rnd(2, 9, 24)
    raise KeyError(name)


CASES = ["2d_d40_nomask", "3d_d130_holes_fused", "3d_d72_strided_intmask", "all_masked_fused"]


def reference(keys, mask, values):
    """Float64 sums over the kept rows."""
    k = keys.reshape(-1, keys.shape[-1]).double()
    v = values.reshape(-1, values.shape[-1]).double() if values is not None else None
    if mask is not None:
        keep = mask.reshape(-1).bool()
        k = k[keep]
        v = v[keep] if v is not None else None
    out = {"kk": k.T @ k, "ks": k.sum(0), "n": k.shape[0]}
    if v is not None:
        out["vk"] = v.T @ k
        out["vs"] = v.sum(0)
    return out


def random_accumulators(d_ff, d_v, device, seed=1, ks_dtype=torch.float32, vs_dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    acc = {
        "kk": torch.randn(d_ff, d_ff, generator=g).to(device),
        "ks": torch.randn(d_ff, generator=g).to(ks_dtype).to(device),
        "n": torch.tensor(7, dtype=torch.int64, device=device),
    }
    if d_v:
        acc["vk"] = torch.randn(d_v, d_ff, generator=g).to(device)
        acc["vs"] = torch.randn(d_v, generator=g).to(vs_dtype).to(device)
    return acc


def run_op(fn, acc, keys, mask, values):
    if values is not None:
        fn(acc["kk"], acc["ks"], acc["n"], keys, mask, values=values, vk=acc["vk"], vs=acc["vs"])
    else:
        fn(acc["kk"], acc["ks"], acc["n"], keys, mask)


def check_against_reference(acc0, acc, ref, times, *, upper_only):
    d_ff = acc["kk"].shape[0]
    exp_kk = acc0["kk"].double() + times * ref["kk"]
    if upper_only:
        up = torch.triu(torch.ones(d_ff, d_ff, dtype=torch.bool, device=exp_kk.device))
        assert relerr(acc["kk"][up], exp_kk[up]) <= TOL
    else:
        assert relerr(acc["kk"], exp_kk) <= TOL
    assert relerr(acc["ks"], acc0["ks"].double() + times * ref["ks"]) <= TOL
    assert acc["n"].dtype == torch.int64 and acc["n"].dim() == 0
    assert acc["n"].item() == acc0["n"].item() + times * ref["n"]
    if "vk" in ref:
        assert relerr(acc["vk"], acc0["vk"].double() + times * ref["vk"]) <= TOL
        assert relerr(acc["vs"], acc0["vs"].double() + times * ref["vs"]) <= TOL


def clone_acc(acc):
    return {k: v.clone() for k, v in acc.items()}


# --------------------------------------------------------------------------------------------------
# Plain-PyTorch default
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES)
def test_torch_matches_float64(case, dtype):
    keys, mask, values = make_case(case, dtype)
    acc = random_accumulators(keys.shape[-1], values.shape[-1] if values is not None else 0, DEV)
    acc0 = clone_acc(acc)
    for _ in range(2):  # accumulate twice into non-zero accumulators
        run_op(cov_accumulate_torch, acc, keys, mask, values)
    ops.symmetrize_upper_(acc["kk"])
    acc0["kk"] = torch.triu(acc0["kk"]) + torch.triu(acc0["kk"], 1).T  # what symmetrize sees of it
    check_against_reference(acc0, acc, reference(keys, mask, values), 2, upper_only=False)
    assert torch.equal(acc["kk"], acc["kk"].T)


def test_dispatch_on_cpu_uses_torch():
    assert ops.choose("cov_accumulate", "cpu").name == "torch"
    keys, mask, values = make_case("3d_d130_holes_fused", torch.float32, "cpu")
    acc = random_accumulators(130, 72, "cpu")
    acc0 = clone_acc(acc)
    ops.cov_accumulate(acc["kk"], acc["ks"], acc["n"], keys, mask, values=values, vk=acc["vk"], vs=acc["vs"])
    check_against_reference(acc0, acc, reference(keys, mask, values), 1, upper_only=True)


# --------------------------------------------------------------------------------------------------
# Argument checks (shared by every backend)
# --------------------------------------------------------------------------------------------------


def _bad_inputs():
    d, dv = 8, 4
    keys = torch.randn(2, 3, d)
    good = dict(
        kk=torch.zeros(d, d), ks=torch.zeros(d), n=torch.tensor(0), keys=keys, mask=None,
        values=None, vk=None, vs=None,
    )
    cases = {
        "kk shape": (dict(kk=torch.zeros(d, d + 1)), "kk is"),
        "ks shape": (dict(ks=torch.zeros(d + 1)), "ks is"),
        "kk dtype": (dict(kk=torch.zeros(d, d, dtype=torch.float64)), "kk must be float32"),
        "ks dtype": (dict(ks=torch.zeros(d, dtype=torch.float16)), "ks must be float32 or float64"),
        "n dtype": (dict(n=torch.tensor(0.0)), "n must be a 0-d int64"),
        "n shape": (dict(n=torch.zeros(1, dtype=torch.int64)), "n must be a 0-d int64"),
        "keys dtype": (dict(keys=torch.zeros(2, 3, d, dtype=torch.float64)), "keys must be fp32/fp16/bf16"),
        "mask shape": (dict(mask=torch.ones(3, 2, dtype=torch.bool)), "mask shape"),
        "values w/o acc": (dict(values=torch.randn(2, 3, dv)), "values given without vk and vs"),
        "values shape": (
            dict(values=torch.randn(3, 2, dv), vk=torch.zeros(dv, d), vs=torch.zeros(dv)),
            "differ in their leading shape",
        ),
        "vk shape": (dict(values=torch.randn(2, 3, dv), vk=torch.zeros(d, dv), vs=torch.zeros(dv)), "vk/vs shapes"),
        "vk dtype": (
            dict(values=torch.randn(2, 3, dv), vk=torch.zeros(dv, d, dtype=torch.float64), vs=torch.zeros(dv)),
            "vk must be float32",
        ),
    }
    return good, cases


_GOOD, _BAD = _bad_inputs()


def _backends_to_check():
    return ["torch"] + (["triton"] if TRITON_RUNS else [])


@pytest.mark.parametrize("backend", _backends_to_check())
@pytest.mark.parametrize("what", sorted(_BAD))
def test_check_cov_args_errors(what, backend):
    override, message = _BAD[what]
    args = {**_GOOD, **override}
    fn = ops.backend_fn("cov_accumulate", backend)
    with pytest.raises(ZuFastError, match=message):
        fn(args["kk"], args["ks"], args["n"], args["keys"], args["mask"],
           values=args["values"], vk=args["vk"], vs=args["vs"])


# --------------------------------------------------------------------------------------------------
# Triton backend (compiled on CUDA, interpreted on CPU)
# --------------------------------------------------------------------------------------------------


def test_triton_registered_not_preferred():
    op = registry.get_op("cov_accumulate")
    b = op.backends["triton"]
    assert b.device_types == ("cuda",)
    assert "triton" not in op.preference.get("cuda", [])  # preferred only by measurement (preferences.py)
    assert b.is_available() == (HAS_TRITON and HAS_CUDA)
    if not b.is_available():
        assert b.why_unavailable()


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES)
def test_triton_matches_float64(case, dtype):
    keys, mask, values = make_case(case, dtype)
    d_v = values.shape[-1] if values is not None else 0
    acc = random_accumulators(keys.shape[-1], d_v, DEV, ks_dtype=torch.float64 if d_v else torch.float32)
    acc0 = clone_acc(acc)
    fn = triton_fn()
    for _ in range(2):  # accumulate twice into non-zero accumulators
        run_op(fn, acc, keys, mask, values)
    check_against_reference(acc0, acc, reference(keys, mask, values), 2, upper_only=True)
    # After symmetrising, the whole matrix is right (given a symmetric starting accumulator).
    sym0 = ops.symmetrize_upper_(acc0["kk"].clone()).double()
    full = ops.symmetrize_upper_(acc["kk"])
    assert relerr(full, sym0 + 2 * reference(keys, mask, values)["kk"]) <= TOL


@needs_triton
def test_triton_writes_only_upper_tiles(monkeypatch):
    """Small tiles (several tiles per side): strictly-lower tiles keep their stale values exactly."""
    block = 16
    monkeypatch.setenv("ZU_FAST_COV_TRITON_CONFIG", f"{block},16,4,1")
    g = torch.Generator().manual_seed(3)
    d_ff = 40  # 3 column tiles of 16, the last partial
    keys = torch.randn(2, 11, d_ff, generator=g).to(torch.float16).to(DEV)
    mask = (torch.rand(2, 11, generator=g) > 0.3).to(DEV)
    values = torch.randn(2, 11, 20, generator=g).to(torch.float16).to(DEV)
    acc = random_accumulators(d_ff, 20, DEV)
    acc0 = clone_acc(acc)
    run_op(triton_fn(), acc, keys, mask, values)
    check_against_reference(acc0, acc, reference(keys, mask, values), 1, upper_only=True)
    tile = torch.arange(d_ff, device=DEV) // block
    below = tile[:, None] > tile[None, :]  # strictly-lower tiles
    assert torch.equal(acc["kk"][below], acc0["kk"][below])
    assert not torch.equal(acc["kk"][~below], acc0["kk"][~below])


@needs_triton
def test_triton_empty_and_ks_float32(monkeypatch):
    """Zero rows: nothing changes (no launch); ks in fp32 and vs in fp32 also work."""
    fn = triton_fn()
    acc = random_accumulators(24, 16, DEV, ks_dtype=torch.float32, vs_dtype=torch.float32)
    acc0 = clone_acc(acc)
    run_op(fn, acc, torch.randn(0, 5, 24, device=DEV), None, torch.randn(0, 5, 16, device=DEV))
    for k in acc:
        assert torch.equal(acc[k], acc0[k])
    keys = torch.randn(1, 6, 24, device=DEV, dtype=torch.bfloat16)
    values = torch.randn(1, 6, 16, device=DEV, dtype=torch.float16)  # mixed dtypes: fp32 dot
    run_op(fn, acc, keys, None, values)
    check_against_reference(acc0, acc, reference(keys, None, values), 1, upper_only=True)


@needs_triton
@pytest.mark.parametrize("layout", ["col_stride_2", "4d", "1d_row"])
def test_triton_layouts(layout):
    """Other layouts the hook may hand over: strided columns, more leading dims, a single row."""
    g = torch.Generator().manual_seed(5)
    if layout == "col_stride_2":
        keys = torch.randn(50, 80, generator=g).to(torch.float16).to(DEV)[:, ::2]
        mask = (torch.rand(50, generator=g) > 0.4).to(DEV)
    elif layout == "4d":
        keys = torch.randn(2, 3, 7, 24, generator=g).to(torch.bfloat16).to(DEV)
        mask = (torch.rand(2, 3, 7, generator=g) > 0.4).to(DEV)
    else:
        keys = torch.randn(24, generator=g).to(DEV)
        mask = torch.tensor(True, device=DEV)
    acc = random_accumulators(keys.shape[-1], 0, DEV)
    acc0 = clone_acc(acc)
    run_op(triton_fn(), acc, keys, mask, None)
    check_against_reference(acc0, acc, reference(keys, mask, None), 1, upper_only=True)


@needs_triton
def test_triton_runs_triton_code(monkeypatch):
    """The Triton kernel itself is launched (interpreted on CPU), once, over the expected grid."""
    import triton as _triton
    from zu_fast.kernels import cov_accumulate as mod

    launches = []
    real = mod._cov_kernel

    class Spy:
        def __getitem__(self, grid):
            launches.append(grid)
            return real[grid]

    monkeypatch.setattr(mod, "_cov_kernel", Spy())
    monkeypatch.setenv("ZU_FAST_COV_TRITON_CONFIG", "32,32,4,1")
    keys, mask, values = make_case("3d_d130_holes_fused", torch.float16)
    acc = random_accumulators(130, 72, DEV)
    acc0 = clone_acc(acc)
    run_op(triton_fn(), acc, keys, mask, values)
    T, Tv = 5, 3  # cdiv(130, 32), cdiv(72, 32)
    assert launches == [(T * (T + 1) // 2 + Tv * T + T + Tv,)]
    check_against_reference(acc0, acc, reference(keys, mask, values), 1, upper_only=True)
    if not HAS_CUDA:
        from triton.runtime.interpreter import InterpretedFunction

        assert isinstance(real, InterpretedFunction)
    else:
        assert isinstance(real, _triton.runtime.JITFunction)


def _map_kernel():
    import triton
    import triton.language as tl
    from zu_fast.kernels.cov_accumulate import upper_tile

    # A jit function resolves names in its module's globals: make upper_tile one of them.
    globals()["upper_tile"] = upper_tile

    @triton.jit
    def map_kernel(out_i, out_j, N, BLOCK: tl.constexpr):
        t = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        i, j = upper_tile(t)  # noqa: F821
        tl.store(out_i + t, i, mask=t < N)
        tl.store(out_j + t, j, mask=t < N)

    return map_kernel


@needs_triton
def test_upper_tile_mapping():
    """The in-kernel pid -> (i, j) map of upper-triangle tiles is exact for every pid up to 2**17."""
    N = 1 << 17  # T up to ~511 column tiles: d_ff 65k at BLOCK 128
    out_i = torch.empty(N, dtype=torch.int32, device=DEV)
    out_j = torch.empty(N, dtype=torch.int32, device=DEV)
    block = 4096
    _map_kernel()[(N // block,)](out_i, out_j, N, BLOCK=block)
    j = torch.arange(512).repeat_interleave(torch.arange(1, 513))[:N]
    i = torch.arange(N) - j * (j + 1) // 2
    assert torch.equal(out_j.cpu().long(), j) and torch.equal(out_i.cpu().long(), i)


@needs_triton
def test_triton_cpu_without_interpreter_is_refused(monkeypatch):
    if HAS_CUDA:
        pytest.skip("only meaningful without a GPU")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    acc = random_accumulators(8, 0, "cpu")
    with pytest.raises(ZuFastError, match="needs CUDA"):
        run_op(triton_fn(), acc, torch.randn(3, 8), None, None)


@needs_triton
def test_triton_no_key_columns_still_counts_and_sums_values():
    """d_ff = 0 with values: vk is [d, 0], but vs and n must still be accumulated."""
    keys = torch.randn(2, 7, 0, device=DEV)
    values = torch.randn(2, 7, 5, device=DEV)
    mask = torch.rand(2, 7) > 0.3
    acc = {"kk": torch.zeros(0, 0, device=DEV), "ks": torch.zeros(0, device=DEV),
           "n": torch.tensor(3, device=DEV), "vk": torch.zeros(5, 0, device=DEV),
           "vs": torch.zeros(5, dtype=torch.float64, device=DEV)}
    for fn in (triton_fn(), cov_accumulate_torch):
        a = clone_acc(acc)
        run_op(fn, a, keys, mask.to(DEV), values)
        assert int(a["n"]) == 3 + int(mask.sum())
        assert relerr(a["vs"], values[mask.to(DEV)].double().sum(0)) <= TOL


@needs_triton
def test_triton_column_offsets_past_int32(monkeypatch):
    """Column-major keys whose column offset col × stride exceeds 2^31 elements (like 75k rows at
    d_ff 28672): the kernel addresses them with int64. The 4 GiB storage is virtual: only the
    three columns used are ever written."""
    if HAS_CUDA:
        pytest.skip("CPU (interpreter) variant; the GPU runs real shapes")
    rows, stride = 40, 2**30 + 64  # column 2 starts at element 2^31 + 128
    try:
        storage = torch.empty(2 * stride + rows, dtype=torch.bfloat16)
    except RuntimeError:
        pytest.skip("cannot reserve 4 GiB of address space here")
    keys = torch.as_strided(storage, (rows, 3), (1, stride))
    g = torch.Generator().manual_seed(9)
    vals = torch.randn(rows, 3, generator=g).to(torch.bfloat16)
    for c in range(3):
        keys[:, c] = vals[:, c]
    mask = torch.rand(rows, generator=g) > 0.2
    acc = random_accumulators(3, 0, "cpu")
    acc0 = clone_acc(acc)
    monkeypatch.setenv("ZU_FAST_COV_TRITON_CONFIG", "16,16,4,1")
    run_op(triton_fn(), acc, keys, mask, None)
    check_against_reference(acc0, acc, reference(vals, mask, None), 1, upper_only=True)


# --------------------------------------------------------------------------------------------------
# Configs, shared memory and the compiled kernel (sm_90, compiled on CPU: Triton ships its ptxas)
# --------------------------------------------------------------------------------------------------

H100_SMEM = 232448  # 227 KiB: the opt-in shared memory per block on H100/H200


def test_filter_configs_reports_what_it_drops():
    from zu_fast.kernels.cov_accumulate import filter_configs

    sizes = {(128, 64, 8, 4): 262144, (128, 64, 8, 3): 196608, (64, 64, 4, 4): 65536}
    kept, dropped = filter_configs(list(sizes), sizes.__getitem__, H100_SMEM)
    assert kept == [(128, 64, 8, 3), (64, 64, 4, 4)]
    assert dropped == [{"config": (128, 64, 8, 4), "shared_bytes": 262144, "limit": H100_SMEM}]


def test_tune_has_no_blanket_except():
    """_tune drops configs by their compiled shared memory and catches only Triton's
    OutOfResources: any other failure (a bug) surfaces instead of silently shrinking the search."""
    import inspect

    from zu_fast.kernels import cov_accumulate as kmod

    src = inspect.getsource(kmod._tune)
    assert "except Exception" not in src and "except:" not in src
    assert "filter_configs(" in src and "except OutOfResources" in src


_COMPILE_SCRIPT = r"""
import json, re, subprocess, sys, tempfile
from pathlib import Path
import triton
from zu_fast.kernels.cov_accumulate import compile_for_target
out = {"shared": {}}
for cfg in [(128, 64, 8, 4), (128, 32, 8, 4)]:
    out["shared"][f"{cfg}|False"] = compile_for_target(cfg, fused=True, one_gemm=False).metadata.shared
k = compile_for_target((128, 64, 8, 4), fused=True)
out["shared"]["(128, 64, 8, 4)|True"] = k.metadata.shared
ttgir = k.asm["ttgir"]
out["wgmma"] = "ttng.warp_group_dot" in ttgir
loop = ttgir[ttgir.index("warp_group_dot "):] if out["wgmma"] else ""
handoff = r"scf\.if [^\n]*-> \(tensor<128x128xf32[^\n]*\{\n(?:[^\n]*\n){0,3}?[^\n]*arith\.addf[^\n]*tensor<128x128xf32"
out["handoff"] = bool(re.search(handoff, loop))
ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
with tempfile.TemporaryDirectory() as tmp:
    (Path(tmp) / "k.ptx").write_text(k.asm["ptx"])
    r = subprocess.run([str(ptxas), "-v", "--gpu-name", "sm_90a", str(Path(tmp) / "k.ptx"), "-o",
                        str(Path(tmp) / "k.cubin")], capture_output=True, text=True)
out["ptxas_rc"] = r.returncode
out["spills"] = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", r.stderr)
# Keys and values whose batch strides straddle 2^31 (Triton passes the larger one as i64, the other
# as i32): 2-D keys of 75k-262k rows at 70B shapes. The shared kk/vk call site must compile.
out["mixed_strides"] = {}
for cap in ((9, 0), (10, 0)):
    for name, types in (("k_sb i64", {"k_sb": "i64"}), ("v_sb,v_ss i64", {"v_sb": "i64", "v_ss": "i64"})):
        try:
            km = compile_for_target((128, 64, 8, 4), capability=cap, fused=True, int_types=types)
            out["mixed_strides"][f"sm_{cap[0]}{cap[1]} {name}"] = "wgmma" if "warp_group_dot" in km.asm["ttgir"] else (
                "tcgen05" if "tc_gen5_mma" in km.asm["ttgir"] else "other")
        except Exception as e:
            out["mixed_strides"][f"sm_{cap[0]}{cap[1]} {name}"] = f"{type(e).__name__}: {str(e)[-300:]}"
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def compiled_sm90():
    """The kernel compiled for sm_90 on CPU, in a process without TRITON_INTERPRET (the interpreter
    replaces triton.language's own jit functions in this one)."""
    import json
    import subprocess
    import sys

    if not HAS_TRITON:
        pytest.skip("needs triton")
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    r = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], capture_output=True, text=True, env=env, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_compiled_shared_memory_and_dropped_configs(compiled_sm90):
    """Compiled for sm_90: one GEMM call site keeps one copy of the pipeline buffers, so the fused
    kernel at (128, 64, 8, 4) needs 128 KiB and fits; two call sites (values of another dtype)
    need 256 KiB, over the 227 KiB limit, and that config is dropped."""
    from zu_fast.kernels.cov_accumulate import filter_configs

    shared = compiled_sm90["shared"]
    cfgs = [(128, 64, 8, 4), (128, 32, 8, 4)]
    assert shared[f"{cfgs[0]}|True"] == 4 * 2 * 64 * 128 * 2  # stages × operands × BLOCK_K × BLOCK × bf16
    kept, dropped = filter_configs(cfgs, lambda c: shared[f"{c}|False"], H100_SMEM)
    assert [d["config"] for d in dropped] == [(128, 64, 8, 4)]
    assert dropped[0]["shared_bytes"] == 2 * shared[f"{cfgs[0]}|True"]
    assert kept == [(128, 32, 8, 4)]
    assert shared[f"{cfgs[0]}|True"] <= H100_SMEM  # one call site: the same config fits


def test_compiled_kernel_keeps_the_handoff(compiled_sm90):
    """Compiled for sm_90, the Gram loop still hands its tensor-core partial sum off: the wgmma
    accumulates into a loop-carried value, and an scf.if inside the loop adds it to the fp32 sum
    (Triton's dot(a, b, 0) + c → dot(a, b, c) rewrite did not fold it away). No register spills."""
    assert compiled_sm90["wgmma"], "no Hopper tensor-core instruction in the compiled kernel"
    assert compiled_sm90["handoff"], "hand-off (scf.if with the fp32 add) missing from the compiled loop"
    assert compiled_sm90["ptxas_rc"] == 0
    spills = compiled_sm90["spills"]
    assert spills and all(a == "0" and b == "0" for a, b in spills), spills


def test_compiled_with_mixed_stride_types(compiled_sm90):
    """The issue-27 failure: with the batch stride of the keys at 2^31 or more (i64) and that of the
    values below (i32), the shared kk/vk call site did not compile ("Mismatched type for a_sb
    between then block (int64) and else block (int32)"). Strides are now cast to int64 before the
    branch: it compiles for sm_90 and sm_100 either way round, to tensor-core code."""
    mixed = compiled_sm90["mixed_strides"]
    assert mixed == {"sm_90 k_sb i64": "wgmma", "sm_90 v_sb,v_ss i64": "wgmma",
                     "sm_100 k_sb i64": "tcgen05", "sm_100 v_sb,v_ss i64": "tcgen05"}, mixed


def test_parse_config_rejects_handoff_folding_block_k():
    from zu_fast.kernels.cov_accumulate import ROWS_PER_ACC, _parse_config

    assert _parse_config("128,64,8,4") == (128, 64, 8, 4)
    with pytest.raises(ZuFastError, match="BLOCK_K"):
        _parse_config(f"128,{ROWS_PER_ACC},8,4")


# --------------------------------------------------------------------------------------------------
# Real shapes on a GPU
# --------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_real_shapes_gpu(backend):
    """8B shapes: d_ff 14336, 8192 rows ([2, 4096] with padding holes) bf16, fused d=4096, vs float64."""
    if backend == "triton" and not TRITON_RUNS:
        pytest.skip("triton not installed")
    fn = ops.backend_fn("cov_accumulate", backend)
    torch.manual_seed(0)
    d_ff, d = 14336, 4096
    keys = torch.randn(2, 4096, d_ff, device="cuda", dtype=torch.bfloat16)
    values = torch.randn(2, 4096, d, device="cuda", dtype=torch.bfloat16)
    mask = torch.ones(2, 4096, dtype=torch.bool, device="cuda")
    mask[0, 3000:] = False
    mask[1, :17] = False
    acc = {
        "kk": torch.zeros(d_ff, d_ff, device="cuda"),
        "ks": torch.zeros(d_ff, device="cuda", dtype=torch.float64),
        "n": torch.zeros((), dtype=torch.int64, device="cuda"),
        "vk": torch.zeros(d, d_ff, device="cuda"),
        "vs": torch.zeros(d, device="cuda", dtype=torch.float64),
    }
    run_op(fn, acc, keys, mask, values)
    torch.cuda.synchronize()
    k = keys[mask].double()
    assert acc["n"].item() == k.shape[0]
    ref = k.T @ k
    up = torch.triu(torch.ones(d_ff, d_ff, dtype=torch.bool, device="cuda"))
    assert relerr(acc["kk"][up], ref[up]) <= TOL
    del ref, up
    assert relerr(acc["ks"], k.sum(0)) <= TOL
    v = values[mask].double()
    assert relerr(acc["vk"], v.T @ k) <= TOL
    assert relerr(acc["vs"], v.sum(0)) <= TOL


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
def test_triton_every_candidate_config_gpu(monkeypatch):
    """Whichever config the tuner picks must be right: every 16-bit candidate that fits this GPU's
    shared memory, forced in turn, on a ragged fused bf16 case (d_ff 1000, d 300, 5000 rows)."""
    if not TRITON_RUNS:
        pytest.skip("triton not installed")
    from zu_fast.kernels import cov_accumulate as kmod

    g = torch.Generator(device="cuda").manual_seed(2)
    keys = torch.randn(5, 1000, 1000, device="cuda", generator=g).to(torch.bfloat16)
    values = torch.randn(5, 1000, 300, device="cuda", generator=g).to(torch.bfloat16)
    mask = torch.rand(5, 1000, device="cuda", generator=g) > 0.2
    ref = reference(keys, mask, values)
    limit = kmod.device_shared_limit(keys.device)
    ran = 0
    for cfg in kmod.GPU_CONFIGS_16BIT:
        monkeypatch.setenv("ZU_FAST_COV_TRITON_CONFIG", ",".join(map(str, cfg)))
        acc = random_accumulators(1000, 300, "cuda", ks_dtype=torch.float64)
        acc0 = clone_acc(acc)
        try:
            run_op(triton_fn(), acc, keys, mask, values)
            torch.cuda.synchronize()
        except Exception as e:  # only a config over this GPU's shared memory may refuse to run
            from triton.runtime.errors import OutOfResources

            assert isinstance(e, OutOfResources), (cfg, e)
            print(f"{cfg}: does not fit ({limit} bytes of shared memory): {e}")
            continue
        check_against_reference(acc0, acc, ref, 1, upper_only=True)
        ran += 1
    assert ran >= len(kmod.GPU_CONFIGS_16BIT) - 1


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
def test_triton_fp32_gpu_exact():
    """fp32 activations take the ieee (no tf32) path: ≤1e-5 vs float64 at d_ff 4096."""
    if not TRITON_RUNS:
        pytest.skip("triton not installed")
    torch.manual_seed(0)
    keys = torch.randn(4, 1000, 4096, device="cuda")
    mask = torch.rand(4, 1000, device="cuda") > 0.2
    kk = torch.zeros(4096, 4096, device="cuda")
    ks = torch.zeros(4096, device="cuda")
    n = torch.zeros((), dtype=torch.int64, device="cuda")
    triton_fn()(kk, ks, n, keys, mask)
    k = keys[mask].double()
    up = torch.triu(torch.ones(4096, 4096, dtype=torch.bool, device="cuda"))
    assert relerr(kk[up], (k.T @ k)[up]) <= TOL
    assert relerr(ks, k.sum(0)) <= TOL
    assert n.item() == k.shape[0]
