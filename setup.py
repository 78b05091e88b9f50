"""Build hook for the optional CUDA C++ extension ``zu_fast._C``; all metadata is in pyproject.toml.

What gets built:

* default (``ZU_FAST_BUILD_CUDA`` unset or ``0``): nothing — a pure-Python install that works
  everywhere (no nvcc needed, seconds to install). The CUDA sources ship as ``zu_fast.csrc`` and
  ``zu_fast.ops.cuda_backend`` JIT-builds them with ninja on first use on a GPU machine (about a
  minute once, then cached in torch's extensions directory). Building by default would make every
  ``pip install`` (CI included, on 2 cores) wait minutes for nvcc.
* ``ZU_FAST_BUILD_CUDA=auto``: prebuild when nvcc and a CUDA build of torch are both found at build
  time, else install pure Python.
* ``ZU_FAST_BUILD_CUDA=1``: prebuild ``zu_fast._C`` with torch's ``CUDAExtension``. Needs nvcc and
  a CUDA build of torch importable at build time, so install without build isolation::

      ZU_FAST_BUILD_CUDA=1 pip install --no-build-isolation -e .

  Target GPUs: ``TORCH_CUDA_ARCH_LIST`` if set (e.g. ``"8.0;9.0a"``), else sm_80, sm_90a and
  compute_90 PTX (for newer GPUs).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from setuptools import setup

HERE = Path(__file__).resolve().parent
SOURCES = ["csrc/bindings.cpp", "csrc/cov_accumulate.cu", "csrc/multiplicative_update.cu"]
DEFAULT_ARCH_FLAGS = [
    "-gencode=arch=compute_80,code=sm_80",
    "-gencode=arch=compute_90a,code=sm_90a",
    "-gencode=arch=compute_90,code=compute_90",
]


def _build_mode() -> str:
    flag = os.environ.get("ZU_FAST_BUILD_CUDA", "").strip().lower()
    if flag in ("1", "true", "yes", "on"):
        return "on"
    if flag == "auto":
        return "auto"
    return "off"


def _toolkit_root(nvcc: str) -> str | None:
    """Directory with include/cuda_runtime.h for ``nvcc`` (which may be a wrapper script)."""
    guess = Path(nvcc).resolve().parent.parent
    if (guess / "include" / "cuda_runtime.h").is_file():
        return str(guess)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "p.cu").write_text("")
        out = subprocess.run([nvcc, "-dryrun", "-c", str(Path(tmp) / "p.cu"), "-o", str(Path(tmp) / "p.o")],
                             capture_output=True, text=True)
    for line in (out.stdout + out.stderr).splitlines():
        if "_HERE_=" in line:
            root = Path(line.split("_HERE_=", 1)[1].strip()).resolve().parent
            if (root / "include" / "cuda_runtime.h").is_file():
                return str(root)
    return None


def _cuda_extension_kwargs() -> dict:
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension, CUDAExtension
    except ImportError as e:
        raise RuntimeError(
            "ZU_FAST_BUILD_CUDA=1 needs torch importable while building: install torch first and use "
            "`pip install --no-build-isolation .`"
        ) from e
    if torch.version.cuda is None:
        raise RuntimeError("ZU_FAST_BUILD_CUDA=1 but the installed torch is not a CUDA build")
    nvcc = shutil.which("nvcc") or (
        os.path.join(os.environ["CUDA_HOME"], "bin", "nvcc") if os.environ.get("CUDA_HOME") else None
    )
    if nvcc is None or not os.path.exists(nvcc):
        raise RuntimeError("ZU_FAST_BUILD_CUDA=1 but nvcc was not found (set CUDA_HOME or PATH)")
    from torch.utils import cpp_extension

    home = cpp_extension.CUDA_HOME
    if not (home and (Path(home) / "include" / "cuda_runtime.h").is_file()):
        root = _toolkit_root(nvcc)  # torch guessed from a wrapper's location: use the real toolkit
        if root is not None:
            cpp_extension.CUDA_HOME = root
            os.environ["CUDA_HOME"] = root
    nvcc_flags = ["-O3", "-lineinfo"]
    if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        nvcc_flags += DEFAULT_ARCH_FLAGS
    ext = CUDAExtension(
        name="zu_fast._C",
        sources=SOURCES,
        include_dirs=[str(HERE / "csrc")],
        extra_compile_args={"cxx": ["-O3"], "nvcc": nvcc_flags},
    )
    return {"ext_modules": [ext], "cmdclass": {"build_ext": BuildExtension}}


def _setup_kwargs() -> dict:
    mode = _build_mode()
    if mode == "off":
        return {}
    if mode == "on":
        return _cuda_extension_kwargs()
    try:  # auto
        return _cuda_extension_kwargs()
    except RuntimeError as e:
        print(f"zu_fast: not building the CUDA extension ({e}); it can still be JIT-built on first use")
        return {}


setup(**_setup_kwargs())
