"""CUDA C++ extension backend registration (sources in csrc/).

The extension is found in this order, once, on first use:

1. ``zu_fast._C`` — prebuilt by ``setup.py`` when installed with ``ZU_FAST_BUILD_CUDA=1``;
2. a JIT build with ``torch.utils.cpp_extension.load`` (ninja + nvcc) of the csrc/ sources shipped
   as the package ``zu_fast.csrc`` (or the repository's ``csrc/`` in an editable install),
   compiled for the GPU in use (sm_90a on Hopper) and cached in torch's extensions directory
   (``TORCH_EXTENSIONS_DIR``), so only the first process pays for the build (about a minute).
   ``ZU_FAST_CUDA_JIT=0`` disables it.

Only one process builds at a time: the build holds ``zu_fast_build.lock`` in the build directory,
a file naming the builder (PID, host, process start time). A build killed at a time limit leaves
that file and torch's own ``lock`` behind; torch releases before about 2.10 wait for their
``lock`` file to disappear (FileBaton: forever, for a killed builder; later releases hold an OS
lock the kernel drops). The next build finds the holder gone (no such process on this host, or
another process under a reused PID), removes both and builds (``BuildLock``). A live builder is
waited for.

Nothing here imports the root package ``zu_fast`` (ops sit below it): the prebuilt module and the
sources are found by path, next to this package.

No static preference: the registry picks "cuda" on a GPU only where measured_preferences.json
lists it for that device (its correctness tests passed there and it beat torch in the GPU check's
tables; preferences.py), or when ``ZU_FAST_BACKEND=cuda`` (or ``use_backend("cuda")``) asks for it.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import logging
import math
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from .cov_accumulate import check_cov_args, cov_accumulate_torch
from .multiplicative_update import check_update_args, edit_seed, multiplicative_update_torch
from .registry import register_backend

JIT_ENV = "ZU_FAST_CUDA_JIT"
JIT_NAME = "zu_fast_cuda_ext"
SOURCES = ("bindings.cpp", "cov_accumulate.cu", "multiplicative_update.cu")
HEADERS = ("common.cuh", "zu_fast_kernels.h")

PACKAGE_DIR = Path(__file__).resolve().parents[1]  # the installed (or editable) zu_fast package directory
PREBUILT_NAME = "zu_fast._C"
LOCK_FILE = "zu_fast_build.lock"
FOREIGN_LOCK_STALE_S = 1800.0  # a lock written on another host (shared filesystem) counts as stale after this

log = logging.getLogger(__name__)
_lock = threading.Lock()
_ext = None
_ext_origin = ""  # "prebuilt" or "jit"
_error: str | None = None  # why the extension could not be had (set once tried)


# ------------------------------------------------------------------------------ locating things
def source_dir() -> Path | None:
    """Directory holding the CUDA C++ sources: the installed zu_fast/csrc (package data), else the
    repository's csrc/ (an editable install maps zu_fast.csrc there)."""
    for d in (PACKAGE_DIR / "csrc", PACKAGE_DIR.parent / "csrc"):
        if all((d / f).is_file() for f in SOURCES + HEADERS):
            return d
    return None


def prebuilt_path() -> Path | None:
    """The prebuilt extension zu_fast._C (setup.py with ZU_FAST_BUILD_CUDA=1), if installed."""
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        f = PACKAGE_DIR / f"_C{suffix}"
        if f.is_file():
            return f
    return None


