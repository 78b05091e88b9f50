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


# ------------------------------------------------------------------------------ measured preferences
from zu_fast.ops import preferences  # noqa: E402


def test_rule_prefers_only_correct_backends_that_beat_torch():
    times = {"torch": [10.0, 20.0], "triton": [5.0, 10.0], "cuda": [4.0, 25.0], "slow": [12.0, 30.0]}
    correct = {"torch": True, "triton": True, "cuda": True, "slow": True}
    order, why = preferences.decide(correct, times)
    assert order == ["triton"]  # cuda loses on one shape, slow on both
    assert "not faster" in why["cuda"] and "not faster" in why["slow"]
    order, why = preferences.decide({**correct, "triton": False}, times)
    assert order == [] and "did not pass" in why["triton"]
    order, why = preferences.decide({"torch": True}, {"torch": [1.0], "cuda": [0.5]})
    assert order == [] and "no correctness tests" in why["cuda"]
    order, _ = preferences.decide(correct, {"torch": [10.0], "triton": [5.0], "cuda": [2.0]})
    assert order == ["cuda", "triton"]  # best speed-up first
    order, why = preferences.decide(correct, {"torch": [10.0, 8.0], "triton": [5.0, None]})
    assert order == [] and "every shape" in why["triton"]


def _fake_gpu_op(monkeypatch, tmp_path, prefs: dict | None):
    registry.define_op("toy_gpu_op", lambda x: "torch")
    registry.register_backend("toy_gpu_op", "fast", lambda x: "fast", device_types=("cuda",))
    registry.register_backend("toy_gpu_op", "gone", lambda x: "gone", device_types=("cuda",),
                              available=lambda: False)
    path = tmp_path / "prefs.json"
    if prefs is not None:
        path.write_text(__import__("json").dumps(prefs))
    monkeypatch.setenv(preferences.FILE_ENV, str(path))
    monkeypatch.setattr(preferences, "current_device_name",
                        lambda device_type, index=None: "Fake GPU" if device_type == "cuda" else None)
    preferences.reload()


def test_registry_follows_the_measured_file(monkeypatch, tmp_path):
    try:
        _fake_gpu_op(monkeypatch, tmp_path, None)  # no measurement: torch
        assert registry.choose("toy_gpu_op", "cuda").name == "torch"
        entry = {"ops": {"toy_gpu_op": {"order": ["gone", "fast"]}}}
        _fake_gpu_op(monkeypatch, tmp_path, {"schema": 1, "devices": {"Fake GPU": entry}})
        assert registry.choose("toy_gpu_op", "cuda").name == "fast"  # "gone" is unavailable: skipped
        assert registry.choose("toy_gpu_op", "cpu").name == "torch"
        _fake_gpu_op(monkeypatch, tmp_path, {"schema": 1, "devices": {"Other GPU": entry}})
        assert registry.choose("toy_gpu_op", "cuda").name == "torch"  # measured on another device only
        with registry.use_backend("torch"):
            _fake_gpu_op(monkeypatch, tmp_path, {"schema": 1, "devices": {"Fake GPU": entry}})
            assert registry.choose("toy_gpu_op", "cuda").name == "torch"  # forcing still wins
    finally:
        registry._OPS.pop("toy_gpu_op", None)
        monkeypatch.delenv(preferences.FILE_ENV)
        preferences.reload()


def test_checked_in_file_prefers_nothing_unmeasured():
    """The shipped measured_preferences.json lists only devices with a recorded GPU check; every
    listed backend came with passing tests and a speed-up (the evidence is in the file)."""
    data = preferences._load(str(preferences.MEASURED_FILE))
    assert data["schema"] == preferences.SCHEMA
    for device, entry in data["devices"].items():
        for op, e in entry["ops"].items():
            for b in e["order"]:
                assert e["correct"].get(b) is True, (device, op, b)
                assert e["reasons"][b].startswith("preferred"), (device, op, b)


