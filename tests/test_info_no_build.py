"""`zu-fast info` and ops.info() build nothing unless asked (issue 27: the GPU check's section 1 waited
for the whole nvcc build behind `zu-fast info`). The CUDA device is faked: the point is that, with a
device present, the extension's loader is not called without --build and is called with it."""

from __future__ import annotations

import pytest

from zu_fast import cli, ops
from zu_fast.ops import cuda_backend, registry


@pytest.fixture
def fake_gpu_machine(monkeypatch):
    """A machine where the CUDA extension would have to be built: a usable device, nothing loaded
    yet, and a loader that records its calls instead of running nvcc."""
    calls = []

    def load_extension():
        calls.append(1)
        raise RuntimeError("JIT build failed: (fake) nvcc exited with 1")

    monkeypatch.setattr(cuda_backend, "load_extension", load_extension)
    monkeypatch.setattr(cuda_backend, "_cuda_device_problem", lambda: None)
    monkeypatch.setattr(cuda_backend, "_ext", None)
    monkeypatch.setattr(cuda_backend, "_error", None)
    for op in ("cov_accumulate", "multiplicative_update_"):
        monkeypatch.setattr(registry.get_op(op).backends["cuda"], "_cached", None)
    return calls


def test_info_builds_nothing(fake_gpu_machine):
    rows = [r for r in ops.info() if r["backend"] == "cuda"]
    assert fake_gpu_machine == []
    assert len(rows) == 2
    for r in rows:
        assert r["available"] is None and "not checked" in r["why"] and "--build" in r["why"]
    assert all(ops.choose(op, "cpu").name == "torch" for op in ("cov_accumulate", "multiplicative_update_"))


def test_cli_info_builds_only_with_build(fake_gpu_machine, capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert fake_gpu_machine == []
    assert "unknown" in out and "not checked" in out
    assert cli.main(["info", "--build"]) == 0
    out = capsys.readouterr().out
    assert fake_gpu_machine, "--build must try the build"
    assert "CUDA extension build: failed" in out and "fake" in out
    assert "unknown" not in out.split("why not", 1)[1]  # every backend checked


def test_choose_without_building_skips_an_unbuilt_extension(fake_gpu_machine, monkeypatch):
    """Where measurements would prefer cuda, choose(expensive=False) does not build to find out."""
    op = registry.get_op("multiplicative_update_")
    monkeypatch.setitem(op.preference, "cuda", ["cuda"])
    monkeypatch.setattr(op.backends["cuda"], "device_types", ("cuda",))
    assert registry.choose("multiplicative_update_", "cuda", expensive=False).name == "torch"
    assert fake_gpu_machine == []
    assert registry.choose("multiplicative_update_", "cuda").name == "torch"  # expensive: tried, failed
    assert fake_gpu_machine == [1]
