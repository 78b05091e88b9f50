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
        texts = []
        with path.open(encoding="utf-8") as f:
            for i, line in enumerate(f):
                line = line.rstrip("\n")
                if not line.strip():
                    continue
                if path.suffix == ".jsonl":
                    try:
                        rec = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise ZuFastError(f"{path}:{i + 1}: not valid JSON ({e})") from None
                    if not isinstance(rec, dict) or "text" not in rec:
                        raise ZuFastError(f"{path}:{i + 1}: expected an object with a 'text' field")
                    line = rec["text"]
                texts.append(line)
                if limit is not None and len(texts) >= limit:
                    break
        return texts
    if hasattr(corpus, "column_names") and hasattr(corpus, "select"):  # datasets.Dataset
        if "text" not in corpus.column_names:
            raise ZuFastError(f"dataset has no 'text' column (columns: {corpus.column_names})")
        n = len(corpus) if limit is None else min(limit, len(corpus))
        return [t for t in corpus.select(range(n))["text"] if t and t.strip()]
    if not isinstance(corpus, Iterable):
        raise ZuFastError(f"corpus must be a path, a datasets.Dataset or an iterable of str, got {type(corpus)}")
    texts = []
    for i, t in enumerate(corpus):
        if not isinstance(t, str):
            raise ZuFastError(f"corpus item {i} is a {type(t).__name__}, expected str")
        if t.strip():
            texts.append(t)
        if limit is not None and len(texts) >= limit:
            break
    return texts


def corpus_fingerprint(texts: list[str]) -> str:
    h = hashlib.sha256()
    for t in texts:
        h.update(t.encode("utf-8"))
        h.update(b"\0")
    return h.hexdigest()