def test_classify_tests_by_backend():
    c = preferences.classify_test
    assert c("tests/test_cuda_ext.py::test_cov_vs_float64[small_1-kk-nomask-torch.bfloat16]") == [
        ("cov_accumulate", "cuda")]
    assert c("tests/test_cuda_ext.py::test_update_delta_vs_float64[mid-row-torch.bfloat16-torch.float32]") == [
        ("multiplicative_update_", "cuda")]
    assert c("tests/test_cuda_ext.py::test_stochastic_rounding_same_hash_as_torch[torch.float16]") == [
        ("multiplicative_update_", "cuda")]
    assert c("tests/test_cuda_ext.py::test_cuda_sources_compile") == []
    assert c("tests/test_cov_accumulate.py::test_real_shapes_gpu[triton]") == [("cov_accumulate", "triton")]
    assert c("tests/test_cov_accumulate.py::test_real_shapes_gpu[torch]") == [("cov_accumulate", "torch")]
    assert c("tests/test_cov_accumulate.py::test_triton_fp32_gpu_exact") == [("cov_accumulate", "triton")]
    assert c("tests/test_tc_numerics.py::test_gpu_cov_bias_within_bound[cuda]") == [("cov_accumulate", "cuda")]
    assert c("tests/test_tc_numerics.py::test_gpu_model_matches_cublas") == []
    assert c("tests/test_multiplicative_update.py::test_delta_form_matches_float64[x]") == [
        ("multiplicative_update_", "torch")]
    assert c("tests/test_triton_update.py::test_real_shape_gpu_triton[row]") == [("multiplicative_update_", "triton")]
    assert c("tests/test_triton_update.py::test_matches_float64[33x70-torch.bfloat16-torch.float32-delta]") == [
        ("multiplicative_update_", "triton")]
    assert c("tests/test_triton_update.py::test_compiled_sm100") == []


def test_every_gpu_test_speaks_for_a_backend():
    """Each gpu-marked test of the op test files counts for some (op, backend), so the GPU check's
    correctness record covers it (a new test with an unclassifiable name fails here)."""
    import subprocess
    import sys

    files = ["tests/test_cov_accumulate.py", "tests/test_cuda_ext.py", "tests/test_multiplicative_update.py",
             "tests/test_triton_update.py"]
    out = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-m", "gpu", *files],
                         capture_output=True, text=True, cwd=__import__("pathlib").Path(__file__).parents[1])
    ids = [ln for ln in out.stdout.splitlines() if "::" in ln]
    assert len(ids) > 100, out.stdout[-2000:] + out.stderr[-2000:]
    unclassified = [i for i in ids if not preferences.classify_test(i)]
    assert not unclassified, unclassified[:10]


def test_junit_to_preferences_file(tmp_path):
    """The GPU check's path: junit XML → correctness, table → times, rule → file → merge."""
    import json

    xml = tmp_path / "t.xml"
    xml.write_text("""<testsuites><testsuite>
<testcase classname="tests.test_cuda_ext" name="test_cov_vs_float64[a]"><skipped message="no GPU"/></testcase>
<testcase classname="tests.test_cuda_ext" name="test_update_vs_float64[b]"><failure message="x"/></testcase>
<testcase classname="tests.test_cov_accumulate" name="test_real_shapes_gpu[triton]"/>
<testcase classname="tests.test_cov_accumulate" name="test_real_shapes_gpu[torch]"/>
<testcase classname="tests.test_multiplicative_update" name="test_bad_arguments"/>
</testsuite></testsuites>""")
    state = tmp_path / "state.json"
    assert preferences.main(["record-tests", "--state", str(state), "--junit", str(xml), "--device", "Fake GPU"]) == 0
    table = {"device": "Fake GPU", "rows": [
        {"shape": "8B kk", "impl": "torch", "seconds": 2.0, "counts_for": ["cov_accumulate"]},
        {"shape": "8B kk", "impl": "triton", "seconds": 1.0, "counts_for": ["cov_accumulate"]},
        {"shape": "8B kk", "impl": "cuda", "seconds": 0.5, "counts_for": ["cov_accumulate"]},
        {"shape": "8B kk", "impl": "torch.mm (unchunked)", "seconds": 1.5, "counts_for": []},
    ]}
    (tmp_path / "cov.json").write_text(json.dumps(table))
    upd = {"device": "Fake GPU", "rows": [
        {"shape": "70B row", "impl": "torch", "seconds": 2.0, "counts_for": ["multiplicative_update_"]},
        {"shape": "70B row", "impl": "cuda", "seconds": 1.0, "counts_for": ["multiplicative_update_"]}]}
    (tmp_path / "upd.json").write_text(json.dumps(upd))
    preferences.main(["record-speed", "--state", str(state), "--op", "cov_accumulate",
                      "--table", str(tmp_path / "cov.json")])
    preferences.main(["record-speed", "--state", str(state), "--op", "multiplicative_update_",
                      "--table", str(tmp_path / "upd.json")])
    out = tmp_path / "prefs.json"
    preferences.main(["write", "--state", str(state), "--out", str(out)])
    ops_ = json.loads(out.read_text())["devices"]["Fake GPU"]["ops"]
    assert ops_["cov_accumulate"]["order"] == ["triton"]  # cuda was faster, but its only test was skipped
    assert ops_["multiplicative_update_"]["order"] == []  # its cuda test failed
    into = tmp_path / "measured.json"
    merged = preferences.merge(out, into)
    assert list(merged["devices"]) == ["Fake GPU"]
    preferences.reload()


# ------------------------------------------------------------------------------ a kernel that fails to compile
def _compile_error():
    import ast

    from triton.compiler.errors import CompilationError

    return CompilationError(None, ast.parse("x = 1").body[0],
                            "Mismatched type for a_sb between then block (int64) and else block (int32)")


