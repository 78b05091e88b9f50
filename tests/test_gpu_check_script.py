"""benchmarks/gpu_check.sh on CPU: its syntax, its time budgets, and its orchestration with a fake
python and nvidia-smi (no GPU, nothing real runs).

Issue 27: the check must fit what a lent device gives, 8 minutes in all and each section under
4.5 minutes, with every step inside a section bounded so the section ends 30 s inside its limit
(section 2's inner timeouts used to add up to more than its limit). The budgets are read from the
script itself (``--budgets``) and from its header and the README, which must agree.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
TOTAL_S, SECTION_MAX_S, SPARE_S = 480, 270, 30

pytestmark = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                                reason="needs bash and coreutils timeout")


def budgets(env: dict | None = None) -> dict[str, tuple[int, int, int]]:
    r = subprocess.run(["bash", str(SCRIPT), "--budgets"], capture_output=True, text=True, env=env, timeout=30)
    assert r.returncode == 0, r.stderr
    out = {}
    for line in r.stdout.splitlines()[1:]:
        sec, limit, planned, est = line.split()
        out[sec] = (int(limit), int(planned) if planned != "-" else -1, int(est))
    return out


def test_syntax():
    r = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_budgets_fit_the_device_time():
    b = budgets()
    sections = {k: v for k, v in b.items() if k != "total"}
    assert sorted(sections) == ["1", "2", "3", "4", "5"]
    for sec, (limit, planned, est) in sections.items():
        assert limit <= SECTION_MAX_S, sec
        assert planned + SPARE_S <= limit, (sec, planned, limit)  # inner steps leave 30 s
        assert est <= planned, (sec, est, planned)  # the estimate fits the steps' budgets
    assert sum(v[0] for v in sections.values()) <= TOTAL_S
    assert b["total"][0] == sum(v[0] for v in sections.values())
    assert b["total"][2] == sum(v[2] for v in sections.values()) <= TOTAL_S


def _table_rows(text: str, pattern: str) -> dict[str, tuple[int, int, int]]:
    return {m.group(1): tuple(int(m.group(i)) for i in (2, 3, 4)) for m in re.finditer(pattern, text, re.M)}


def test_header_and_readme_state_the_same_budgets():
    b = {k: v for k, v in budgets().items() if k != "total"}
    header = _table_rows(SCRIPT.read_text(), r"^#\s+([1-5])\s+(\d+)\s+(\d+)\s+(\d+)\s")
    assert header == b
    readme = _table_rows((ROOT / "README.md").read_text(), r"^\|\s*([1-5])\s*\|[^|]*\|\s*(\d+) s\s*\|\s*(\d+) s\s*\|"
                                                           r"\s*~?(\d+) s\s*\|")
    assert readme == b, "README's GPU-check table differs from the script's budgets"


def _function_body(text: str, name: str) -> str:
    m = re.search(rf"^{name}\(\) \{{(.*?)^\}}", text, re.M | re.S)
    assert m, name
    return m.group(1)


def test_every_python_step_in_a_section_is_budgeted():
    """Each python run inside a section goes through `budget` (its own timeout, capped by the
    section's deadline) or run_tests (which uses it); only start_background runs unbounded, by
    design, in its own session."""
    text = SCRIPT.read_text()
    assert "budget" in _function_body(text, "run_tests")
    for fn in ("install", "section1", "section2", "section3", "section4", "section5"):
        body = _function_body(text, fn).replace("\\\n", " ")
        for line in body.splitlines():
            if '"$PY"' in line or "'$PY'" in line:
                assert re.match(r"\s*(\(cd \S+ && )?(budget|run_tests) ", line), f"{fn}: unbudgeted: {line.strip()}"


def test_budget_caps_a_step_at_the_deadline():
    """`budget 100 sleep 100` with 4 s left before the deadline stops at the deadline (124), and a
    step with no time left is skipped (124) instead of started."""
    prog = (f"source {SCRIPT}; DEADLINE=$((SECONDS + 4 + KILL)); t0=$SECONDS; budget 100 sleep 100; "
            "echo rc=$? took=$((SECONDS - t0)); DEADLINE=$SECONDS; budget 5 true; echo rc=$?")
    r = subprocess.run(["bash", "-c", prog], capture_output=True, text=True, timeout=60)
    rcs = re.findall(r"rc=(\d+)", r.stdout)
    assert rcs == ["124", "124"], r.stdout + r.stderr
    assert int(re.search(r"took=(\d+)", r.stdout).group(1)) <= 5
    assert "no time left" in r.stdout


FAKE_PY = r"""#!/usr/bin/env bash
echo "$*" >> "$FAKE_LOG"
if [ -n "${FAKE_HANG:-}" ] && [[ "$*" == *"$FAKE_HANG"* ]]; then
  for a in "$@"; do case $a in --junitxml=*) echo '<testsuites/>' > "${a#--junitxml=}";; esac; done
  sleep 1000
