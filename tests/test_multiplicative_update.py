"""multiplicative_update_ (plain-PyTorch default): W ← D W in place, one rounding, chunked."""

from __future__ import annotations

import pytest
import torch

from zu_fast import ZuFastError, ops
from zu_fast.ops import stochastic_round
from zu_fast.ops.multiplicative_update import multiplicative_update_torch


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("d_dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape,chunk", [((7, 13), 5), ((33, 70), 64), ((16, 16), None)])
def test_matches_float64_with_one_rounding(dtype, d_dtype, shape, chunk):
    g = torch.Generator().manual_seed(shape[0])
    d, d_in = shape
    W = torch.randn(d, d_in, generator=g).to(dtype)
    D = (torch.eye(d, dtype=torch.float64) + 0.05 * torch.randn(d, d, generator=g, dtype=torch.float64))
    ref = (D.to(d_dtype).double() @ W.double()).to(dtype)  # exact product, one rounding
    ptr = W.data_ptr()
    multiplicative_update_torch(W, D.to(d_dtype), chunk_cols=chunk)
    assert W.data_ptr() == ptr  # in place
    if dtype == torch.float32 and d_dtype == torch.float32:
        assert torch.allclose(W.double(), ref.double(), rtol=1e-5, atol=1e-5)
    else:
        # at most one ulp from the correctly rounded result
        ulp = (ref.double().abs() * torch.finfo(dtype).eps).clamp_min(torch.finfo(dtype).tiny)
        assert ((W.double() - ref.double()).abs() <= ulp + 1e-12).all()


def test_strided_view_is_updated_in_place():
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(20, 9, generator=g)  # a Conv1D-style [d_in, d] weight; W = weight.T
    D = torch.eye(9, dtype=torch.float64) * 2.0
    W = weight.t()
    ops.multiplicative_update_(W, D)
    assert torch.allclose(weight, 2.0 * torch.randn(20, 9, generator=torch.Generator().manual_seed(0)))


def test_bad_arguments():
    with pytest.raises(ZuFastError, match="need W"):
        ops.multiplicative_update_(torch.zeros(3, 4), torch.zeros(4, 4))
    with pytest.raises(ZuFastError, match="float32 or float64"):
        ops.multiplicative_update_(torch.zeros(3, 4), torch.zeros(3, 3, dtype=torch.float16))


def test_stochastic_rounding_is_unbiased_and_keeps_tiny_edits():
    x = torch.full((200_000,), 1.0) + 1e-4  # 1e-4 is below half a bf16 ulp at 1.0 (3.9e-3)
    nearest = x.to(torch.bfloat16).float()
    assert float(nearest.mean()) == 1.0  # round-to-nearest loses the edit entirely
    sr = stochastic_round(x, torch.bfloat16, seed=0).float()
    assert abs(float(sr.mean()) - 1.0001) < 2e-5  # unbiased: the edit survives on average
    assert set(sr.unique().tolist()) <= {1.0, 1.0 + 2.0**-7}
    x16 = torch.full((200_000,), 1.0) + 1e-4
    sr16 = stochastic_round(x16, torch.float16, seed=1).float()
    assert abs(float(sr16.mean()) - 1.0001) < 2e-5
    neg = stochastic_round(-x16, torch.float16, seed=1).float()
    assert torch.equal(neg, -sr16)  # the sign is applied last: same draws, mirrored


def test_stochastic_rounding_edge_values():
    """NaN/Inf and values that would overflow keep round-to-nearest; exact values stay exact."""
    x = torch.tensor([float("nan"), float("inf"), -float("inf"), 3.0e38, 65519.0, 1.5, 0.0, -2.0])
    bf = stochastic_round(x, torch.bfloat16, seed=3).float()
    assert torch.isnan(bf[0]) and bf[1] == float("inf") and bf[2] == -float("inf")
    assert torch.equal(bf[5:], x[5:])
    h = stochastic_round(x, torch.float16, seed=3).float()
    assert torch.isnan(h[0]) and h[1] == float("inf") and h[4] == x[4:5].to(torch.float16).float()[0]
    assert torch.equal(h[5:], x[5:])