def test_is_compile_error():
    pytest.importorskip("triton")
    from triton.runtime.errors import OutOfResources, PTXASError

    from zu_fast.ops.triton_backend import is_compile_error

    assert is_compile_error(_compile_error())
    assert is_compile_error(OutOfResources(262144, 232448, "shared memory"))
    assert is_compile_error(PTXASError("ptxas fatal: unresolved extern"))
    assert is_compile_error(RuntimeError("PassManager::run failed"))
    assert not is_compile_error(RuntimeError("CUDA error: an illegal memory access was encountered"))
    assert not is_compile_error(ZuFastError("cov_accumulate: kk is (3, 3)"))
    assert not is_compile_error(ValueError("x"))


def _cov_args():
    keys = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(0))
    return torch.zeros(8, 8), torch.zeros(8), torch.zeros((), dtype=torch.int64), keys


def _update_args():
    g = torch.Generator().manual_seed(1)
    return torch.randn(8, 12, generator=g).to(torch.bfloat16), 0.01 * torch.randn(8, 8, generator=g)


OPS_ARGS = {
    "cov_accumulate": (lambda: _cov_args(), lambda a: ops.cov_accumulate(*a)),
    "multiplicative_update_": (lambda: _update_args(), lambda a: ops.multiplicative_update_(*a, form="delta")),
}


@pytest.fixture
def triton_failing_on_cpu(monkeypatch, request):
    """The registered Triton backend of an op, made eligible and preferred on CPU, whose kernel
    raises ``request.param`` (an error factory) before writing anything."""
    pytest.importorskip("triton")
    op_name, make_error = request.param
    op = registry.get_op(op_name)
    b = op.backends["triton"]
    calls = []

    def fails(*args, **kwargs):
        calls.append(1)
        raise make_error()

    monkeypatch.setattr(b, "fn", fails)
    monkeypatch.setattr(b, "device_types", ("cpu",))
    monkeypatch.setattr(b, "_cached", True)
    monkeypatch.setattr(b, "_failure", None)
    monkeypatch.setitem(op.preference, "cpu", ["triton"])
    return op_name, b, calls


@pytest.mark.parametrize("triton_failing_on_cpu", [(name, _compile_error) for name in OPS_ARGS],
                         indirect=True, ids=list(OPS_ARGS))
def test_compile_error_falls_back_to_torch_with_one_warning(triton_failing_on_cpu):
    """A chosen backend whose kernel does not compile here: one warning naming it, the torch
    default's result, and torch from then on (no second try, no second warning)."""
    import warnings

    op_name, b, calls = triton_failing_on_cpu
    make, run = OPS_ARGS[op_name]
    assert ops.choose(op_name, "cpu").name == "triton"
    args, want = make(), make()
    registry.get_op(op_name).backends["torch"].fn(*want, **({"form": "delta"} if op_name != "cov_accumulate" else {}))
    with pytest.warns(RuntimeWarning) as rec:
        run(args)
    msgs = [str(w.message) for w in rec if "failed to compile" in str(w.message)]
    assert len(msgs) == 1 and f"triton kernel of op {op_name!r}" in msgs[0] and "torch default" in msgs[0]
    assert all(torch.equal(a, w) for a, w in zip(args, want))  # exactly the default's result
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        run(args)
    assert calls == [1]
    assert ops.choose(op_name, "cpu").name == "torch"
    assert "failed to compile" in b.reason()
    row = next(r for r in ops.info() if r["op"] == op_name and r["backend"] == "triton")
    assert row["available"] is False and "failed to compile" in row["why"]


@pytest.mark.parametrize("triton_failing_on_cpu", [("cov_accumulate", _compile_error)], indirect=True)
def test_compile_error_of_a_forced_backend_is_raised(triton_failing_on_cpu):
    """ZU_FAST_BACKEND=triton asked for that backend: its compile error is raised (naming it), the
    accumulators untouched."""
    kk, ks, n, keys = _cov_args()
    with ops.use_backend("triton"), pytest.raises(ZuFastError, match="ZU_FAST_BACKEND='triton'.*failed to compile"):
        ops.cov_accumulate(kk, ks, n, keys)
    assert not kk.any() and int(n) == 0


@pytest.mark.parametrize("triton_failing_on_cpu", [("cov_accumulate", lambda: RuntimeError("illegal memory access"))],
                         indirect=True)
def test_other_errors_are_not_swallowed(triton_failing_on_cpu):
    """Only a compile error falls back: any other error of a backend (a bug, a fault) surfaces."""
    _, b, _ = triton_failing_on_cpu
    with pytest.raises(RuntimeError, match="illegal memory access"):
        ops.cov_accumulate(*_cov_args())
    assert b._failure is None
