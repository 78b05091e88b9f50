"""Table of ``multiplicative_update_`` with the edits real unlearning makes, and how much of a small
edit survives rounding.

    python benchmarks/update_table.py --json out.json      # d 8192, d_in 28672 (70B down_proj; GPU)
    python benchmarks/update_table.py --d 512 --d-in 2048 --reps 2    # CPU smoke run (torch only)
    TRITON_INTERPRET=1 python benchmarks/update_table.py --d 256 --d-in 512 --reps 1 --impls torch,triton
                                                           # CPU: the Triton rows interpreted (no speed meaning)

The edit: E = D − I like a ZeroUnlearn edit (the projector's 1% global scaling plus a rank-64
part of size ~0.3), computed in float64. Forms, per implementation (every registered backend that
is available here: the torch default, the Triton kernel, the CUDA extension; ``--impls`` picks) and
W layout (row-major, and column-major as a transposed weight is):

* ``delta fp32 E``: ``multiplicative_update_(W, E.float(), form="delta")``, what a saved edit
  stores and what Edit applies once integrated: the tensor-core path (E split in two bf16 terms,
  W + E·W). These rows decide the backend preference (``counts_for``).
* ``mult fp64 D``: ``multiplicative_update_(W, I + E)`` in float64, what edit.py passed before:
  float64 arithmetic (CUDA cores in the CUDA kernel, fp64 cuBLAS in torch).
* ``mult fp32 D``: the multiplier in fp32 (the only form benchmarked before).

Columns: median time, peak extra memory over what W and the edit already take, the time as a
multiple of one bf16 cuBLAS GEMM of the same shape ("floor": a bf16-accurate product), and the
accuracy on the first ``--check-cols`` columns: the share of bf16 outputs that differ from the
correctly rounded exact result, and the largest error in bf16 ulps (of max(|exact|, |W|)).

Part 2: W bf16, a small rank-4 E (|ΔW| from 2% to 100% of a bf16 ulp): the fraction of the exact
edit ΔW = E W found in the rounded result, <W₁ - W₀, ΔW> / ‖ΔW‖², with nearest and with
stochastic rounding (seed derived from the edit), plus ‖W₁ - W₀ - ΔW‖ / ‖ΔW‖.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from zu_fast.ops import backend_fn, cuda_backend, registry


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn, reps: int, device: str) -> float:
    """Median seconds per call, after one warm-up call."""
    fn()
    times = []
    for _ in range(reps):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def peak_extra(fn, device: str) -> float:
    if device != "cuda":
        return float("nan")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return float(torch.cuda.max_memory_allocated() - base)


def real_edit(d: int, device: str, rank: int = 64, seed: int = 0) -> torch.Tensor:
    """E = D − I like a ZeroUnlearn edit, float64 [d, d]: 0.01·I + a rank-64 part of size ~0.3."""
    g = torch.Generator(device=device).manual_seed(seed)
    U = torch.randn(d, rank, device=device, generator=g, dtype=torch.float64) / d**0.5
    V = torch.randn(d, rank, device=device, generator=g, dtype=torch.float64) * (0.3 / rank**0.5)
    return 0.01 * torch.eye(d, device=device, dtype=torch.float64) + U @ V.T


def accuracy(W_after: torch.Tensor, W_before: torch.Tensor, E64: torch.Tensor) -> tuple[float, float]:
    """(share of outputs not correctly rounded, largest error in bf16 ulps) on the given columns.

    The ulp is that of max(|exact|, |W before|): an output that nearly cancels (W + E·W ≈ 0) has
    a tiny ulp of its own that fp32 arithmetic on the O(|W|) terms cannot resolve."""
    exact = W_before.double() + E64 @ W_before.double()
    rounded = exact.to(W_after.dtype).double()
    got = W_after.double()
    mag = torch.maximum(exact.abs(), W_before.double().abs()).clamp_min(2.0**-126)
    ulp = torch.exp2(torch.floor(torch.log2(mag)) - 7)  # bf16: 8 significant bits
    return float((got != rounded).double().mean()), float(((got - exact).abs() / ulp).max())


def available_impls(device: str) -> list[str]:
    """torch first, then every other registered backend of the op that runs and is available here."""
    op = registry.get_op("multiplicative_update_")
    others = sorted(n for n, b in op.backends.items()
                    if n != "torch" and registry.supports(b, device) and b.is_available())
    return ["torch", *others]


def kernel_name(impl: str, W: torch.Tensor, M: torch.Tensor, form: str, device: str) -> str:
    """Which kernel an implementation runs for this W and matrix (for the table's kernel column)."""
    if impl == "cuda":
        return cuda_backend.load_extension().update_kernel(W, M)
    if impl == "triton":
        mode = "fp64 DMMA" if M.dtype == torch.float64 else (
            "tensor cores (E hi+lo)" if W.dtype == torch.bfloat16 else "fp32 ieee")
        return f"triton {mode}"
    if form == "delta" and device == "cuda" and M.dtype == torch.float32 and W.dtype == torch.bfloat16:
        return "2 bf16 cuBLAS (E hi+lo)"
    return "fp64 matmul" if M.dtype == torch.float64 else "chunked torch"


def triton_tuning() -> list:
    """What the Triton update kernel's tuner tried, chose and dropped, per problem."""
    try:
        from zu_fast.kernels.multiplicative_update import TUNING_REPORT
    except Exception:
        return []
    out = []
    for key, rep in TUNING_REPORT.items():
        out.append({"key": str(key), "limit": rep["limit"], "chosen": rep["chosen"],
                    "times_ms": {str(c): t for c, t in rep["times_ms"].items()},
                    "dropped": [{**d, "config": str(d["config"])} for d in rep["dropped"]]})
        print(f"triton update tuning: chose {rep['chosen']} of {len(rep['times_ms'])} timed, "
              f"dropped {len(rep['dropped'])} ({key})")
    return out


def speed_table(d: int, d_in: int, reps: int, check_cols: int, device: str, rows: list,
                impls: list[str]) -> None:
    E64 = real_edit(d, device)
    eye = torch.eye(d, device=device, dtype=torch.float64)
    forms = {
        "delta fp32 E": (E64.float(), "delta"),
        "mult fp64 D": (eye + E64, "multiplier"),
        "mult fp32 D": ((eye + E64).float(), "multiplier"),
    }
    if "cuda" not in impls and device == "cuda":
        print(f"(cuda backend unavailable: {cuda_backend.why_unavailable()})")
    w_bytes = d * d_in * 2
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    print(f"\nmultiplicative_update_  W bf16 [{d}, {d_in}] ({w_bytes / 2**20:.0f} MiB), real-edit E (1% scaling + "
          f"rank 64), {name}")
    hdr = (f"{'impl':<6} {'layout':<6} {'form':<13} {'kernel':<32} {'time ms':>9} {'extra MiB':>10} {'% of W':>7} "
           f"{'x floor':>8} {'wrong':>9} {'max ulp':>8}")
    print(hdr)
    print("-" * len(hdr))
    g = torch.Generator(device=device).manual_seed(1)
    D16 = (eye + E64).to(torch.bfloat16)
    for layout in ("row", "col"):
        W0 = (0.02 * torch.randn(d, d_in, device=device, generator=g)).to(torch.bfloat16)
        if layout == "col":
            W0 = W0.t().contiguous().t()
        floor = timed(lambda W0=W0: torch.mm(D16, W0), reps, device)
        floor_kernel = "cuBLAS bf16 (out of place)" if device == "cuda" else "torch.mm bf16 (CPU)"
        print(f"{'bf16':<6} {layout:<6} {'GEMM floor':<13} {floor_kernel:<32} {floor * 1e3:9.2f} "
              f"{'':>10} {'':>7} {1.0:8.2f}")
        rows.append({"shape": f"{layout} floor", "impl": "bf16 GEMM", "seconds": floor, "counts_for": []})
        before = W0[:, :check_cols].clone()
        for form_name, (M, form) in forms.items():
            for impl in impls:
                fn = backend_fn("multiplicative_update_", impl)
                W = W0.clone()
                try:
                    kernel = kernel_name(impl, W, M, form, device)
                    fn(W, M, form=form)  # accuracy: one application to a fresh copy
                    sync(device)
                    wrong, max_ulp = accuracy(W[:, :check_cols], before, E64)
                    sec = timed(lambda fn=fn, W=W, M=M, form=form: fn(W, M, form=form), reps, device)
                    extra = peak_extra(lambda fn=fn, W=W, M=M, form=form: fn(W, M, form=form), device)
                except Exception as e:  # one failing implementation must not hide the others
                    print(f"{impl:<6} {layout:<6} {form_name:<13} failed: {type(e).__name__}: {e}")
                    rows.append({"shape": f"{layout} {form_name}", "impl": impl, "seconds": None,
                                 "error": f"{type(e).__name__}: {e}",
                                 "counts_for": ["multiplicative_update_"] if form_name == "delta fp32 E" else []})
                    continue
                print(f"{impl:<6} {layout:<6} {form_name:<13} {kernel:<32} {sec * 1e3:9.2f} {extra / 2**20:10.0f} "
                      f"{100 * extra / w_bytes:6.1f}% {sec / floor:8.2f} {wrong:9.2e} {max_ulp:8.2f}")
                rows.append({"shape": f"{layout} {form_name}", "impl": impl, "kernel": kernel, "seconds": sec,
                             "extra_bytes": extra, "x_floor": sec / floor, "wrong": wrong, "max_ulp": max_ulp,
                             "counts_for": ["multiplicative_update_"] if form_name == "delta fp32 E" else []})
                del W
        del W0
        if device == "cuda":
            torch.cuda.empty_cache()


def survival_table(d: int, d_in: int, device: str, rows: list, impls: list[str]) -> None:
    g = torch.Generator(device=device).manual_seed(1)
    W0 = (0.02 * torch.randn(d, d_in, device=device, generator=g)).to(torch.bfloat16)
    W0d = W0.double()
    U = torch.randn(d, 4, device=device, generator=g, dtype=torch.float64)
    V = torch.randn(d, 4, device=device, generator=g, dtype=torch.float64)
    E0 = U @ V.T
    unit = float((E0 @ W0d).abs().mean()) / (2.0**-7 * float(W0d.abs().mean()))  # |ΔW| in ulps
    print(f"\nsurvival of a small rank-4 edit on W bf16 [{d}, {d_in}] (fraction of ΔW kept; error / ‖ΔW‖), "
          "delta form, fp32 E, stochastic seed derived from E")
    hdr = (f"{'|ΔW| / ulp':>10} {'impl':<6} {'nearest kept':>13} {'stoch. kept':>12} {'nearest err':>12} "
           f"{'stoch. err':>11}")
    print(hdr)
    print("-" * len(hdr))
    for size in (0.02, 0.1, 0.3, 1.0):
        E = (E0 * (size / unit)).float()
        exact = E.double() @ W0d
        nrm2 = float((exact * exact).sum())
        for impl in impls:
            fn = backend_fn("multiplicative_update_", impl)
            row = []
            for sr in (False, True):
                W = W0.clone()
                fn(W, E, form="delta", stochastic_rounding=sr)
                got = W.double() - W0d
                row.append((float((got * exact).sum()) / nrm2, float((got - exact).norm()) / nrm2**0.5))
            print(f"{size:10.2f} {impl:<6} {row[0][0]:13.3f} {row[1][0]:12.3f} {row[0][1]:12.3f} {row[1][1]:11.3f}")
            rows.append({"size_ulp": size, "impl": impl, "nearest_kept": row[0][0], "stochastic_kept": row[1][0],
                         "nearest_err": row[0][1], "stochastic_err": row[1][1]})


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--d", type=int, default=8192)
    ap.add_argument("--d-in", type=int, default=28672)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--check-cols", type=int, default=1024)
    ap.add_argument("--survival-d", type=int, default=2048)
    ap.add_argument("--survival-d-in", type=int, default=8192)
    ap.add_argument("--impls", help="comma-separated implementations (default: every available backend; "
                    "triton on CPU needs TRITON_INTERPRET=1)")
    ap.add_argument("--json", help="write the rows here")
    args = ap.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    impls = args.impls.split(",") if args.impls else available_impls(device)
    if impls[0] != "torch":  # the ratio base and the preference rule's reference
        impls = ["torch", *[i for i in impls if i != "torch"]]
    rows, survival = [], []
    speed_table(args.d, args.d_in, args.reps, min(args.check_cols, args.d_in), device, rows, impls)
    survival_table(args.survival_d, args.survival_d_in, device, survival, impls)
    tuning = triton_tuning()
    if args.json:
        with open(args.json, "w") as f:
            name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
            json.dump({"device": name, "shape": [args.d, args.d_in], "impls": impls, "rows": rows,
                       "survival": survival, "triton_tuning": tuning}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