def test_sr_hash_matches_the_reference():
    """The tensor splitmix64 (int64, wrapping multiplies, logical shifts) equals the Python-int one,
    i.e. the CUDA kernels' random_u32 (csrc/common.cuh), at indices across the whole int64 range."""
    from zu_fast.ops.multiplicative_update import _u64, mix64_int, sr_random_bits, sr_stream_seed

    idx = torch.tensor([0, 1, 2, 12345, 2**31 - 1, 2**32 + 7, 2**40 + 3, 2**62 - 1], dtype=torch.int64)
    for seed in (0, 1, 2**62 + 12345):
        got = sr_random_bits(seed, idx)
        s = sr_stream_seed(seed)
        want = [mix64_int(s + (int(i) + 1) * 0x9E3779B97F4A7C15) >> 32 for i in idx]
        assert got.tolist() == want
    assert sr_stream_seed(0) == mix64_int(0x5A17F00D)
    assert _u64(2**64 - 1) == -1


def test_stochastic_rounding_option_in_the_update():
    W = torch.ones(4, 50_000, dtype=torch.bfloat16)
    D = torch.eye(4, dtype=torch.float64) * (1 + 1e-4)
    multiplicative_update_torch(W, D, stochastic_rounding=True, seed=11)
    assert abs(float(W.float().mean()) - (1 + 1e-4)) < 3e-5


def test_stochastic_rounding_is_reproducible_and_leaves_the_rng_alone():
    """The seed comes from the edit (or the caller), never from a random generator: the same edit
    rounds the same way every time and in every chunking, and torch's global RNG is untouched."""
    g = torch.Generator().manual_seed(0)
    W0 = torch.randn(16, 300, generator=g).to(torch.bfloat16)
    E = 1e-4 * torch.randn(16, 16, generator=g)
    rng = torch.random.get_rng_state()
    runs = []
    for chunk in (None, 7, 300):
        W = W0.clone()
        ops.multiplicative_update_(W, E, form="delta", stochastic_rounding=True, chunk_cols=chunk)
        runs.append(W)
    assert torch.equal(torch.random.get_rng_state(), rng)
    assert all(torch.equal(r, runs[0]) for r in runs)
    W = W0.clone()
    ops.multiplicative_update_(W, E, form="delta", stochastic_rounding=True, seed=ops.edit_seed(E))
    assert torch.equal(W, runs[0])  # the default seed is edit_seed(E)
    W = W0.clone()
    ops.multiplicative_update_(W, E * 1.5, form="delta", stochastic_rounding=True)
    assert not torch.equal(W, runs[0])
    assert ops.edit_seed(E) == ops.edit_seed(E.clone()) != ops.edit_seed(E.double())
    with pytest.raises(ZuFastError, match="seed"):
        ops.multiplicative_update_(W, E, form="delta", stochastic_rounding=True, seed=-1)