fi
case "$*" in
  *"-m pytest"*)
    for a in "$@"; do case $a in --junitxml=*) echo '<testsuites/>' > "${a#--junitxml=}";; esac; done
    echo "3 passed";;
  *"get_device_name()"*) echo "NVIDIA Fake GPU";;
  *"get_device_capability()"*) echo "9.0";;
esac
exit 0
"""


@pytest.fixture
def fake_machine(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "fakepy").write_text(FAKE_PY)
    (bin_dir / "nvidia-smi").write_text("#!/usr/bin/env bash\necho 'NVIDIA Fake GPU, 81559 MiB'\n")
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "PY": str(bin_dir / "fakepy"),
           "FAKE_LOG": str(tmp_path / "calls.log"), "ZU_FAST_GPU_STATE": str(tmp_path / "state"),
           "OUT": str(tmp_path / "out"), "TORCH_EXTENSIONS_DIR": str(tmp_path / "ext")}

    def run(*sections, **extra):
        t0 = time.monotonic()
        r = subprocess.run(["bash", str(SCRIPT), *sections], capture_output=True, text=True,
                           env={**env, **{k: str(v) for k, v in extra.items()}}, timeout=300)
        calls = (tmp_path / "calls.log").read_text() if (tmp_path / "calls.log").exists() else ""
        return r, calls, time.monotonic() - t0

    return run, tmp_path


def test_all_sections_run_their_steps(fake_machine):
    run, tmp = fake_machine
    r, calls, _ = run()
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    for s in range(1, 6):
        assert f"=== section {s}: " in r.stdout and (tmp / "out" / f"s{s}.log").exists()
        assert re.search(rf"=== section {s}: \d+ s \(limit \d+ s, estimate \d+ s\), exit 0", r.stdout)
    for expected in ("pip install -q -e .", "-m zu_fast.cli info", "cb.load_extension()",
                     "zu_fast.kernels.cov_accumulate import precompile",
                     "zu_fast.kernels.multiplicative_update import precompile",
                     "tests/test_triton_update.py", "tests/test_cov_accumulate.py tests/test_multiplicative_update.py",
                     "tests/test_cuda_ext.py tests/test_tc_numerics.py -m gpu",
                     "record-tests", "benchmarks/cov_table.py", "benchmarks/update_table.py",
                     "--op multiplicative_update_", "e2e_unlearn.py --shape llama-3.1-8b --n 16"):
        assert expected in calls, expected
    assert "info --build" not in calls  # section 1 builds nothing in the foreground
    rec = next(ln for ln in calls.splitlines() if "record-tests" in ln)
    assert all(f"tests_{n}.xml" in rec for n in ("triton_torch", "triton_update", "cuda"))


def test_a_stopped_test_run_is_not_counted_and_the_section_ends_in_time(fake_machine):
    run, tmp = fake_machine
    run("1")
    limits = dict(LIMIT_2=40, B2_TESTS=5, B2_WAIT_BUILD=2, B2_CUDA_TESTS=5, B2_RECORD=5)
    r, calls, took = run("2", FAKE_HANG="tests/test_triton_update.py", **limits)
    assert r.returncode == 1
    assert "tests triton_update: STOPPED at its budget" in r.stdout
    assert (tmp / "state" / "incomplete_tests_triton_update.xml").exists()
    rec = next(ln for ln in calls.splitlines() if "record-tests" in ln)
    assert "tests_triton_update.xml" not in rec and "tests_cuda.xml" in rec  # the others still count
    assert took < limits["LIMIT_2"] - 30 + 10


def test_the_deadline_caps_a_long_step(fake_machine):
    """A step whose own budget is longer than the section's time left stops at the deadline."""
    run, _ = fake_machine
    run("1")
    r, _, took = run("5", FAKE_HANG="e2e_unlearn.py", LIMIT_5=38, B5_E2E=100)
    assert r.returncode == 1
    assert took < 38 - 30 + 6  # deadline 8 s after the section starts, plus publish
