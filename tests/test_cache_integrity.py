"""Issue 26, item 2: a statistics cache entry or a saved edit damaged after it was written (a crash, a full disk, a
bad copy) is detected — its size and SHA-256 are recorded at write — and never used.

Default cache: the bad entry is moved aside (renamed, nothing deleted) with a warning naming both folders, and the
statistics are computed again. A folder the user named (``cache_path=``): refused with a message saying what to do,
the folder left as it is. A saved edit: refused, naming the file. The model's weights are hashed before and after.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from tiny_models import REQUESTS, corpus, llama, param_hashes

import zu_fast
from zu_fast import Edit, UnlearnConfig, ZuFastError

TEMPLATES = [["{}"], ["Because I. {}"]]


def _cfg() -> UnlearnConfig:
    return UnlearnConfig(layers=[1, 2], progress=False, v_num_grad_steps=2, original_representation="clean")


def _half_tensors(p: Path) -> None:
    raw = (p / "stats.safetensors").read_bytes()
    (p / "stats.safetensors").write_bytes(raw[: len(raw) // 2])


def _cut_meta(p: Path) -> None:
    text = (p / "meta.json").read_text()
    (p / "meta.json").write_text(text[: len(text) // 2])


def _flip_a_byte(p: Path) -> None:  # same size, different content: only the SHA-256 shows it
    raw = bytearray((p / "stats.safetensors").read_bytes())
    raw[-3] ^= 0x01
    (p / "stats.safetensors").write_bytes(bytes(raw))


def _empty_tensors(p: Path) -> None:  # a crash before the data reached the disk (no fsync): a zero-length file
    (p / "stats.safetensors").write_bytes(b"")


def _no_meta(p: Path) -> None:
    (p / "meta.json").unlink()


def _other_format(p: Path) -> None:
    meta = json.loads((p / "meta.json").read_text())
    meta["format_version"] = 99
    (p / "meta.json").write_text(json.dumps(meta))


# name → (damage, what the warning / error says about it)
DAMAGE: dict[str, tuple[Callable[[Path], None], str]] = {
    "half_of_stats_safetensors": (_half_tensors, r"stats\.safetensors: corrupted or truncated safetensors file \(.* "
                                                 r"bytes, .* recorded at write: truncated"),
    "cut_meta_json": (_cut_meta, r"meta\.json: corrupted, not valid JSON"),
    "flipped_byte": (_flip_a_byte, r"stats\.safetensors: corrupted: its SHA-256 differs from the one recorded"),
    "zero_length_tensors": (_empty_tensors, r"stats\.safetensors: corrupted or truncated safetensors file \(0 bytes"),
    "meta_json_missing": (_no_meta, r"no meta\.json"),
    "another_format_version": (_other_format, r"statistics format 99 != 1"),
}


def _folder_hashes(p: Path) -> dict[str, str]:
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(p.iterdir())}


@pytest.mark.parametrize("case", sorted(DAMAGE))
def test_default_cache_moves_a_bad_entry_aside_and_recomputes(tmp_path, monkeypatch, case):
    monkeypatch.setenv("ZU_FAST_CACHE", str(tmp_path / "cache"))
    damage, says = DAMAGE[case]
    model, tok = llama()
    cfg = _cfg()
    good = zu_fast.collect_stats(model, tok, corpus(40), cfg)
    entry = Path(good.path)
    damage(entry)
    damaged = _folder_hashes(entry)
    before = param_hashes(model)
    with pytest.warns(UserWarning) as rec:
        again = zu_fast.collect_stats(model, tok, corpus(40), cfg)
    text = " ".join(str(w.message) for w in rec)
    assert f"the cached statistics in {entry} cannot be used" in text, text
    assert re.search(says, text), text
    moved = [p for p in entry.parent.iterdir() if p.name.startswith(entry.name + ".corrupt-")]
    assert len(moved) == 1 and str(moved[0]) in text  # the warning names where it went
    assert _folder_hashes(moved[0]) == damaged  # moved, not deleted or changed
    assert again.origin == "computed" and again.path == good.path  # recomputed, never used
    assert all(torch.equal(again[k].kk, good[k].kk) and again[k].n == good[k].n for k in (1, 2))
    assert param_hashes(model) == before
    assert zu_fast.collect_stats(model, tok, corpus(40), cfg).origin == "loaded"  # the new entry is good


@pytest.mark.parametrize("case", sorted(DAMAGE))
def test_a_named_statistics_folder_that_is_damaged_is_refused_and_left_alone(tmp_path, case):
    damage, says = DAMAGE[case]
    model, tok = llama()
    cfg = _cfg()
    folder = tmp_path / "my_stats"
    zu_fast.collect_stats(model, tok, corpus(40), cfg, cache_path=str(folder))
    damage(folder)
    damaged = _folder_hashes(folder)
    before = param_hashes(model)
    with pytest.raises(ZuFastError, match=says) as err:
        zu_fast.collect_stats(model, tok, corpus(40), cfg, cache_path=str(folder))
    msg = str(err.value)
    if case != "another_format_version":  # (a format from another version is "stale", not damaged)
        assert "move" in msg and "away" in msg and "--overwrite" in msg, msg
    assert _folder_hashes(folder) == damaged
    assert sorted(p.name for p in tmp_path.iterdir()) == ["my_stats"]  # nothing else written
    assert param_hashes(model) == before


def test_a_named_folder_can_be_recomputed_with_overwrite_on_the_command_line(tmp_path):
    """The advice in the refusal works: zu-fast stats --out DIR --overwrite replaces a damaged folder's files."""
    from zu_fast.cli import main

    model, tok = llama()
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    (tmp_path / "corpus.txt").write_text("\n".join(corpus(40)) + "\n")
    (tmp_path / "cfg.json").write_text(json.dumps({"layers": [1, 2]}))
    args = ["stats", "--model", str(tmp_path / "model"), "--corpus", str(tmp_path / "corpus.txt"), "--config",
            str(tmp_path / "cfg.json"), "--out", str(tmp_path / "st"), "--quiet"]
    assert main(args) == 0
    _half_tensors(tmp_path / "st")
    assert main(args) == 2
    assert main(args + ["--overwrite"]) == 0
    assert zu_fast.collect_stats(model, tok, corpus(40), UnlearnConfig(layers=[1, 2], progress=False),
                                 cache_path=str(tmp_path / "st")).origin == "loaded"


