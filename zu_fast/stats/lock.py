"""A lock file that lets one process compute a statistics cache entry while the others wait (issue 26).

Two jobs that need the same statistics (same model, corpus and settings: the same cache key) often start
together. The first to create ``<entry>.lock`` (``O_CREAT | O_EXCL``: atomic on local filesystems and on
NFS v3+) computes; the others wait, and use the entry as soon as it appears. The lock file holds
``{"pid", "host", "created", "token"}``; while the lock is held a background thread touches it every
``heartbeat`` seconds.

**The stale-lock rule.** A lock is stale, and is broken, when

1. it was taken on this host and its process is no longer running (checked with ``kill(pid, 0)``), or
2. its modification time has not changed for ``stale_after`` seconds, measured on this process's own
   monotonic clock from the first time it saw that modification time (so clocks of other hosts on a shared
   filesystem do not matter): the holder died on another host, or hangs, or its PID was recycled.

Defaults: heartbeat 10 s, stale after 120 s (``ZU_FAST_LOCK_STALE_S`` overrides it). Breaking renames the lock
file to a unique name (only one waiter can win that rename), checks that it took the lock it judged stale,
and otherwise puts it back. If a lock is ever broken wrongly (a holder frozen for longer than the bound), two
processes compute the same entry; that costs time, never correctness: entries are published by an atomic
rename, and a process that finds the entry published by another uses it (``zu_fast.stats.collect``).
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

HEARTBEAT_S = 10.0
STALE_AFTER_S = 120.0


def _stale_after() -> float:
    try:
        return float(os.environ.get("ZU_FAST_LOCK_STALE_S", STALE_AFTER_S))
    except ValueError:
        return STALE_AFTER_S


def pid_running(pid: int) -> bool:
    """Whether process ``pid`` exists on this host (a zombie counts as gone)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    try:  # Linux: a zombie (exited, not yet reaped) holds no lock
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


class CacheLock:
    """An exclusive lock on ``path`` (a lock file) across processes and hosts, with the stale-lock rule above.

    ``acquire(until)`` takes it, waiting while another process holds it; it returns False instead as soon as
    ``until()`` is true (the awaited entry appeared). ``on_wait(info)`` is called once when it starts waiting,
    ``on_break(info, why)`` when it breaks a stale lock.
    """

    def __init__(self, path: str | os.PathLike, *, stale_after: float | None = None, heartbeat: float = HEARTBEAT_S,
                 poll: float = 0.2, on_wait: Callable[[dict], None] | None = None,
                 on_break: Callable[[dict, str], None] | None = None) -> None:
        self.path = Path(path)
        self.stale_after = _stale_after() if stale_after is None else stale_after
        self.heartbeat = heartbeat
        self.poll = poll
        self.on_wait, self.on_break = on_wait, on_break
        self.host = socket.gethostname()
        self.token = uuid.uuid4().hex
        self.held = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._seen: tuple[Any, float] | None = None  # (the lock's (mtime, content) last seen, when first seen)

    # ------------------------------------------------------------------ taking and giving back ------
    def acquire(self, until: Callable[[], bool] | None = None) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        waited = False
        delay = self.poll
        while True:
            if until is not None and until():
                return False
            if self._try_create():
                self.held = True
                self._start_heartbeat()
                return True
            info = self._read()
            if info is None:  # gone between the two calls: try again at once
                continue
            why = self._stale(info)
            if why:
                if self._break(info) and self.on_break is not None:
                    self.on_break(info["content"], why)
                continue
            if not waited and self.on_wait is not None:
                self.on_wait(info["content"])
            waited = True
            time.sleep(delay)
            delay = min(delay * 1.5, 2.0)

    def release(self) -> None:
        if not self.held:
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.held = False
        info = self._read()
        if info is not None and info["content"].get("token") == self.token:
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass

    def __enter__(self) -> CacheLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    # ------------------------------------------------------------------ internals ------
    def _try_create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        try:
            os.write(fd, json.dumps({"pid": os.getpid(), "host": self.host, "created": time.time(),
                                     "token": self.token}).encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        return True

    def _read(self) -> dict[str, Any] | None:
        try:
            st = self.path.stat()
            text = self.path.read_text()
        except FileNotFoundError:
            return None
        except OSError:
            text, st = "", None
        try:
            content = json.loads(text) if text else {}
        except json.JSONDecodeError:
            content = {}  # cut while being written: judged by its age alone
        return {"content": content if isinstance(content, dict) else {},
                "mtime": st.st_mtime_ns if st is not None else None, "text": text}

    def _stale(self, info: dict[str, Any]) -> str | None:
        c = info["content"]
        if c.get("host") == self.host and isinstance(c.get("pid"), int) and not pid_running(c["pid"]):
            return f"process {c['pid']} on this host is no longer running"
        key = (info["mtime"], info["text"])
        now = time.monotonic()
        if self._seen is None or self._seen[0] != key:
            self._seen = (key, now)
            return None
        if now - self._seen[1] > self.stale_after:
            return f"not refreshed for {self.stale_after:g} s"
        return None

    def _break(self, info: dict[str, Any]) -> bool:
        """Take the stale lock file away (rename, check it is the one judged stale, remove it)."""
        aside = self.path.with_name(f"{self.path.name}.stale-{uuid.uuid4().hex[:8]}")
        try:
            os.replace(self.path, aside)
        except FileNotFoundError:
            return False  # another waiter broke it first
        try:
            taken = aside.read_text()
        except OSError:
            taken = None
        if taken != info["text"]:  # a fresh lock was taken meanwhile: put it back unless there is another
            try:
                os.link(aside, self.path)
            except OSError:
                pass
            aside.unlink(missing_ok=True)
            return False
        aside.unlink(missing_ok=True)
        self._seen = None
        return True

    def _start_heartbeat(self) -> None:
        self._stop.clear()

        def beat() -> None:
            while not self._stop.wait(self.heartbeat):
                info = self._read()
                if info is None or info["content"].get("token") != self.token:
                    return  # broken by someone (judged stale): our entry is still published safely
                try:
                    os.utime(self.path)
                except OSError:
                    return

        self._thread = threading.Thread(target=beat, name="zu_fast-cache-lock", daemon=True)
        self._thread.start()


__all__ = ["HEARTBEAT_S", "STALE_AFTER_S", "CacheLock", "pid_running"]
