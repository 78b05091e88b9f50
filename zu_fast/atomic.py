"""Safe folder writes and checked reads: zu_fast never deletes what it did not write.

Writing (``write_folder``, ``write_into``):
- a folder that does not exist, or an empty one, is written whole into a temporary sibling that is
  then renamed into place: a reader sees all of it or nothing;
- a non-empty folder is refused (``ZuFastError`` naming it and what it holds) unless
  ``overwrite=True``, and even then only the files zu_fast writes are replaced, each by an atomic
  rename from a temporary folder inside it (the manifest JSON last); every other file is left as it is.
  Each write carries a random ``write_id`` in the JSON and in the safetensors header, so a reader
  can tell files from two different writes apart (an overwrite interrupted between two renames).

Every file is flushed to disk (fsync) before the rename that publishes it, so a crash or power loss
leaves the old state or the new one, never a half-written file under the final name. The JSON of a
``write_folder`` records the size and SHA-256 of the tensors file (``"zu_fast_files"``), so a file cut
short or damaged later (a crash of the machine, a full disk, a bad copy) is detected on reading.

A full disk (``ENOSPC``/``EDQUOT``, however the writer reports it) raises ``ZuFastError`` naming the
folder, the bytes needed and the bytes free; the temporary folder is removed, so nothing partial is
left behind, and the files already in the folder are untouched. When the size is known beforehand
and the filesystem reports less free space, the write is refused before anything is written.

Reading (``read_json``, ``read_tensors``): a missing, truncated or corrupted file raises
``ZuFastError`` naming the path and what is wrong, never a raw SafetensorError / JSONDecodeError.
``move_aside`` renames a bad folder of zu_fast's (a corrupted cache entry) out of the way; nothing is
deleted.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .errors import ZuFastError

WRITE_ID = "zu_fast_write_id"  # key in the safetensors header metadata and in the JSON manifest
FILES_KEY = "zu_fast_files"  # key in the JSON manifest: {file name: {"bytes": size, "sha256": digest}}
# How writers report a full disk or quota when they do not raise OSError(ENOSPC) (safetensors' Rust writer
# raises SafetensorError("... No space left on device (os error 28)")).
_DISK_FULL = re.compile(r"no space left on device|disk quota exceeded|os error 28\b|os error 122\b|storagefull|"
                        r"quotaexceeded|filesystemquotaexceeded", re.IGNORECASE)


class DiskFullError(ZuFastError):
    """Not enough disk space (or quota) to write a folder; the message names it and the bytes needed."""


class FolderAppearedError(ZuFastError):
    """The folder being written was created by someone else (another process) while this write was under way."""


def is_disk_full(e: BaseException) -> bool:
    """Whether ``e`` (or an exception it was raised from) says the disk or the quota is full."""
    seen = 0
    while e is not None and seen < 8:
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if _DISK_FULL.search(str(e)):
            return True
        e, seen = e.__cause__ or e.__context__, seen + 1
    return False


def free_bytes(path: str | os.PathLike) -> int | None:
    """Bytes free for an unprivileged writer on the filesystem of ``path`` (its nearest existing ancestor)."""
    p = Path(path)
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return shutil.disk_usage(p).free
    except OSError:
        return None


def _size(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n:,} ({n / scale:.1f} {unit})"
    return f"{n:,}"


def disk_full_error(path: str | os.PathLike, what: str, need: int | None, *, before: bool = False) -> DiskFullError:
    """The ZuFastError for a full disk: which folder, how many bytes were needed and how many are free."""
    free = free_bytes(path)
    when = ("nothing was written" if before else
            "the partial write was removed; files already in the folder are untouched")
    needed = f"about {_size(need)} bytes needed" if need is not None else "its size unknown"
    left = f"{_size(free)} bytes free there" if free is not None else "free space unknown"
    return DiskFullError(
        f"not enough disk space to write the {what} to {str(path)!r}: {needed}, {left} ({when}); free some space "
        "or choose a folder on another disk")


def file_digest(path: str | os.PathLike, chunk: int = 1 << 22) -> dict[str, Any]:
    """``{"bytes": size, "sha256": hex}`` of a file, read in chunks."""
    h = hashlib.sha256()
    n = 0
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk)
            if not block:
                break
            h.update(block)
            n += len(block)
    return {"bytes": n, "sha256": h.hexdigest()}


def _fsync_path(path: Path, directory: bool = False) -> None:
    """Flush a file (or a folder's entries) to disk; filesystems that cannot fsync a folder are let be."""
    try:
        fd = os.open(path, os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as e:
        if not directory and is_disk_full(e):
            raise
    finally:
        os.close(fd)


def _fsync_tree(folder: Path) -> None:
    for p in folder.iterdir():
        if p.is_file():
            _fsync_path(p)
    _fsync_path(folder, directory=True)


def move_aside(path: str | os.PathLike, why: str) -> Path:
    """Rename folder ``path`` to a sibling ``<name>.<why>-<time>-<random>`` (nothing is deleted); the new path."""
    path = Path(path)
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
    dst = path.with_name(f"{path.name}.{why}-{stamp}-{uuid.uuid4().hex[:6]}")
    os.replace(path, dst)
    return dst


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
    need_bytes: int | None = None,
    new_only: bool = False,
) -> Path:
    """Let ``writer(tmp)`` write files into a temporary folder, then move them to ``path`` safely.

    ``path`` absent or empty: the temporary sibling folder is renamed into place (all or nothing); if
    another process creates ``path`` meanwhile, ``FolderAppearedError`` (nothing of ours is left).
    ``path`` non-empty: refused unless ``overwrite``; then each written file replaces its namesake by an
    atomic rename (the names in ``last`` after the others) and nothing else in ``path`` is touched.
    Every file is fsynced before it is renamed into place. ``need_bytes``: the size of what ``writer``
    writes, when known: less free space is refused before writing; a full disk while writing raises a
    ZuFastError naming the folder and the bytes needed (``disk_full_error``), the partial write removed.
    ``new_only`` (a shared cache entry): a non-empty ``path``, found before or at the rename, raises
    ``FolderAppearedError`` (someone else published it) instead of the refusal meant for users' folders.
    """
    path = Path(path)
    if new_only and path.is_dir() and any(path.iterdir()):
        raise FolderAppearedError(f"{what} folder {str(path)!r} was written by another process meanwhile")
    check_target(path, overwrite=overwrite, what=what)
    if need_bytes is not None:
        free = free_bytes(path)
        if free is not None and free < need_bytes:
            raise disk_full_error(path, what, need_bytes, before=True)
    whole = not path.exists() or not any(path.iterdir())
    try:
        if whole:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.zu_fast-tmp-", dir=path.parent))
        else:
            tmp = Path(tempfile.mkdtemp(prefix=".zu_fast-tmp-", dir=path))
    except OSError as e:
        if is_disk_full(e):
            raise disk_full_error(path, what, need_bytes, before=True) from None
        raise
    try:
        try:
            writer(tmp)
            _fsync_tree(tmp)
        except Exception as e:
            if is_disk_full(e):
                raise disk_full_error(path, what, need_bytes) from None
            raise
        if whole:
            _umask_mode(tmp)
            try:
                os.replace(tmp, path)  # POSIX: replaces an empty folder atomically
            except OSError as e:
                if e.errno in (errno.ENOTEMPTY, errno.EEXIST) and path.is_dir():
                    raise FolderAppearedError(
                        f"{what} folder {str(path)!r} was written by another process while this one wrote it; "
                        "nothing of this write was kept") from None
                raise
            _fsync_path(path.parent, directory=True)
        else:
            last = list(last)
            names = sorted(p.name for p in tmp.iterdir())
            for name in [n for n in names if n not in last] + [n for n in last if n in names]:
                dst = path / name
                if dst.is_dir():
                    raise ZuFastError(f"cannot write {dst}: a folder of that name exists (zu_fast will not delete it)")
                os.replace(tmp / name, dst)  # atomic per file
            _fsync_path(path, directory=True)
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
    new_only: bool = False,
) -> Path:
    """Write ``tensors`` to ``path/tensors_file`` and each ``json_files[name]`` (a dict) to ``path/name``.

    Safe as described in the module docstring: a new or empty folder appears whole or not at all; a
    non-empty one is refused unless ``overwrite``, and then only these files are replaced (JSON last).
    Every JSON gets ``"zu_fast_write_id"``, the same id as the safetensors header (see ``read_tensors``),
    and ``"zu_fast_files"``: the size and SHA-256 of the tensors file as written.
    """
    write_id = uuid.uuid4().hex
    need = sum(t.numel() * t.element_size() for t in tensors.values()) + 4096 * (1 + len(tensors)) + \
        sum(len(json.dumps(d, default=str)) * 2 for d in json_files.values())

    def writer(tmp: Path) -> None:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp / tensors_file),
                  metadata={WRITE_ID: write_id})
        files = {tensors_file: file_digest(tmp / tensors_file)}
        for name, data in json_files.items():
            (tmp / name).write_text(json.dumps({**data, WRITE_ID: write_id, FILES_KEY: files}, indent=2,
                                               sort_keys=True))

    return write_into(path, writer, overwrite=overwrite, what=what, last=list(json_files), need_bytes=need,
                      new_only=new_only)


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


