"""Atomic folder writes: a reader never sees a half-written cache entry or saved edit."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file


def write_folder(
    path: str | os.PathLike,
    tensors_file: str,
    tensors: dict[str, torch.Tensor],
    json_files: dict[str, Any],
) -> Path:
    """Write ``tensors`` to ``path/tensors_file`` and each ``json_files[name]`` to ``path/name``.

    Everything is written into a temporary sibling folder that is then renamed into place, so the
    folder appears whole or not at all (an existing one is replaced).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=path.parent))
    try:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp / tensors_file))
        for name, data in json_files.items():
            (tmp / name).write_text(json.dumps(data, indent=2, sort_keys=True))
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return path