def _load_prebuilt():
    """Load zu_fast._C from its file (registered under its name), without importing the root package."""
    if PREBUILT_NAME in sys.modules:
        return sys.modules[PREBUILT_NAME]
    path = prebuilt_path()
    if path is None:
        raise ImportError(f"no _C extension module in {PACKAGE_DIR}")
    spec = importlib.util.spec_from_file_location(PREBUILT_NAME, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    sys.modules[PREBUILT_NAME] = mod
    return mod


def find_nvcc() -> str | None:
    """nvcc from CUDA_HOME/CUDA_PATH, else PATH, else /usr/local/cuda."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home and (Path(home) / "bin" / "nvcc").is_file():
            return str(Path(home) / "bin" / "nvcc")
    found = shutil.which("nvcc")
    if found:
        return found
    default = Path("/usr/local/cuda/bin/nvcc")
    return str(default) if default.is_file() else None


def cuda_toolkit_root(nvcc: str | None = None) -> str | None:
    """The toolkit directory (with include/cuda_runtime.h) of ``nvcc``.

    ``nvcc`` may be a wrapper script (e.g. /usr/local/bin/nvcc), for which torch's guess
    dirname(dirname(nvcc)) is wrong; nvcc's own dry run names the directory it really lives in.
    """
    nvcc = nvcc or find_nvcc()
    if nvcc is None:
        return None
    guess = Path(nvcc).resolve().parent.parent
    if (guess / "include" / "cuda_runtime.h").is_file():
        return str(guess)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            src = Path(tmp) / "probe.cu"
            src.write_text("")
            out = subprocess.run(
                [nvcc, "-dryrun", "-c", str(src), "-o", str(Path(tmp) / "probe.o")],
                capture_output=True, text=True, timeout=60,
            )
        for line in (out.stdout + out.stderr).splitlines():
            if "_HERE_=" in line:
                root = Path(line.split("_HERE_=", 1)[1].strip()).resolve().parent
                if (root / "include" / "cuda_runtime.h").is_file():
                    return str(root)
    except (OSError, subprocess.SubprocessError):
        pass
    return None


def cuda_include_dirs(nvcc: str | None = None) -> list[str]:
    """Include directories of the CUDA toolkit (for compiling bindings.cpp with the host compiler)."""
    root = cuda_toolkit_root(nvcc)
    if root is None:
        return []
    dirs = [Path(root) / "include", Path(root) / "targets" / "x86_64-linux" / "include"]
    return [str(d) for d in dirs if d.is_dir()]


def _fix_torch_cuda_home() -> None:
    """Point torch.utils.cpp_extension at the real toolkit when its guess lacks CUDA's headers."""
    from torch.utils import cpp_extension

    home = cpp_extension.CUDA_HOME
    if home and (Path(home) / "include" / "cuda_runtime.h").is_file():
        return
    root = cuda_toolkit_root()
    if root is not None:
        cpp_extension.CUDA_HOME = root
        os.environ.setdefault("CUDA_HOME", root)


def arch_flags(capability: tuple[int, int]) -> list[str]:
    """nvcc -gencode flags for one device: sm_90a on Hopper (9.0), sm_XY elsewhere (needs >= 8.0)."""
    major, minor = capability
    if (major, minor) == (9, 0):
        return ["-gencode=arch=compute_90a,code=sm_90a"]
    return [f"-gencode=arch=compute_{major}{minor},code=sm_{major}{minor}"]


# ------------------------------------------------------------------------------ loading
def _cuda_device_problem() -> str | None:
    if not torch.cuda.is_available():
        return "no CUDA device (torch.cuda.is_available() is False)"
    if torch.version.cuda is None:
        return "torch is not a CUDA build"
    major, _ = torch.cuda.get_device_capability()
    if major < 8:
        return f"needs compute capability >= 8.0 (mma.sync bf16, cp.async); device has {major}.x"
    return None


def _ninja_available() -> bool:
    if shutil.which("ninja"):
        return True
    try:
        import ninja  # noqa: F401  (the PyPI wheel puts the binary next to the interpreter)

        return True
    except ImportError:
        return False


# ------------------------------------------------------------------------------ the build lock
def _proc_start(pid: int) -> str | None:
    """Start time of process ``pid`` (clock ticks since boot, /proc/<pid>/stat field 22), or None."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[-1].split()
    return fields[19] if len(fields) > 19 else None


def _pid_alive(pid: int) -> bool:
    """Whether process ``pid`` runs on this host (a zombie, killed but not yet reaped, does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: it exists
        return True
    except OSError:
        return False
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0]
        return state not in ("Z", "X")
    except (OSError, IndexError):
        return True


class BuildLock:
    """An exclusive lock on a build directory that names its holder, so a dead holder's lock is
    recognised and broken instead of waited on forever (torch's own FileBaton has no such rule).

    The lock file holds ``pid host start``. It is stale when the host is this one and the PID does
    not run, or runs with another start time (a reused PID); a lock from another host (a shared
    filesystem) is stale after FOREIGN_LOCK_STALE_S. Breaking one is serialised through a second,
    short-lived file so that two waiters cannot both remove it (one of them a fresh lock).
    """

    def __init__(self, directory: str | os.PathLike, poll_s: float = 0.2):
        self.dir = Path(directory)
        self.path = self.dir / LOCK_FILE
        self.poll_s = poll_s
        self.broke: list[str] = []  # holders whose stale locks this process removed

    def _me(self) -> str:
        return f"{os.getpid()} {socket.gethostname()} {_proc_start(os.getpid()) or '-'}"

    def holder_is_stale(self, text: str) -> bool:
        parts = text.split()
        if len(parts) < 2:  # being written right now, or garbage: judge by age
            return self._age() > 10.0
        try:
            pid = int(parts[0])
        except ValueError:
            return self._age() > 10.0
        host, start = parts[1], parts[2] if len(parts) > 2 else "-"
        if host != socket.gethostname():
            return self._age() > FOREIGN_LOCK_STALE_S
        if not _pid_alive(pid):
            return True
        now = _proc_start(pid)
        return start != "-" and now is not None and now != start

    def _age(self) -> float:
        try:
            return time.time() - self.path.stat().st_mtime
        except OSError:
            return 0.0

    def _break(self, seen: str) -> None:
        breaker = self.dir / (LOCK_FILE + ".break")
        try:
            fd = os.open(breaker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:  # a breaker killed in these few lines: its file is old
                if time.time() - breaker.stat().st_mtime > 30:
                    breaker.unlink()
            except OSError:
                pass
            return
        try:
            os.close(fd)
            try:
                if self.path.read_text() == seen:  # still the stale holder, not a fresh lock
                    self.path.unlink()
                    self.broke.append(seen)
                    log.warning("zu_fast: removed the CUDA build lock of a build that no longer runs (%s)", seen)
            except FileNotFoundError:
                pass
        finally:
            breaker.unlink(missing_ok=True)

    def acquire(self, timeout_s: float | None = None) -> None:
        """Take the lock, waiting while a live holder has it (TimeoutError after ``timeout_s``)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        t0 = time.monotonic()
        while True:
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                try:
                    seen = self.path.read_text()
                except FileNotFoundError:
                    continue
                if self.holder_is_stale(seen):
                    self._break(seen)
                    continue
                if timeout_s is not None and time.monotonic() - t0 > timeout_s:
                    raise TimeoutError(f"{self.path} is held by a running build ({seen.strip()})") from None
                time.sleep(self.poll_s)
                continue
            with os.fdopen(fd, "w") as f:
                f.write(self._me())
            return

    def release(self) -> None:
        try:
            if self.path.read_text() == self._me():
                self.path.unlink()
        except FileNotFoundError:
            pass

    def __enter__(self) -> BuildLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def build_directory() -> Path:
    """Where the JIT build goes: torch's extensions directory for JIT_NAME (TORCH_EXTENSIONS_DIR)."""
    from torch.utils import cpp_extension

    return Path(cpp_extension._get_build_directory(JIT_NAME, verbose=False))


def _jit_build():
    from torch.utils import cpp_extension

    src = source_dir()
    if src is None:
        raise RuntimeError("CUDA sources (csrc/) not found in the installed package or the repository")
    if find_nvcc() is None:
        raise RuntimeError("nvcc not found (set CUDA_HOME or put nvcc on PATH)")
    if not cpp_extension.is_ninja_available():  # what torch itself will run
        raise RuntimeError("ninja not found (pip install ninja)")
    _fix_torch_cuda_home()
    flags = ["-O3", "-lineinfo", *arch_flags(torch.cuda.get_device_capability())]
    build_dir = build_directory()
    with BuildLock(build_dir):
        # Every zu_fast build holds BuildLock, so with it held a torch `lock` file here is the
        # leftover of a killed build: torch would wait on it forever.
        stale = build_dir / "lock"
        if stale.exists():
            log.warning("zu_fast: removing torch's build lock %s left by a killed build", stale)
            stale.unlink(missing_ok=True)
        return cpp_extension.load(
            name=JIT_NAME,
            sources=[str(src / f) for f in SOURCES],
            extra_include_paths=[str(src)],
            extra_cflags=["-O3"],
            extra_cuda_cflags=flags,
            build_directory=str(build_dir),
            verbose=os.environ.get("ZU_FAST_CUDA_VERBOSE", "") == "1",
        )


def load_extension():
    """The compiled module (prebuilt zu_fast._C, else a cached JIT build); raises if neither works."""
    global _ext, _ext_origin, _error
    if _ext is not None:
        return _ext
    with _lock:
        if _ext is not None:
            return _ext
        if _error is not None:
            raise RuntimeError(_error)
        problem = _cuda_device_problem()
        if problem is not None:
            _error = problem
            raise RuntimeError(problem)
        reasons = []
        try:
            _ext, _ext_origin = _load_prebuilt(), "prebuilt"
            return _ext
        except ImportError as e:
            reasons.append(f"no prebuilt zu_fast._C ({e})")
        if os.environ.get(JIT_ENV, "1").strip() == "0":
            reasons.append(f"JIT build disabled ({JIT_ENV}=0)")
        else:
            try:
                _ext, _ext_origin = _jit_build(), "jit"
                return _ext
            except Exception as e:  # a failed build means "not available", never a crash
                reasons.append(f"JIT build failed: {type(e).__name__}: {str(e).strip()[-2000:]}")
        _error = "; ".join(reasons)
        raise RuntimeError(_error)


def is_available() -> bool:
    try:
        load_extension()
        return True
    except Exception:
        return False


def why_unavailable() -> str:
    if _ext is not None:
        return ""
    if _error is None:
        is_available()
    return _error or ""


def build_status() -> dict:
    """How the CUDA extension would be obtained here, without building anything (for `zu-fast info`)."""
    nvcc = find_nvcc()
    src = source_dir()
    prebuilt = prebuilt_path() is not None
    device_problem = _cuda_device_problem()
    jit_enabled = os.environ.get(JIT_ENV, "1").strip() != "0"
    ninja = _ninja_available()
    jit_able = jit_enabled and nvcc is not None and ninja and src is not None and torch.version.cuda is not None
    if _ext is not None:
        reason = f"loaded ({_ext_origin})"
    elif _error is not None:
        reason = _error
    elif device_problem is not None:
        reason = device_problem
    elif prebuilt:
        reason = "prebuilt zu_fast._C present (loaded on first use)"
    elif jit_able:
        reason = "will JIT-build on first use (about a minute, then cached)"
    else:
        missing = [name for name, ok in (("nvcc", nvcc), ("ninja", ninja), ("csrc sources", src),
                                          ("CUDA build of torch", torch.version.cuda),
                                          (f"{JIT_ENV}!=0", jit_enabled)) if not ok]
        reason = "cannot JIT-build: missing " + ", ".join(missing)
    return {
        "loaded": _ext is not None,
        "origin": _ext_origin,
        "prebuilt": prebuilt,
        "jit_able": jit_able,
        "nvcc": nvcc,
        "cuda_toolkit": cuda_toolkit_root(nvcc) if nvcc else None,
        "ninja": ninja,
        "sources": str(src) if src else None,
        "cuda_device": device_problem is None,
        "reason": reason,
    }


# ------------------------------------------------------------------------------ the ops
def cov_accumulate_cuda(kk, ks, n, keys, mask=None, *, values=None, vk=None, vs=None) -> None:
    """cov_accumulate on the CUDA extension: tensor-core KᵀK (upper tiles), mask applied in-kernel.

    Inputs the kernels do not take (a last dimension with a stride, values of another dtype than
    keys, accumulators without a unit column stride) go to the plain-PyTorch default.
    """
    check_cov_args(kk, ks, n, keys, mask, values, vk, vs)
    d_ff = keys.shape[-1]
    rows = math.prod(keys.shape[:-1])  # explicit: reshape(-1, 0) is ambiguous when d_ff == 0
    k2 = keys.reshape(rows, d_ff)  # a view for hook outputs; copies only if the leading dims can't merge
    v2 = values.reshape(rows, values.shape[-1]) if values is not None else None

    def unit_col(t):
        return t.shape[-1] <= 1 or t.stride(-1) == 1

    ok = unit_col(k2) and unit_col(kk) and ks.is_contiguous()
    if v2 is not None:
        ok = ok and v2.dtype == k2.dtype and unit_col(v2) and unit_col(vk) and vs.is_contiguous()
        ok = ok and vs.dtype in (torch.float32, torch.float64)
    if not ok:
        cov_accumulate_torch(kk, ks, n, keys, mask, values=values, vk=vk, vs=vs)
        return
    m = None
    if mask is not None:
        m = mask.reshape(-1)
        if m.dtype not in (torch.bool, torch.uint8):
            m = m != 0
        elif m.dtype == torch.uint8:
            m = m != 0  # any non-zero byte keeps the row
        m = m.to(device=keys.device).contiguous()
    load_extension().cov_accumulate(kk, ks, n, k2, m, v2, vk, vs)


def default_chunk_cols(d_in: int) -> int:
    """Columns per chunk: the staging buffer (W's dtype) stays at or below 1/16 of W."""
    c = max(1, d_in // 16)
    if c >= 128:
        c -= c % 128
    return c


def multiplicative_update_cuda(
    W: torch.Tensor,
    D: torch.Tensor,
    *,
    form: str = "multiplier",
    chunk_cols: int | None = None,
    stochastic_rounding: bool = False,
    seed: int | None = None,
) -> torch.Tensor:
    """W ← D W (``form="delta"``: W ← W + D W, D being E = D − I) in place on the CUDA extension.

    Every kernel computes W + E·W (the multiplier form subtracts the identity on the fly), so the
    tensor-core truncation of the bf16 kernel touches only E·W. W needs a unit stride in one of
    its two dimensions (row- or column-major, e.g. the transpose of a weight); any other W goes
    to the plain-PyTorch default. Stochastic rounding: the counter-based hash shared with the
    default, seeded by ``seed`` or by ``edit_seed(D)``; no random generator is touched.
    """
    check_update_args(W, D, form, seed)
    d, d_in = W.shape
    if W.numel() == 0:
        return W
    if not (W.stride(0) == 1 or W.stride(1) == 1 or d == 1 or d_in == 1):
        return multiplicative_update_torch(W, D, form=form, chunk_cols=chunk_cols,
                                           stochastic_rounding=stochastic_rounding, seed=seed)
    acc = torch.float64 if D.dtype == torch.float64 else torch.float32
    Dc = D.to(device=W.device, dtype=acc).contiguous()
    sr = bool(stochastic_rounding) and W.dtype != torch.float32
    if sr and seed is None:
        seed = edit_seed(D)
    chunk = int(chunk_cols) if chunk_cols is not None else default_chunk_cols(d_in)
    with torch.no_grad():
        load_extension().multiplicative_update_(W, Dc, chunk, sr, int(seed or 0), form == "delta")
    return W


def _status() -> tuple[bool | None, str]:
    """What is known without building: loaded, failed, no usable device, or how it would be had."""
    if _ext is not None:
        return True, ""
    if _error is not None:
        return False, _error
    problem = _cuda_device_problem()
    if problem is not None:
        return False, problem
    return None, build_status()["reason"]


# Preferred per device by measurement only (preferences.py; cov_table.py, update_table.py), no
# prefer_on. Availability means a build (minutes): ``status`` lets info() describe it without one.
for _op, _fn in (("cov_accumulate", cov_accumulate_cuda), ("multiplicative_update_", multiplicative_update_cuda)):
    register_backend(_op, "cuda", _fn, device_types=("cuda",), available=is_available,
                     why_unavailable=why_unavailable, status=_status)
