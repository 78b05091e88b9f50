"""The CUDA extension's build lock (zu_fast/ops/cuda_backend.py: BuildLock).

Issue 27: a GPU-check section killed at its time limit during the JIT build left torch's lock file,
and torch (FileBaton, before about 2.10) waits for that file to disappear: every later
load_extension() hung. The build now holds a lock that names its builder (PID, host, start time);
a lock whose builder is gone is broken, and torch's leftover lock with it. No GPU or nvcc is used:
torch's loader is replaced by one that behaves like the old FileBaton.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from zu_fast.ops import cuda_backend
from zu_fast.ops.cuda_backend import LOCK_FILE, BuildLock

HOLDER = r"""
import sys, time
from pathlib import Path
from zu_fast.ops.cuda_backend import BuildLock, build_directory
d = build_directory()
BuildLock(d).acquire()
(Path(d) / "lock").write_text("")  # torch's own lock, as a build in progress has it
print(d, flush=True)
time.sleep(600)
"""

LOADER = r"""
import os, sys, types
import torch
from torch.utils import cpp_extension
from torch.utils.file_baton import FileBaton
from zu_fast.ops import cuda_backend as cb

def old_torch_load(name, sources, build_directory, **kwargs):
    # torch before ~2.10: whoever creates build_directory/lock builds, everyone else waits until the
    # file is gone (forever, if its builder was killed)
    baton = FileBaton(os.path.join(build_directory, "lock"))
    if baton.try_acquire():
        try:
            return types.SimpleNamespace(origin="built here")
        finally:
            baton.release()
    baton.wait()
    return types.SimpleNamespace(origin="waited")

cpp_extension.load = old_torch_load
if sys.argv[1] == "direct":  # what a plain torch build would do with the leftover lock
    print(old_torch_load("x", [], str(cb.build_directory())).origin)
    sys.exit(0)
cb._cuda_device_problem = lambda: None  # pretend a GPU, with nvcc and ninja
cb.find_nvcc = lambda: "/usr/bin/true"
cb._fix_torch_cuda_home = lambda: None
cpp_extension.is_ninja_available = lambda: True
torch.cuda.get_device_capability = lambda *a: (9, 0)
ext = cb.load_extension()
d = cb.build_directory()
print(ext.origin, (d / cb.LOCK_FILE).exists(), (d / "lock").exists())
"""


def _env(tmp_path) -> dict:
    return {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path / "ext"), "ZU_FAST_CUDA_JIT": "1"}


def _start_holder(tmp_path) -> tuple[subprocess.Popen, str]:
    p = subprocess.Popen([sys.executable, "-c", HOLDER], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env=_env(tmp_path))
    line = p.stdout.readline().strip()
    assert line, p.stderr.read()[-2000:]
    return p, line


def _kill(p: subprocess.Popen) -> None:
    p.send_signal(signal.SIGKILL)
    p.wait(timeout=30)  # reaped: the PID no longer runs


def test_killed_build_does_not_hang_the_next_one(tmp_path):
    """A builder killed mid-build leaves both lock files; the next load_extension() finds the
    builder gone, removes them and builds (well inside the timeout instead of waiting forever)."""
    holder, build_dir = _start_holder(tmp_path)
    _kill(holder)
    assert os.path.exists(os.path.join(build_dir, LOCK_FILE)) and os.path.exists(os.path.join(build_dir, "lock"))
    # the failure this prevents: the old torch loader waits on the leftover lock
    with pytest.raises(subprocess.TimeoutExpired):
        subprocess.run([sys.executable, "-c", LOADER, "direct"], env=_env(tmp_path), capture_output=True, timeout=6)
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-c", LOADER, "load"], env=_env(tmp_path), capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.split()[-4:] == ["built", "here", "False", "False"], r.stdout  # built; both locks gone
    assert "no longer runs" in r.stderr and "left by a killed build" in r.stderr
    assert time.monotonic() - t0 < 60


def test_a_live_builder_is_waited_for(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    holder, build_dir = _start_holder(tmp_path)
    try:
        lock = BuildLock(build_dir, poll_s=0.05)
        with pytest.raises(TimeoutError, match="held by a running build"):
            lock.acquire(timeout_s=1.0)
        assert lock.broke == []
    finally:
        _kill(holder)
    lock.acquire(timeout_s=10.0)  # the holder is gone: its lock is broken, ours taken
    try:
        assert len(lock.broke) == 1 and lock.broke[0].split()[0] == str(holder.pid)
        assert lock.path.read_text().split()[0] == str(os.getpid())
    finally:
        lock.release()
    assert not lock.path.exists()


def test_stale_rules(tmp_path):
    lock = BuildLock(tmp_path)
    me = lock._me()
    assert not lock.holder_is_stale(me)  # this process: alive, same start time
    pid, host, start = me.split()
    if start != "-":
        assert lock.holder_is_stale(f"{pid} {host} {int(start) + 1}")  # a reused PID: another process
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    assert lock.holder_is_stale(f"{dead.pid} {socket.gethostname()} -")
    lock.path.write_text(f"{os.getpid()} some-other-host 1")  # a shared filesystem: judged by age
    assert not lock.holder_is_stale(lock.path.read_text())
    old = time.time() - cuda_backend.FOREIGN_LOCK_STALE_S - 10
    os.utime(lock.path, (old, old))
    assert lock.holder_is_stale(lock.path.read_text())
