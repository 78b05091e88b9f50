"""Issue 26, item 3: a full disk while saving an edit, writing statistics or saving a model.

Every write point gets the disk full in the ways it happens: safetensors' writer failing (``SafetensorError: ... No
space left on device (os error 28)``), a JSON write failing with ``OSError(ENOSPC)``, ``save_pretrained`` failing
half-way, and a filesystem that reports too little free space (refused before anything is written); where the tests
run as root and may mount, also a real 256 KiB tmpfs. Always: a ZuFastError naming the folder and the bytes needed,
nothing partial left behind (no temporary folder, no new folder), files already there byte-identical, and the
model's weights hashed unchanged.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import pathlib
import re
import subprocess
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
from safetensors import SafetensorError
from tiny_models import REQUESTS, corpus, llama, param_hashes

import zu_fast
from zu_fast import UnlearnConfig
from zu_fast import atomic as atomic_module
from zu_fast.atomic import DiskFullError

TEMPLATES = [["{}"], ["Because I. {}"]]
NEEDED = (r"not enough disk space to write the {what} to '.*{name}': about [\d,]+ .*bytes needed, "
          r"(.* bytes free there|free space unknown)")


def _cfg() -> UnlearnConfig:
    return UnlearnConfig(layers=[1, 2], progress=False, v_num_grad_steps=2, original_representation="clean")


# ------------------------------------------------------------------ ways a disk fills up ------------
def _safetensors_full(monkeypatch) -> None:
    """safetensors' writer runs out of space half-way (the error it really raises)."""
    def save_file(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\0" * 100)  # what got written before the disk filled
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(atomic_module, "save_file", save_file)


def _json_full(monkeypatch) -> None:
    """The tensors fit, the JSON written after them does not (OSError ENOSPC from the write)."""
    real = pathlib.Path.write_text

    def write_text(self, data, *a, **kw):
        if "zu_fast-tmp" in str(self.parent) and self.suffix == ".json":
            real(self, data[:10], *a, **kw)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))
        return real(self, data, *a, **kw)

    monkeypatch.setattr(pathlib.Path, "write_text", write_text)


def _reported_full(monkeypatch) -> None:
    """The filesystem says there are 10 bytes free: refused before anything is written."""
    monkeypatch.setattr(atomic_module, "free_bytes", lambda path: 10)


WAYS: dict[str, Callable] = {"safetensors_write": _safetensors_full, "json_write": _json_full,
                             "reported_free_space": _reported_full}


def _hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _no_leftovers(root: Path) -> None:
    left = [str(p) for p in root.rglob("*zu_fast-tmp*")]
    assert not left, left


