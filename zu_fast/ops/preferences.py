"""Measured backend preferences: which backend each op prefers on which GPU, and the rule that sets it.

The rule: a backend other than the plain-PyTorch default is preferred for an op on a device only
where (1) its correctness tests passed on that device (at least one ran, none failed) and (2) it
beat torch there in the op's benchmark table (faster on every measured shape). Among several such
backends, the larger geometric-mean speed-up goes first. Without a measurement, torch stays.

``benchmarks/gpu_check.sh`` applies the rule: section 2 records the correctness tests (a junit XML
file, ``record-tests``), sections 3 and 4 the tables (``record-speed``), each rewriting
``$OUT/preferences.json``. Checking that file in here as ``measured_preferences.json`` (``merge``)
is what makes the registry prefer a backend on that device: ``registry.choose`` reads it.

    python -m zu_fast.ops.preferences record-tests --state S --junit tests.xml --device "NVIDIA H200"
    python -m zu_fast.ops.preferences record-speed --state S --op cov_accumulate --table cov_table.json
    python -m zu_fast.ops.preferences write --state S --out preferences.json
    python -m zu_fast.ops.preferences merge preferences.json        # into measured_preferences.json
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import re
import sys
import xml.etree.ElementTree as ET
from collections.abc import Iterable
from pathlib import Path

MEASURED_FILE = Path(__file__).with_name("measured_preferences.json")
FILE_ENV = "ZU_FAST_PREFERENCES"  # another file (tests), or "none" to ignore measurements
SCHEMA = 1
DEFAULT = "torch"
OPS = ("cov_accumulate", "multiplicative_update_")


# ---------------------------------------------------------------------------------- reading
def _path() -> Path | None:
    env = os.environ.get(FILE_ENV, "").strip()
    if env.lower() == "none":
        return None
    return Path(env) if env else MEASURED_FILE


@functools.cache
def _load(path: str | None) -> dict:
    if path is None or not Path(path).is_file():
        return {"schema": SCHEMA, "devices": {}}
    data = json.loads(Path(path).read_text())
    if data.get("schema") != SCHEMA:
        raise ValueError(f"{path}: schema {data.get('schema')!r}, expected {SCHEMA}")
    return data


def measured() -> dict:
    """The measured preferences in use ({"schema", "devices": {name: {"ops": {op: {"order"...}}}}})."""
    p = _path()
    return _load(str(p) if p is not None else None)


def reload() -> None:
    """Forget the cached file (after ``merge``, or when a test points FILE_ENV elsewhere)."""
    _load.cache_clear()
    _device_name.cache_clear()


@functools.cache
def _device_name(index: int) -> str:
    import torch

    return torch.cuda.get_device_name(index)


def current_device_name(device_type: str, index: int | None = None) -> str | None:
    """The name measurements are keyed by (torch.cuda.get_device_name), or None off CUDA."""
    if device_type != "cuda":
        return None
    import torch

    if not torch.cuda.is_available():
        return None
    return _device_name(torch.cuda.current_device() if index is None else index)


def measured_order(op: str, device_name: str | None) -> list[str]:
    """Backends measured to be preferred for ``op`` on the device named ``device_name``, best first."""
    if device_name is None:
        return []
    entry = measured().get("devices", {}).get(device_name, {})
    return list(entry.get("ops", {}).get(op, {}).get("order", []))


# ---------------------------------------------------------------------------------- the rule
def decide(correct: dict[str, bool], times: dict[str, list[float | None]]) -> tuple[list[str], dict]:
    """Apply the rule for one op on one device.

    ``correct``: backend → whether its correctness tests passed there. ``times``: backend →
    seconds per call on each measured shape (the same shapes, in the same order, for every
    backend; None where a run failed), including ``"torch"``. Returns (preferred order, per-backend
    reasons).
    """
    base = times.get(DEFAULT)
    reasons, ranked = {}, []
    for name, secs in times.items():
        if name == DEFAULT:
            continue
        if not correct.get(name, False):
            reasons[name] = "correctness tests did not pass on this device" if name in correct else (
                "no correctness tests recorded on this device")
            continue
        if not base or len(secs) != len(base) or any(t is None for t in secs) or any(t is None for t in base):
            reasons[name] = "not measured beside torch on every shape"
            continue
        ratios = [b / t for b, t in zip(base, secs)]
        if not all(r > 1.0 for r in ratios):
            reasons[name] = f"not faster than torch on every shape (speed-ups {', '.join(f'{r:.2f}' for r in ratios)})"
            continue
        gmean = math.exp(sum(math.log(r) for r in ratios) / len(ratios))
        reasons[name] = f"preferred: correct, {gmean:.2f}x torch (geometric mean over {len(ratios)} shapes)"
        ranked.append((gmean, name))
    ranked.sort(reverse=True)
    return [name for _, name in ranked], reasons


# ---------------------------------------------------------------------------------- tests → backends
_UPDATE_WORDS = ("update", "stochastic", "survive", "delta")


def classify_test(nodeid: str) -> list[tuple[str, str]]:
    """(op, backend) pairs whose correctness a test (pytest node id) speaks for; [] for the others.

    The op test files name their backend in the test name or its parameters: test_cuda_ext.py
    tests the CUDA extension, test_triton_update.py the Triton update kernel, ``triton`` in a cov
    test's name or id the Triton kernel, a ``torch`` id (or a test of the default in
    test_multiplicative_update.py) the plain-PyTorch default; test_tc_numerics.py's GPU tests carry
    the backend as their last parameter.
    """
    path, _, name = nodeid.partition("::")
    file = Path(path).name
    params = re.findall(r"[\w.]+", name[name.index("[") + 1 : name.rindex("]")]) if "[" in name else []
    base = name.split("[", 1)[0]
    op = "multiplicative_update_" if any(w in base for w in _UPDATE_WORDS) else "cov_accumulate"
    if file == "test_cuda_ext.py":
        if base in ("test_cuda_sources_compile", "test_sources_are_shipped_and_found", "test_arch_flags",
                    "test_default_chunk_is_small", "test_backend_registered_and_build_status"):
            return []  # host-side checks, not correctness on a device
        if base == "test_forced_backend_dispatch":
            return [("cov_accumulate", "cuda"), ("multiplicative_update_", "cuda")]
        return [(op, "cuda")]
    if file == "test_cov_accumulate.py":
        if "triton" in base or "triton" in params:
            return [("cov_accumulate", "triton")]
        if base.startswith("test_torch") or "torch" in params:
            return [("cov_accumulate", "torch")]
        return []
    if file == "test_multiplicative_update.py":
        for b in ("cuda", "triton"):
            if b in params:
                return [("multiplicative_update_", b)]
        return [("multiplicative_update_", "torch")]
    if file == "test_triton_update.py":  # the Triton update kernel; its compile-only and host checks say nothing
        host_only = ("test_parse_config", "test_default_chunk_bounds_the_staging_buffer",
                     "test_triton_registered_not_preferred", "test_bf16_split_is_the_torch_defaults")
        if base.startswith("test_compiled") or base in host_only:
            return []
        return [("multiplicative_update_", "triton")]
    if file == "test_tc_numerics.py" and base.startswith("test_gpu"):
        backend = params[-1] if params and params[-1] in ("torch", "triton", "cuda") else None
        return [(op, backend)] if backend else []
    return []


def correctness_from_junit(paths: Iterable[str | os.PathLike]) -> tuple[dict, dict]:
    """From pytest junit XML files: ({op: {backend: passed}}, {op: {backend: counts}})."""
    counts: dict[str, dict[str, dict[str, int]]] = {}
    for p in paths:
        for case in ET.parse(p).getroot().iter("testcase"):
            cls, name = case.get("classname", ""), case.get("name", "")
            nodeid = cls.replace(".", "/") + ".py::" + name
            outcome = "passed"
            for child in case:
                if child.tag in ("failure", "error"):
                    outcome = "failed"
                elif child.tag == "skipped":
                    outcome = "skipped"
            for op, backend in classify_test(nodeid):
                c = counts.setdefault(op, {}).setdefault(backend, {"passed": 0, "failed": 0, "skipped": 0})
                c[outcome] += 1
    passed = {op: {b: c["passed"] > 0 and c["failed"] == 0 for b, c in per.items()} for op, per in counts.items()}
    return passed, counts


# ---------------------------------------------------------------------------------- state → file
def _read(path: str | os.PathLike) -> dict:
    p = Path(path)
    return json.loads(p.read_text()) if p.is_file() else {}


def _write(path: str | os.PathLike, data: dict) -> None:
    Path(path).write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")


def speeds_from_table(table: dict, op: str) -> dict[str, list[float | None]]:
    """Backend → seconds per shape from a benchmark table JSON (``{"rows": [{"shape", "impl",
    "seconds", "counts_for": [ops]}...]}``, written by cov_table.py / update_table.py). Only rows
    that count for ``op`` are used; shapes in first-seen order."""
    rows = [r for r in table.get("rows", []) if op in r.get("counts_for", [])]
    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    out = {}
    for impl in impls:
        by_shape = {r["shape"]: r.get("seconds") for r in rows if r["impl"] == impl}
        out[impl] = [by_shape.get(s) for s in shapes]
    return out


def build_preferences(state: dict) -> dict:
    """The preferences file for the device in ``state`` (see the CLI), with the evidence."""
    device = state.get("device") or "unknown"
    ops = {}
    for op in OPS:
        correct = state.get("correct", {}).get(op, {})
        times = state.get("times", {}).get(op, {})
        order, reasons = decide(correct, times) if times else ([], {"*": "no benchmark table recorded"})
        ops[op] = {"order": order, "reasons": reasons, "correct": correct, "times": times,
                   "tests": state.get("test_counts", {}).get(op, {})}
    return {"schema": SCHEMA, "devices": {device: {"ops": ops, "capability": state.get("capability"),
                                                   "measured": state.get("measured")}}}


def merge(src: str | os.PathLike, dst: str | os.PathLike = MEASURED_FILE) -> dict:
    """Merge the devices of a preferences file written by the GPU check into ``dst``."""
    new = json.loads(Path(src).read_text())
    if new.get("schema") != SCHEMA:
        raise ValueError(f"{src}: schema {new.get('schema')!r}, expected {SCHEMA}")
    cur = _read(dst) or {"schema": SCHEMA, "devices": {}}
    cur.setdefault("devices", {}).update(new.get("devices", {}))
    _write(dst, cur)
    reload()
    return cur


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("record-tests", help="record correctness per (op, backend) from junit XML")
    t.add_argument("--state", required=True)
    t.add_argument("--junit", nargs="+", required=True)
    t.add_argument("--device", required=True)
    t.add_argument("--capability", default=None)
    t.add_argument("--date", default=None)
    s = sub.add_parser("record-speed", help="record a benchmark table's times for one op")
    s.add_argument("--state", required=True)
    s.add_argument("--op", required=True, choices=OPS)
    s.add_argument("--table", required=True)
    w = sub.add_parser("write", help="apply the rule, write the preferences file")
    w.add_argument("--state", required=True)
    w.add_argument("--out", required=True)
    m = sub.add_parser("merge", help=f"merge a written preferences file into {MEASURED_FILE.name}")
    m.add_argument("src")
    m.add_argument("--into", default=str(MEASURED_FILE))
    args = ap.parse_args(argv)
    if args.cmd == "record-tests":
        state = _read(args.state)
        passed, counts = correctness_from_junit(args.junit)
        if state.get("device") not in (None, args.device):
            state = {}  # another device: start over
        state.update(device=args.device, capability=args.capability, measured=args.date,
                     correct=passed, test_counts=counts)
        _write(args.state, state)
        for op, per in passed.items():
            for b, ok in per.items():
                print(f"{op:<24} {b:<8} {'passed' if ok else 'FAILED'}  {counts[op][b]}")
    elif args.cmd == "record-speed":
        state = _read(args.state)
        table = json.loads(Path(args.table).read_text())
        if state.get("device") not in (None, table.get("device")):
            print(f"warning: table from {table.get('device')!r}, correctness from {state.get('device')!r}",
                  file=sys.stderr)
        state.setdefault("device", table.get("device"))
        state.setdefault("times", {})[args.op] = speeds_from_table(table, args.op)
        _write(args.state, state)
    elif args.cmd == "write":
        prefs = build_preferences(_read(args.state))
        _write(args.out, prefs)
        for dev, entry in prefs["devices"].items():
            for op, e in entry["ops"].items():
                print(f"{dev}: {op}: order {e['order'] or ['torch']}")
                for b, why in e["reasons"].items():
                    print(f"    {b}: {why}")
    elif args.cmd == "merge":
        cur = merge(args.src, args.into)
        print(f"{args.into}: devices {sorted(cur['devices'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