def read_tensors(path: str | os.PathLike, write_id: str | None = None, device: str = "cpu", *,
                 recorded: dict[str, Any] | None = None, verify_sha256: bool = False) -> dict[str, torch.Tensor]:
    """All tensors of safetensors file ``path``; ZuFastError naming it when it is missing, truncated,
    corrupted, or (``write_id`` given) from another write than the JSON next to it.

    ``recorded``: the ``{"bytes", "sha256"}`` the JSON recorded for it at write (``FILES_KEY``): a file of
    another size is refused as truncated (or grown) before it is parsed; with ``verify_sha256`` its digest
    is checked too (one read of the file)."""
    path = Path(path)
    if not path.exists():
        raise ZuFastError(f"{path} is missing (the folder is incomplete)")
    if recorded and isinstance(recorded.get("bytes"), int):
        size = path.stat().st_size
        if size != recorded["bytes"]:
            cut = "truncated: the write was cut short" if size < recorded["bytes"] else "changed since it was written"
            raise ZuFastError(f"{path}: corrupted or truncated safetensors file ({size:,} bytes, "
                              f"{recorded['bytes']:,} recorded at write: {cut})")
    try:
        with safe_open(str(path), framework="pt", device=device) as f:
            got = (f.metadata() or {}).get(WRITE_ID)
            if write_id is not None and got != write_id:
                raise ZuFastError(
                    f"{path} does not belong with the JSON next to it (write ids {got} and {write_id}): the folder "
                    "mixes files of two writes (an interrupted overwrite?); write it again"
                )
            if verify_sha256 and recorded and recorded.get("sha256") and \
                    file_digest(path)["sha256"] != recorded["sha256"]:
                raise ZuFastError(f"{path}: corrupted: its SHA-256 differs from the one recorded at write (the "
                                  "file was damaged or changed)")
            return {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        if isinstance(e, ZuFastError):
            raise
        raise ZuFastError(f"{path}: corrupted or truncated safetensors file ({e})") from None


__all__ = ["FILES_KEY", "WRITE_ID", "DiskFullError", "FolderAppearedError", "check_target", "disk_full_error",
           "file_digest", "free_bytes", "is_disk_full", "move_aside", "read_json", "read_tensors", "write_folder",
           "write_into"]