@pytest.fixture(scope="module")
def edited(tmp_path_factory):
    model, tok = llama()
    cfg = _cfg()
    stats = zu_fast.collect_stats(model, tok, corpus(40), cfg, cache=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        edit = zu_fast.unlearn(model, tok, REQUESTS, cfg, stats=stats, context_templates=TEMPLATES)
    return model, tok, cfg, edit


@pytest.mark.parametrize("way", sorted(WAYS))
def test_saving_an_edit(edited, tmp_path, monkeypatch, way):
    model, tok, cfg, edit = edited
    WAYS[way](monkeypatch)
    before = param_hashes(model)
    with pytest.raises(DiskFullError, match=NEEDED.format(what="edit", name="my_edit")):
        edit.save(tmp_path / "my_edit")
    assert not (tmp_path / "my_edit").exists()
    _no_leftovers(tmp_path)
    assert param_hashes(model) == before and zu_fast.edits(model) == [edit]  # the live edit is untouched


@pytest.mark.parametrize("way", sorted(WAYS))
def test_overwriting_an_edit_keeps_the_files_already_there(edited, tmp_path, monkeypatch, way):
    model, tok, cfg, edit = edited
    folder = edit.save(tmp_path / "kept")
    (folder / "notes.txt").write_text("the user's notes")
    old = _hashes(folder)
    WAYS[way](monkeypatch)
    with pytest.raises(DiskFullError, match="files already in the folder are untouched|nothing was written"):
        edit.save(folder, overwrite=True)
    assert _hashes(folder) == old
    _no_leftovers(tmp_path)


@pytest.mark.parametrize("way", sorted(WAYS))
def test_writing_statistics_to_a_named_folder(tmp_path, monkeypatch, way):
    model, tok = llama()
    WAYS[way](monkeypatch)
    before = param_hashes(model)
    with pytest.raises(DiskFullError, match=NEEDED.format(what="statistics", name="stats")):
        zu_fast.collect_stats(model, tok, corpus(40), _cfg(), cache_path=str(tmp_path / "stats"))
    assert not (tmp_path / "stats").exists()
    _no_leftovers(tmp_path)
    assert param_hashes(model) == before


@pytest.mark.parametrize("way", sorted(WAYS))
def test_the_default_cache_on_a_full_disk_warns_and_keeps_the_statistics(tmp_path, monkeypatch, way):
    """The statistics pass is not lost to a full cache disk: a warning naming the folder and the bytes needed, the
    statistics returned uncached, no entry, no lock, no temporary folder."""
    monkeypatch.setenv("ZU_FAST_CACHE", str(tmp_path / "cache"))
    model, tok = llama()
    WAYS[way](monkeypatch)
    with pytest.warns(UserWarning, match=r"the statistics were not cached: not enough disk space to write the "
                                         r"statistics to .*bytes needed"):
        stats = zu_fast.collect_stats(model, tok, corpus(40), _cfg())
    assert stats.path is None and stats.origin == "computed" and stats[1].n > 0
    assert list((tmp_path / "cache" / "stats").iterdir()) == []
    _no_leftovers(tmp_path)


# ------------------------------------------------------------------ the command line: --save-model ---
@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli_full")
    model, tok = llama()
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    (root / "req.jsonl").write_text("\n".join(json.dumps(r) for r in REQUESTS) + "\n")
    (root / "cfg.json").write_text(json.dumps({"layers": [1, 2], "v_num_grad_steps": 2, "mom2_n_samples": 40,
                                               "original_representation": "clean"}))
    zu_fast.collect_stats(model, tok, corpus(40), UnlearnConfig(layers=[1, 2], progress=False),
                          cache_path=str(root / "stats"))
    return root


def _save_pretrained_full(monkeypatch) -> None:
    import transformers

    def save_pretrained(self, folder, *a, **kw):
        Path(folder, "model.safetensors").write_bytes(b"\0" * 1000)
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(transformers.PreTrainedModel, "save_pretrained", save_pretrained)


def _run(capsys, argv) -> tuple[int, str]:
    from zu_fast.cli import main

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


def test_unlearn_save_model_on_a_full_disk(folders, tmp_path, monkeypatch, capsys):
    model_before = _hashes(folders / "model")
    _save_pretrained_full(monkeypatch)
    code, err = _run(capsys, ["unlearn", "--model", folders / "model", "--requests", folders / "req.jsonl", "--stats",
                              folders / "stats", "--config", folders / "cfg.json", "--out", tmp_path / "edit",
                              "--save-model", tmp_path / "edited", "--quiet"])
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert re.search(NEEDED.format(what="model", name="edited"), lines[0]), lines[0]
    assert "an unexpected error" not in lines[0]
    assert f"The edit itself was saved to {tmp_path / 'edit'}" in lines[0]
    assert (tmp_path / "edit" / "edit.json").exists() and not (tmp_path / "edited").exists()
    _no_leftovers(tmp_path)
    assert _hashes(folders / "model") == model_before


@pytest.mark.parametrize("command", ["unlearn", "apply"])
def test_too_little_space_for_the_model_is_refused_before_any_work(folders, tmp_path, monkeypatch, capsys, command):
    monkeypatch.setattr(atomic_module, "free_bytes", lambda path: 10)
    edit_dir = tmp_path / "edit"
    if command == "apply":
        model, tok = llama()
        cfg = _cfg()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            edit = zu_fast.unlearn(model, tok, REQUESTS, cfg, stats=zu_fast.collect_stats(
                model, tok, corpus(40), cfg, cache=False), context_templates=TEMPLATES)
        monkeypatch.undo()
        edit.save(edit_dir)
        monkeypatch.setattr(atomic_module, "free_bytes", lambda path: 10)
        argv = ["apply", edit_dir, "--model", folders / "model", "--out", tmp_path / "edited"]
    else:
        argv = ["unlearn", "--model", folders / "model", "--requests", folders / "req.jsonl", "--stats",
                folders / "stats", "--config", folders / "cfg.json", "--out", edit_dir, "--save-model",
                tmp_path / "edited"]
    code, err = _run(capsys, argv)
    assert code == 2, err
    assert re.search(NEEDED.format(what=r"model \(--(save-model|out)\)", name="edited") + r" \(nothing was written\)",
                     err), err
    assert not (tmp_path / "edited").exists()
    assert (edit_dir.exists()) == (command == "apply")  # unlearn: refused before the edit was even made


# ------------------------------------------------------------------ a real full filesystem (root) ----
@pytest.fixture()
def tiny_fs(tmp_path):
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


@pytest.mark.parametrize("precheck", [True, False], ids=["free_space_reported", "write_fails"])
def test_a_real_full_filesystem(edited, tiny_fs, monkeypatch, precheck):
    model, tok, cfg, edit = edited
    (tiny_fs / "users_file.bin").write_bytes(os.urandom(250 * 1024))  # leaves one 4 KiB page; the edit needs more
    kept = _hashes(tiny_fs)
    if not precheck:  # let the write start, so that it fails for real with ENOSPC
        monkeypatch.setattr(atomic_module, "free_bytes", lambda path: None)
    with pytest.raises(DiskFullError, match=NEEDED.format(what="edit", name="edit")):
        edit.save(tiny_fs / "edit")
    assert _hashes(tiny_fs) == kept and sorted(p.name for p in tiny_fs.iterdir()) == ["users_file.bin"]


def test_zu_fast_stats_into_a_full_default_cache_is_an_error(folders, tmp_path, monkeypatch, capsys):
    """`zu-fast stats` exists to write the statistics: a cache it cannot write is an error (exit 2), not a warning."""
    monkeypatch.setenv("ZU_FAST_CACHE", str(tmp_path / "cache"))
    (tmp_path / "corpus.txt").write_text("\n".join(corpus(40)) + "\n")
    _safetensors_full(monkeypatch)
    code, err = _run(capsys, ["stats", "--model", folders / "model", "--corpus", tmp_path / "corpus.txt", "--layers",
                              "1,2", "--quiet"])
    assert code == 2
    assert "the statistics were computed but could not be written to the cache" in err.strip().splitlines()[-1]
    _no_leftovers(tmp_path)
