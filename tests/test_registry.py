"""Op registry: defaults, backend choice, ZU_FAST_BACKEND override, info()."""

from __future__ import annotations

import pytest
import torch

from zu_fast import ZuFastError, ops
from zu_fast.ops import registry


def test_every_op_has_a_torch_default_chosen_on_cpu():
    names = {op.name for op in ops.list_ops()}
    assert {"cov_accumulate", "multiplicative_update_"} <= names
    for name in names:
        assert ops.choose(name, "cpu").name == "torch"


def test_forcing_a_backend(monkeypatch):
    monkeypatch.setenv("ZU_FAST_BACKEND", "nope")
    with pytest.raises(ZuFastError, match="no such backend"):
        ops.choose("cov_accumulate", "cpu")
    monkeypatch.setenv("ZU_FAST_BACKEND", "torch")
    assert ops.choose("cov_accumulate", "cpu").name == "torch"
    monkeypatch.delenv("ZU_FAST_BACKEND")
    if "triton" in registry.get_op("cov_accumulate").backends:
        with ops.use_backend("triton"), pytest.raises(ZuFastError, match="device type 'cpu'|not available"):
            ops.choose("cov_accumulate", "cpu")


def test_preference_order_and_fallback():
    registry.define_op("toy_op", lambda x: x + 1)
    registry.register_backend("toy_op", "fast", lambda x: x + 1, device_types=("cpu",), prefer_on=("cpu",))
    registry.register_backend("toy_op", "broken", lambda x: x, device_types=("cpu",),
                              available=lambda: 1 / 0, prefer_on=("cpu",))
    assert registry.choose("toy_op", "cpu").name == "fast"  # "broken" fails its check: skipped
    assert registry.choose("toy_op", "cuda").name == "torch"
    rows = [r for r in ops.info() if r["op"] == "toy_op"]
    assert {r["backend"]: r["available"] for r in rows} == {"torch": True, "fast": True, "broken": False}
    del registry._OPS["toy_op"]


def test_info_rows_are_truthful():
    rows = ops.info()
    chosen = [r for r in rows if "cpu" in r["chosen_on"].split(",")]
    assert {r["op"] for r in chosen} >= {"cov_accumulate", "multiplicative_update_"}
    assert all(r["available"] for r in chosen)
    if not torch.cuda.is_available():
        assert not any(r["available"] for r in rows if r["backend"] in ("cuda",))