def test_stochastic_rounding_index_is_the_element():
    """Element (i, j) of W draws the bits of index i·d_in + j, whatever the layout of W."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(6, 10, generator=g)
    flat = stochastic_round(x, torch.bfloat16, seed=5)
    idx = torch.arange(60).reshape(6, 10)
    assert torch.equal(stochastic_round(x.t().contiguous(), torch.bfloat16, 5, idx.t().contiguous()), flat.t())
    W = x.to(torch.bfloat16)
    Wt = W.t().contiguous().t()  # column-major storage, same values
    M = 1e-3 * torch.randn(6, 6, generator=g)
    multiplicative_update_torch(W, M, form="delta", stochastic_rounding=True, seed=9)
    multiplicative_update_torch(Wt, M, form="delta", stochastic_rounding=True, seed=9, chunk_cols=3)
    assert torch.equal(W, Wt)


# ------------------------------------------------------------------------------------ delta form
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("e_dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape,chunk", [((7, 13), 5), ((33, 70), 64), ((129, 40), None)])
def test_delta_form_matches_float64(dtype, e_dtype, shape, chunk):
    """W ← W + E W with E = D − I: at most one ulp from the correctly rounded (I + E) W."""
    g = torch.Generator().manual_seed(shape[0] + 1)
    d, d_in = shape
    W = torch.randn(d, d_in, generator=g).to(dtype)
    E = (0.01 * torch.eye(d, dtype=torch.float64) + 0.05 * torch.randn(d, d, generator=g, dtype=torch.float64))
    E = E.to(e_dtype)
    exact = W.double() + E.double() @ W.double()
    ref = exact.to(dtype)
    multiplicative_update_torch(W, E, form="delta", chunk_cols=chunk)
    if dtype == torch.float32 and e_dtype == torch.float32:  # fp32 accumulation of E W: fp32-level error
        assert torch.allclose(W.double(), exact, rtol=1e-5, atol=1e-5)
        return
    ulp = (ref.double().abs() * torch.finfo(dtype).eps).clamp_min(torch.finfo(dtype).tiny)
    assert ((W.double() - ref.double()).abs() <= ulp + 1e-12).all()
    if e_dtype == torch.float64 or dtype != torch.float32:
        assert float((W != ref).double().mean()) < 0.01  # nearly always the correctly rounded value


def test_delta_and_multiplier_forms_agree():
    """The same edit in both forms: D = I + E exactly (E small, fp64)."""
    g = torch.Generator().manual_seed(4)
    W0 = torch.randn(20, 30, generator=g).to(torch.bfloat16)
    E = 1e-2 * torch.randn(20, 20, generator=g, dtype=torch.float64)
    a, b = W0.clone(), W0.clone()
    ops.multiplicative_update_(a, E, form="delta")
    ops.multiplicative_update_(b, torch.eye(20, dtype=torch.float64) + E)
    assert torch.equal(a, b)
    with pytest.raises(ZuFastError, match="form"):
        ops.multiplicative_update_(a, E, form="additive")


def test_live_and_loaded_edit_are_bit_identical(tmp_path):
    """What Edit does: the live edit and a saved-then-loaded one apply the same fp32 E through the
    same op, so the weights agree bit for bit."""
    from safetensors.torch import load_file, save_file

    g = torch.Generator().manual_seed(6)
    W0 = torch.randn(24, 50, generator=g).to(torch.bfloat16)
    D = torch.eye(24, dtype=torch.float64) + 1e-3 * torch.randn(24, 24, generator=g, dtype=torch.float64)
    stored = (D - torch.eye(24, dtype=torch.float64)).float()  # what save() writes
    live = W0.clone()
    ops.multiplicative_update_(live, stored, form="delta")
    save_file({"E": stored}, tmp_path / "e.safetensors")
    loaded = W0.clone()
    ops.multiplicative_update_(loaded, load_file(tmp_path / "e.safetensors")["E"], form="delta")
    assert torch.equal(live, loaded)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("layout", ["row", "col"])
@pytest.mark.parametrize("backend", ["torch"])
def test_delta_form_on_gpu(backend, layout):
    """The torch default's delta form on CUDA (bf16 W, fp32 E: two bf16 cuBLAS products with fp32
    output when this torch has them) against float64: ≥ 99.5% correctly rounded, ≤ 1 ulp off."""
    from zu_fast.ops import multiplicative_update as mu

    g = torch.Generator(device="cuda").manual_seed(3)
    d, d_in = 1024, 3000
    W = (0.02 * torch.randn(d, d_in, device="cuda", generator=g)).to(torch.bfloat16)
    if layout == "col":
        W = W.t().contiguous().t()
    U = torch.randn(d, 32, device="cuda", generator=g, dtype=torch.float64) / d**0.5
    V = torch.randn(d, 32, device="cuda", generator=g, dtype=torch.float64) * 0.05
    E64 = 0.01 * torch.eye(d, device="cuda", dtype=torch.float64) + U @ V.T
    exact = W.double() + E64 @ W.double()
    print(f"tensor-core mode of this torch: {mu._tc_delta_mode(W, E64.float())!r}")
    ops.backend_fn("multiplicative_update_", backend)(W, E64.float(), form="delta")
    ref = exact.to(torch.bfloat16)
    assert float((W != ref).double().mean()) < 5e-3
    ulp = torch.exp2(torch.floor(torch.log2(torch.maximum(exact.abs(), ref.double().abs()).clamp_min(2.0**-126))) - 7)
    assert float(((W.double() - exact).abs() / ulp).max()) <= 1.0
