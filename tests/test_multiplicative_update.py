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
    g = torch.Generator().manual_seed(0)
    x = torch.full((200_000,), 1.0) + 1e-4  # 1e-4 is below half a bf16 ulp at 1.0 (3.9e-3)
    nearest = x.to(torch.bfloat16).float()
    assert float(nearest.mean()) == 1.0  # round-to-nearest loses the edit entirely
    sr = stochastic_round(x, torch.bfloat16, g).float()
    assert abs(float(sr.mean()) - 1.0001) < 2e-5  # unbiased: the edit survives on average
    x16 = torch.full((200_000,), 1.0) + 1e-4
    sr16 = stochastic_round(x16, torch.float16, g).float()
    assert abs(float(sr16.mean()) - 1.0001) < 2e-5


def test_stochastic_rounding_option_in_the_update():
    g = torch.Generator().manual_seed(0)
    W = torch.ones(4, 50_000, dtype=torch.bfloat16)
    D = torch.eye(4, dtype=torch.float64) * (1 + 1e-4)
    multiplicative_update_torch(W, D, stochastic_rounding=True, generator=g)
    assert abs(float(W.float().mean()) - (1 + 1e-4)) < 3e-5
