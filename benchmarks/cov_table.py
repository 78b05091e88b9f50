"""Table: ``cov_accumulate`` throughput (tokens/s per layer) and accuracy, per implementation.

    python benchmarks/cov_table.py                 # GPU: 8B and 70B MLP shapes; CPU: a small table
    python benchmarks/cov_table.py --reps 10 --pad 0.1

Rows: the reference formulation (kept rows gathered, cast to fp32, fp32 ``addmm`` of the full
square), the plain-PyTorch default ("torch"), the Triton kernel ("triton") and the CUDA C++
extension ("cuda") when available. Shapes: 8B (d_ff 14336, d 4096) and 70B (d_ff 28672, d 8192),
bf16 activations as a hooked [2, 4096, width] tensor (8192 tokens, the last ``--pad`` of the last
sequence masked as padding), KKᵀ only and fused KKᵀ+VKᵀ. "extra MiB" is the peak memory allocated
during the call above what was live before it (gathered copies, fp32 casts, product temporaries).
Then the relative error (Frobenius, upper triangle for kk) vs float64 on a smaller case, for bf16
and fp32 activations.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_cov_accumulate import call, impl_fn, impls_for, make_inputs  # noqa: E402

GPU_MODELS = {"8B": (14336, 4096), "70B": (28672, 8192)}
CPU_MODELS = {"tiny": (1024, 512)}


def timed(run, reps: int, device: str) -> float:
    """Median seconds per call (after one warm-up call, which also compiles/tunes)."""
    import time

    run()
    times = []
    for _ in range(reps):
        if device == "cuda":
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            run()
            times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]


def peak_extra(run, device: str) -> float:
    if device != "cuda":
        return float("nan")
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    run()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def speed_table(models: dict, batch: int, seq: int, reps: int, pad: float, device: str) -> None:
    impls = impls_for(device)
    impls = ["torch"] + [i for i in impls if i != "torch"]  # torch first: the ratio column's base
    hdr = (f"{'model':<6} {'d_ff':>6} {'d':>5} {'op':<6} {'impl':<10} {'ms/call':>9} {'tokens/s':>12} "
           f"{'TFLOP/s':>8} {'extra MiB':>10} {'vs torch':>9}")
    print(hdr)
    print("-" * len(hdr))
    for model, (d_ff, d) in models.items():
        for fused in (False, True):
            keys, mask, values, acc = make_inputs(batch, seq, d_ff, d, fused=fused, device=device, pad=pad)
            tokens = int(mask.sum())
            # Useful work: the full Gram (2·n·d_ff²) plus, fused, the cross term (2·n·d·d_ff).
            flops = 2.0 * tokens * d_ff * d_ff + (2.0 * tokens * d * d_ff if fused else 0.0)
            results = {}
            for impl in impls:
                fn = impl_fn(impl)

                def run(fn=fn, acc=acc, keys=keys, mask=mask, values=values):
                    call(fn, acc, keys, mask, values)

                try:
                    sec = timed(run, reps, device)
                    extra = peak_extra(run, device)
                except Exception as e:  # one failing backend must not hide the others
                    print(f"{model:<6} {d_ff:>6} {d:>5} {'kk+vk' if fused else 'kk':<6} {impl:<10} "
                          f"failed: {type(e).__name__}: {e}")
                    continue
                results[impl] = sec
                ratio = results["torch"] / sec if "torch" in results else float("nan")
                print(f"{model:<6} {d_ff:>6} {d:>5} {'kk+vk' if fused else 'kk':<6} {impl:<10} "
                      f"{sec * 1e3:9.2f} {tokens / sec:12.4g} {flops / sec / 1e12:8.1f} {extra:10.0f} "
                      f"{ratio:8.2f}x")
            del keys, mask, values, acc
            if device == "cuda":
                torch.cuda.empty_cache()


def _relerr(got, ref) -> float:
    got, ref = got.double(), ref.double()
    return float((got - ref).norm() / ref.norm())


def error_table(d_ff: int, d: int, batch: int, seq: int, pad: float, device: str) -> None:
    print(f"\nrelative error vs float64 (Frobenius; kk over its upper triangle), "
          f"[{batch}, {seq}] rows, d_ff {d_ff}, d {d}, fused")
    hdr = f"{'dtype':<9} {'impl':<10} {'kk':>10} {'ks':>10} {'vk':>10} {'vs':>10}"
    print(hdr)
    print("-" * len(hdr))
    up = torch.triu(torch.ones(d_ff, d_ff, dtype=torch.bool, device=device))
    for dtype in (torch.bfloat16, torch.float32):
        keys, mask, values, _ = make_inputs(batch, seq, d_ff, d, fused=True, device=device, dtype=dtype, pad=pad)
        k = keys[mask].double()
        v = values[mask].double()
        ref_kk, ref_vk = k.T @ k, v.T @ k
        for impl in impls_for(device):
            _, _, _, acc = make_inputs(1, 1, d_ff, d, fused=True, device=device)  # fresh zero accumulators
            try:
                call(impl_fn(impl), acc, keys, mask, values)
            except Exception as e:
                print(f"{str(dtype).replace('torch.', ''):<9} {impl:<10} failed: {type(e).__name__}: {e}")
                continue
            errs = (_relerr(acc["kk"][up], ref_kk[up]), _relerr(acc["ks"], k.sum(0)),
                    _relerr(acc["vk"], ref_vk), _relerr(acc["vs"], v.sum(0)))
            print(f"{str(dtype).replace('torch.', ''):<9} {impl:<10} " + " ".join(f"{e:10.2e}" for e in errs))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--pad", type=float, default=0.1, help="fraction of the last sequence that is padding")
    ap.add_argument("--models", default="8B,70B", help="comma-separated subset of 8B,70B (GPU)")
    args = ap.parse_args(argv)
    if torch.cuda.is_available():
        print(f"cov_accumulate on {torch.cuda.get_device_name()}, bf16 activations, 8192-row batches "
              f"([2, 4096], last {args.pad:.0%} of the last sequence padding)")
        models = {m: GPU_MODELS[m] for m in args.models.split(",") if m}
        speed_table(models, 2, 4096, args.reps, args.pad, "cuda")
        error_table(4096, 1024, 2, 2048, args.pad, "cuda")
    else:
        print("no CUDA device: small CPU table only (triton/cuda backends need a GPU; 8B/70B shapes skipped)")
        speed_table(CPU_MODELS, 2, 1024, args.reps, args.pad, "cpu")
        error_table(256, 128, 2, 300, args.pad, "cpu")
    return 0


if __name__ == "__main__":
    sys.exit(main())
