"""Issue 26, item 1: processes sharing one statistics cache (``zu_fast.stats.collect``, ``zu_fast.stats.lock``).

Two real processes start ``collect_stats`` on the same tiny model, corpus and settings at the same moment: both
succeed, exactly one runs the statistics pass, the other waits for it and uses its entry, and no lock file or
temporary folder is left. Locks of dead or silent processes are broken by the stale-lock rule; an entry that
appears while a process computes (another host broke its lock) is used, never an error.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import pytest
import torch
from tiny_models import corpus, llama, param_hashes

import zu_fast
from zu_fast.stats import collect as collect_module
from zu_fast.stats.lock import CacheLock
from zu_fast.stats.store import cache_root, save_stats

TESTS = Path(__file__).parent
# One job: wait until every job is ready, then collect statistics (the pass made to last a second, as a real one
# lasts minutes, so that the jobs overlap for sure) and print what it did.
CHILD = r"""
import json, sys, time, warnings
from pathlib import Path
sys.path.insert(0, {tests!r})
warnings.simplefilter("ignore")
import zu_fast
from zu_fast.stats import collect
from tiny_models import corpus, llama

me, n_jobs, barrier = int(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3])
real = collect._collect
def slow(*a, **kw):
    time.sleep(1.0)
    return real(*a, **kw)
collect._collect = slow
model, tok = llama()
cfg = zu_fast.UnlearnConfig(layers=[1, 2], progress=False)
(barrier / f"ready-{{me}}").touch()
while len(list(barrier.glob("ready-*"))) < n_jobs:
    time.sleep(0.01)
stats = zu_fast.collect_stats(model, tok, corpus(200), cfg)
print(json.dumps({{"origin": stats.origin, "path": stats.path, "kk": float(stats[1].kk.double().sum()),
                   "n": stats[1].n}}))