# ------------------------------------------------------------------ saved edits ------------------------
@pytest.fixture(scope="module")
def saved_edit(tmp_path_factory):
    root = tmp_path_factory.mktemp("edits")
    model, tok = llama()
    cfg = _cfg()
    stats = zu_fast.collect_stats(model, tok, corpus(40), cfg, cache=False)
    with pytest.warns(UserWarning):
        edit = zu_fast.unlearn(model, tok, REQUESTS, cfg, stats=stats, context_templates=TEMPLATES)
    path = edit.save(root / "edit")
    edit.restore()
    return root, path


def _copy(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


EDIT_DAMAGE = {
    "half_of_factors": (lambda p: (p / "factors.safetensors").write_bytes((p / "factors.safetensors").read_bytes()
                                                                          [: (p / "factors.safetensors").stat().st_size
                                                                           // 2]),
                        r"factors\.safetensors: corrupted or truncated safetensors file \(.* bytes, .* recorded at "
                        r"write: truncated"),
    "zero_length_factors": (lambda p: (p / "factors.safetensors").write_bytes(b""),
                            r"factors\.safetensors: corrupted or truncated safetensors file \(0 bytes"),
    "cut_edit_json": (lambda p: (p / "edit.json").write_text((p / "edit.json").read_text()[:200]),
                      r"edit\.json: corrupted, not valid JSON"),
    "grown_factors": (lambda p: (p / "factors.safetensors").write_bytes((p / "factors.safetensors").read_bytes()
                                                                        + b"\0" * 16),
                      r"recorded at write: changed since it was written"),
}


@pytest.mark.parametrize("case", sorted(EDIT_DAMAGE))
def test_a_damaged_saved_edit_is_refused(saved_edit, case):
    root, path = saved_edit
    damage, says = EDIT_DAMAGE[case]
    bad = _copy(path, root / f"bad_{case}")
    damage(bad)
    model, _ = llama()
    before = param_hashes(model)
    with pytest.raises(ZuFastError, match=says):
        Edit.load(bad).apply(model)
    assert param_hashes(model) == before and zu_fast.edits(model) == []


def test_the_recorded_size_and_digest_are_those_of_the_file(saved_edit):
    from zu_fast.atomic import FILES_KEY, file_digest

    _, path = saved_edit
    rec = json.loads((path / "edit.json").read_text())[FILES_KEY]["factors.safetensors"]
    assert rec == file_digest(path / "factors.safetensors")
    assert Edit.load(path).layers == [1, 2]
