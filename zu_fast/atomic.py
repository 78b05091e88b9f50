"""Safe folder writes and checked reads: zu_fast never deletes what it did not write.

Writing (``write_folder``, ``write_into``):
- a folder that does not exist, or an empty one, is written whole into a temporary sibling that is
  then renamed into place: a reader sees all of it or nothing;
- a non-empty folder is refused (``ZuFastError`` naming it and what it holds) unless
  ``overwrite=True``, and even then only the files zu_fast writes are replaced, each by an atomic
  rename from a temporary folder inside it (the manifest JSON last); every other file is left as it is.
  Each write carries a random ``write_id`` in the JSON and in the safetensors header, so a reader
  can tell files from two different writes apart (an overwrite interrupted between two renames).

Reading (``read_json``, ``read_tensors``): a missing, truncated or corrupted file raises
``ZuFastError`` naming the path and what is wrong, never a raw SafetensorError / JSONDecodeError.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .errors import ZuFastError

WRITE_ID = "zu_fast_write_id"  # key in the safetensors header metadata and in the JSON manifest


def check_target(path: str | os.PathLike, *, overwrite: bool = False, what: str = "output",
                 own_files: Iterable[str] = ()) -> Path:
    """Raise ``ZuFastError`` unless ``path`` may be written: absent, an empty folder, or, with
    ``overwrite``, an existing folder (whose other files will be kept). Cheap: call it before long work."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ZuFastError(f"{what} path {str(path)!r} is a file, not a folder; choose a folder")
    if path.is_dir() and not overwrite:
        held = sorted(p.name for p in path.iterdir())
        if held:
            shown = ", ".join(held[:5]) + (f" and {len(held) - 5} more" if len(held) > 5 else "")
            own = f" ({', '.join(own_files)})" if own_files else ""
            raise ZuFastError(
                f"{what} folder {str(path)!r} is not empty (it holds {shown}); zu_fast never deletes what it did "
                f"not write: choose a new or empty folder, or pass overwrite=True (command line: --overwrite) to "
                f"replace only zu_fast's own files{own} in it"
            )
    parent = path.parent if not path.exists() else path
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not os.access(parent, os.W_OK):
        raise ZuFastError(f"cannot write {what} to {str(path)!r}: {str(parent)!r} is not writable")
    return path


def _umask_mode(tmp: Path) -> None:
    """mkdtemp makes 0700 folders; give the finished folder the permissions a plain mkdir would."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)


def write_into(
    path: str | os.PathLike,
    writer: Callable[[Path], None],
    *,
    overwrite: bool = False,
    what: str = "output",
    last: Iterable[str] = (),
) -> Path:
    """Let ``writer(tmp)`` write files into a temporary folder, then move them to ``path`` safely.

    ``path`` absent or empty: the temporary sibling folder is renamed into place (all or nothing).
    ``path`` non-empty: refused unless ``overwrite``; then each written file replaces its namesake by an
    atomic rename (the names in ``last`` after the others) and nothing else in ``path`` is touched.
    """
    path = Path(path)
    check_target(path, overwrite=overwrite, what=what)
    whole = not path.exists() or not any(path.iterdir())
    if whole:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.zu_fast-tmp-", dir=path.parent))
    else:
        tmp = Path(tempfile.mkdtemp(prefix=".zu_fast-tmp-", dir=path))
    try:
        writer(tmp)
        if whole:
            _umask_mode(tmp)
            os.replace(tmp, path)  # POSIX: replaces an empty folder atomically
        else:
            last = list(last)
            names = sorted(p.name for p in tmp.iterdir())
            for name in [n for n in names if n not in last] + [n for n in last if n in names]:
                dst = path / name
                if dst.is_dir():
                    raise ZuFastError(f"cannot write {dst}: a folder of that name exists (zu_fast will not delete it)")
                os.replace(tmp / name, dst)  # atomic per file
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)  # only our own temporary folder
    return path


def write_folder(
    path: str | os.PathLike,
    tensors_file: str,
    tensors: dict[str, torch.Tensor],
    json_files: dict[str, Any],
    *,
    overwrite: bool = False,
    what: str = "output",
) -> Path:
    """Write ``tensors`` to ``path/tensors_file`` and each ``json_files[name]`` (a dict) to ``path/name``.

    Safe as described in the module docstring: a new or empty folder appears whole or not at all; a
    non-empty one is refused unless ``overwrite``, and then only these files are replaced (JSON last).
    Every JSON gets ``"zu_fast_write_id"``, the same id as the safetensors header (see ``read_tensors``).
    """
    write_id = uuid.uuid4().hex

    def writer(tmp: Path) -> None:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp / tensors_file),
                  metadata={WRITE_ID: write_id})
        for name, data in json_files.items():
            (tmp / name).write_text(json.dumps({**data, WRITE_ID: write_id}, indent=2, sort_keys=True))

    return write_into(path, writer, overwrite=overwrite, what=what, last=list(json_files))


def read_json(path: str | os.PathLike, what: str) -> dict[str, Any]:
    """The JSON object in file ``path``; ZuFastError naming the file if it is missing or corrupted."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ZuFastError(f"{path.parent} is not a {what} folder (no {path.name})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ZuFastError(f"{path}: cannot be read ({e})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ZuFastError(f"{path}: corrupted, not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") \
            from None
    if not isinstance(data, dict):
        raise ZuFastError(f"{path}: corrupted, expected a JSON object, found {type(data).__name__}")
    return data


def read_tensors(path: str | os.PathLike, write_id: str | None = None, device: str = "cpu") -> dict[str, torch.Tensor]:
    """All tensors of safetensors file ``path``; ZuFastError naming it when it is missing, truncated,
    corrupted, or (``write_id`` given) from another write than the JSON next to it."""
    path = Path(path)
    if not path.exists():
        raise ZuFastError(f"{path} is missing (the folder is incomplete)")
    try:
        with safe_open(str(path), framework="pt", device=device) as f:
            got = (f.metadata() or {}).get(WRITE_ID)
            if write_id is not None and got != write_id:
                raise ZuFastError(
                    f"{path} does not belong with the JSON next to it (write ids {got} and {write_id}): the folder "
                    "mixes files of two writes (an interrupted overwrite?); write it again"
                )
            return {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        if isinstance(e, ZuFastError):
            raise
        raise ZuFastError(f"{path}: corrupted or truncated safetensors file ({e})") from None


__all__ = ["WRITE_ID", "check_target", "read_json", "read_tensors", "write_folder", "write_into"]