"""


def _cfg():
    return zu_fast.UnlearnConfig(layers=[1, 2], progress=False)


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ZU_FAST_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _entries(cache: Path) -> list[str]:
    folder = cache / "stats"
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


@pytest.mark.parametrize("jobs", [2])
def test_jobs_started_together_compute_once_and_all_succeed(tmp_path, cache, jobs):
    script = tmp_path / "job.py"
    script.write_text(CHILD.format(tests=str(TESTS)))
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    env = {**os.environ, "ZU_FAST_CACHE": str(cache), "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, str(script), str(i), str(jobs), str(barrier)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env) for i in range(jobs)]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    results = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]
    assert sorted(r["origin"] for r in results) == ["computed"] + ["loaded"] * (jobs - 1)
    assert len({r["path"] for r in results}) == 1 and len({(r["kk"], r["n"]) for r in results}) == 1
    waited = [err for (_, err), r in zip(outs, results) if r["origin"] == "loaded"]
    assert all("waiting for process" in err and "which is computing these statistics" in err for err in waited)
    assert all("not empty" not in err and "overwrite" not in err for _, err in outs)
    # one finished entry; no lock file, no temporary folder left
    assert _entries(cache) == [Path(results[0]["path"]).name]
    # and a later process simply uses it
    again = zu_fast.collect_stats(*llama(), corpus(200), _cfg())
    assert again.origin == "loaded" and float(again[1].kk.double().sum()) == results[0]["kk"]


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _lock_path(model, tok, cfg) -> Path:
    """Where the lock of this model's default cache entry lives (the entry's key, computed as collect_stats does)."""
    seen = {}
    real = collect_module._default_entry

    def spy(path, meta, compute, loaded):
        seen["path"] = path
        raise RuntimeError("spy")

    collect_module._default_entry = spy
    try:
        with pytest.raises(RuntimeError, match="spy"):
            zu_fast.collect_stats(model, tok, corpus(40), cfg)
    finally:
        collect_module._default_entry = real
    return seen["path"].with_name(seen["path"].name + ".lock")


STALE_LOCKS = {
    # a lock of a process on this host that no longer runs: broken at once
    "dead_process": lambda: {"pid": _dead_pid(), "host": socket.gethostname(), "created": time.time(),
                             "token": "x"},
    # a lock from another host (its PID cannot be checked) that nobody refreshes: broken after the bound
    "other_host_not_refreshed": lambda: {"pid": os.getpid(), "host": "another-node", "created": time.time() - 9e3,
                                         "token": "y"},
    # a lock cut while it was written (empty): judged by its age alone
    "empty_lock_file": lambda: None,
}


@pytest.mark.parametrize("case", sorted(STALE_LOCKS))
def test_a_stale_lock_is_broken_and_the_statistics_computed(cache, monkeypatch, case, capfd):
    monkeypatch.setenv("ZU_FAST_LOCK_STALE_S", "0.5")
    model, tok = llama()
    cfg = _cfg()
    lock = _lock_path(model, tok, cfg)
    lock.parent.mkdir(parents=True, exist_ok=True)
    content = STALE_LOCKS[case]()
    lock.write_text("" if content is None else json.dumps(content))
    before = param_hashes(model)
    t0 = time.perf_counter()
    stats = zu_fast.collect_stats(model, tok, corpus(40), cfg)
    assert stats.origin == "computed" and stats.path is not None
    assert not lock.exists()
    assert param_hashes(model) == before
    err = capfd.readouterr().err
    assert "taking over the statistics" in err
    if case == "dead_process":
        assert "is no longer running" in err and time.perf_counter() - t0 < 0.5 + 30
    else:
        assert "not refreshed for 0.5 s" in err


def test_a_live_lock_is_waited_for_and_its_entry_used(cache, monkeypatch, capfd):
    """A lock held (and refreshed) by someone else: wait; when its entry appears, use it and leave the lock alone."""
    model, tok = llama()
    cfg = _cfg()
    lock_path = _lock_path(model, tok, cfg)
    theirs = zu_fast.collect_stats(model, tok, corpus(40), cfg, cache=False)  # what the other process computes
    other = CacheLock(lock_path, heartbeat=0.1)
    assert other.acquire()

    def the_other_process():
        time.sleep(0.6)
        save_stats(lock_path.with_name(lock_path.name[: -len(".lock")]), theirs.layers, theirs.meta)
        time.sleep(0.2)
        other.release()

    def must_not_compute(*a, **kw):
        raise AssertionError("the waiting process must not run the statistics pass")

    monkeypatch.setattr(collect_module, "_collect", must_not_compute)
    t = threading.Thread(target=the_other_process)
    t.start()
    stats = zu_fast.collect_stats(model, tok, corpus(40), cfg)
    t.join()
    assert stats.origin == "loaded" and torch.equal(stats[1].kk, theirs[1].kk)
    assert "waiting for process" in capfd.readouterr().err
    assert not lock_path.exists()


def test_an_entry_written_meanwhile_by_another_process_is_used(cache, monkeypatch):
    """Our lock was judged stale by another host, which published the entry first: ours is dropped, theirs used."""
    model, tok = llama()
    cfg = _cfg()
    real_save = collect_module.save_stats

    def save_after_someone_else(path, layers, meta, **kw):
        real_save(path, layers, meta)  # the other process's identical entry lands first
        return real_save(path, layers, meta, **kw)  # ours: the folder exists now

    monkeypatch.setattr(collect_module, "save_stats", save_after_someone_else)
    stats = zu_fast.collect_stats(model, tok, corpus(40), cfg)
    assert stats.origin == "loaded"
    assert _entries(cache) == [Path(stats.path).name]


def test_lock_until_returns_without_the_lock(tmp_path):
    a = CacheLock(tmp_path / "x.lock", heartbeat=0.05)
    assert a.acquire()
    b = CacheLock(tmp_path / "x.lock")
    appeared = iter([False, False, True])
    assert b.acquire(until=lambda: next(appeared)) is False  # it waited, then the awaited entry "appeared"
    time.sleep(0.2)  # heartbeats keep a's lock fresh
    assert json.loads((tmp_path / "x.lock").read_text())["token"] == a.token
    a.release()
    assert not (tmp_path / "x.lock").exists()
    assert b.acquire() and b.held
    b.release()


def test_default_cache_is_never_refused_as_not_empty(cache):
    """A default-cache folder holding something that is not a finished entry (an old crash) is moved aside with a
    warning and recomputed; the "not empty ... pass overwrite=True" advice is for folders the user names."""
    model, tok = llama()
    cfg = _cfg()
    first = zu_fast.collect_stats(model, tok, corpus(40), cfg)
    entry = Path(first.path)
    (entry / "meta.json").unlink()  # what an interrupted write of an old version could leave
    (entry / "junk.bin").write_bytes(b"x")
    with pytest.warns(UserWarning, match=r"cannot be used \(it has no meta\.json.*moved them aside to .*corrupt-"):
        again = zu_fast.collect_stats(model, tok, corpus(40), cfg)
    assert again.origin == "computed" and again.path == first.path
    moved = [p for p in entry.parent.iterdir() if ".corrupt-" in p.name]
    assert len(moved) == 1 and (moved[0] / "junk.bin").read_bytes() == b"x"  # nothing deleted
    assert torch.equal(again[1].kk, first[1].kk)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert zu_fast.collect_stats(model, tok, corpus(40), cfg).origin == "loaded"
    assert cache_root() == cache
