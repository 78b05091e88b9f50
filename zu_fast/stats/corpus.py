"""Reading a corpus: an iterable of str, a .txt / .jsonl file, or a datasets.Dataset."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ..errors import ZuFastError


def read_corpus(corpus: Any, limit: int | None = None) -> list[str]:
    """The corpus as a list of non-empty texts (at most ``limit``).

    - ``str``/``Path`` to a ``.jsonl`` file: one JSON object per line with a "text" field;
      any other file: one text per non-empty line.
    - a ``datasets.Dataset``: its "text" column.
    - any other iterable of str.
    """
    if isinstance(corpus, (str, Path)):
        path = Path(corpus)
        if not path.exists():
            raise ZuFastError(f"corpus file {str(path)!r} does not exist")
        if path.is_dir():
            raise ZuFastError(f"corpus {str(path)!r} is a folder; give a .txt or .jsonl file")
        texts = []
        # read as bytes and decode line by line: a bad byte is reported on its own line (text mode decodes ahead
        # of the lines it hands out, so its error can only say "somewhere after line i")
        with path.open("rb") as f:
            for i, raw in enumerate(f):
                try:
                    decoded = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise ZuFastError(f"{path}:{i + 1}: not UTF-8 text (byte {raw[e.start]:#04x} at column "
                                      f"{len(raw[:e.start].decode('utf-8', 'replace')) + 1}: {e.reason}); is it a "
                                      "binary file, or another encoding?") from None
                # the lines text mode would give (universal newlines: \r\n and a lone \r end a line too)
                for line in decoded.replace("\r\n", "\n").replace("\r", "\n").split("\n")[:-1] or [decoded]:
                    if not line.strip():
                        continue
                    if path.suffix == ".jsonl":
                        line = _jsonl_text(line, path, i + 1)
                        if not line.strip():
                            continue
                    texts.append(line)
                    if limit is not None and len(texts) >= limit:
                        return texts
        return texts
    if hasattr(corpus, "column_names") and hasattr(corpus, "select"):  # datasets.Dataset
        if "text" not in corpus.column_names:
            raise ZuFastError(f"dataset has no 'text' column (columns: {corpus.column_names})")
        n = len(corpus) if limit is None else min(limit, len(corpus))
        column = corpus.select(range(n))["text"]
        for i, t in enumerate(column):
            if t is not None and not isinstance(t, str):
                raise ZuFastError(f"dataset row {i}: 'text' has type {type(t).__name__} ({_short(t)}), expected a "
                                  "string")
        return [t for t in column if t and t.strip()]
    if not isinstance(corpus, Iterable):
        raise ZuFastError(f"corpus must be a path, a datasets.Dataset or an iterable of str, got {type(corpus)}")
    texts = []
    for i, t in enumerate(corpus):
        if not isinstance(t, str):
            raise ZuFastError(f"corpus item {i} has type {type(t).__name__} ({_short(t)}), expected str")
        if t.strip():
            texts.append(t)
        if limit is not None and len(texts) >= limit:
            break
    return texts


def _short(value: Any, n: int = 40) -> str:
    r = repr(value)
    return r if len(r) <= n else r[: n - 1] + "…"


def _jsonl_text(line: str, path: Path, lineno: int) -> str:
    """The "text" field of one .jsonl line; ZuFastError naming file and line for anything else."""
    try:
        rec = json.loads(line)
    except json.JSONDecodeError as e:
        raise ZuFastError(f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(rec, dict) or "text" not in rec:
        raise ZuFastError(f"{path}:{lineno}: expected an object with a 'text' field, got {_short(rec)}")
    text = rec["text"]
    if not isinstance(text, str):
        raise ZuFastError(f"{path}:{lineno}: \"text\" has type {type(text).__name__} ({_short(text)}), expected a "
                          "string")
    return text


def corpus_fingerprint(texts: list[str]) -> str:
    h = hashlib.sha256()
    for t in texts:
        h.update(t.encode("utf-8"))
        h.update(b"\0")
    return h.hexdigest()
