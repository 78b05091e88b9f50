"""Table of ``multiplicative_update_`` at 70B shapes, and how much of a small edit survives rounding.

    python benchmarks/update_table.py                  # d 8192, d_in 28672 (needs a GPU)
    python benchmarks/update_table.py --d 1024 --d-in 4096 --reps 3

Part 1, per implementation (torch chunked default, CUDA extension) and W layout: median time,
peak extra memory over what W and D already take (torch.cuda.max_memory_allocated), that memory
as a share of W, and the time as a multiple of one bf16 cuBLAS GEMM of the same shape.

Part 2: W bf16, D = I + E with a small rank-4 E (|ΔW| from 2% to 100% of a bf16 ulp): the fraction
of the exact edit ΔW = E W found in the rounded result, <W₁ - W₀, ΔW> / ‖ΔW‖², with nearest and
with stochastic rounding, plus ‖W₁ - W₀ - ΔW‖ / ‖ΔW‖ (the rounding error relative to the edit).
"""

from __future__ import annotations

import argparse
import statistics
import sys

import torch

from zu_fast.ops import backend_fn, cuda_backend


def timed(fn, reps: int) -> float:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def peak_extra(fn) -> int:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def speed_table(d: int, d_in: int, reps: int) -> None:
    g = torch.Generator(device="cuda").manual_seed(0)
    D = torch.eye(d, device="cuda") + 1e-3 * torch.randn(d, d, device="cuda", generator=g)
    D16 = D.to(torch.bfloat16)
    impls = ["torch"] + (["cuda"] if cuda_backend.is_available() else [])
    if "cuda" not in impls:
        print(f"(cuda backend unavailable: {cuda_backend.why_unavailable()})")
    w_bytes = d * d_in * 2
    print(f"\nmultiplicative_update_  W bf16 [{d}, {d_in}] ({w_bytes / 2**20:.0f} MiB), D fp32, "
          f"{torch.cuda.get_device_name()}")
    hdr = (f"{'impl':<10} {'layout':<6} {'kernel':<26} {'time ms':>9} {'extra MiB':>10} {'% of W':>7} "
           f"{'x bf16 GEMM':>12}")
    print(hdr)
    print("-" * len(hdr))
    for layout in ("row", "col"):
        W = torch.randn(d, d_in, device="cuda", generator=g).to(torch.bfloat16)
        if layout == "col":
            W = W.t().contiguous().t()
        gemm_ms = timed(lambda W=W: torch.mm(D16, W), reps)
        gemm_extra = peak_extra(lambda W=W: torch.mm(D16, W))
        print(f"{'bf16 GEMM':<10} {layout:<6} {'cuBLAS (out of place)':<26} {gemm_ms:9.2f} "
              f"{gemm_extra / 2**20:10.0f} {100 * gemm_extra / w_bytes:6.1f}% {1.0:12.2f}")
        for impl in impls:
            fn = backend_fn("multiplicative_update_", impl)
            kernel = "chunked fp32 matmul"
            if impl == "cuda":
                kernel = cuda_backend.load_extension().update_kernel(W, D)
            ms = timed(lambda fn=fn, W=W: fn(W, D), reps)
            extra = peak_extra(lambda fn=fn, W=W: fn(W, D))
            print(f"{impl:<10} {layout:<6} {kernel:<26} {ms:9.2f} {extra / 2**20:10.0f} "
                  f"{100 * extra / w_bytes:6.1f}% {ms / gemm_ms:12.2f}")
        del W


def survival_table(d: int, d_in: int) -> None:
    g = torch.Generator(device="cuda").manual_seed(1)
    W0 = (0.02 * torch.randn(d, d_in, device="cuda", generator=g)).to(torch.bfloat16)
    W0d = W0.double()
    U = torch.randn(d, 4, device="cuda", generator=g, dtype=torch.float64)
    V = torch.randn(d, 4, device="cuda", generator=g, dtype=torch.float64)
    E0 = U @ V.T
    unit = float((E0 @ W0d).abs().mean()) / (2.0**-7 * float(W0d.abs().mean()))  # |ΔW| in ulps
    impls = ["torch"] + (["cuda"] if cuda_backend.is_available() else [])
    print(f"\nsurvival of a small rank-4 edit on W bf16 [{d}, {d_in}] (fraction of ΔW kept; error / ‖ΔW‖)")
    hdr = (f"{'|ΔW| / ulp':>10} {'impl':<6} {'nearest kept':>13} {'stoch. kept':>12} {'nearest err':>12} "
           f"{'stoch. err':>11}")
    print(hdr)
    print("-" * len(hdr))
    for size in (0.02, 0.1, 0.3, 1.0):
        E = E0 * (size / unit)
        D = (torch.eye(d, device="cuda", dtype=torch.float64) + E).float()
        exact = E @ W0d
        nrm2 = float((exact * exact).sum())
        for impl in impls:
            fn = backend_fn("multiplicative_update_", impl)
            row = []
            for sr in (False, True):
                W = W0.clone()
                if impl == "torch":
                    fn(W, D, stochastic_rounding=sr, generator=torch.Generator(device="cuda").manual_seed(2))
                else:
                    fn(W, D, stochastic_rounding=sr, seed=2)
                got = W.double() - W0d
                row.append((float((got * exact).sum()) / nrm2, float((got - exact).norm()) / nrm2**0.5))
            print(f"{size:10.2f} {impl:<6} {row[0][0]:13.3f} {row[1][0]:12.3f} {row[0][1]:12.3f} {row[1][1]:11.3f}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--d", type=int, default=8192)
    ap.add_argument("--d-in", type=int, default=28672)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--survival-d", type=int, default=2048)
    ap.add_argument("--survival-d-in", type=int, default=8192)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("update_table.py needs a CUDA device")
        return 0
    speed_table(args.d, args.d_in, args.reps)
    survival_table(args.survival_d, args.survival_d_in)
    return 0


if __name__ == "__main__":
    sys.exit(main())
