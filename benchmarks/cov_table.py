"""Table: ``cov_accumulate`` throughput (tokens/s per layer) and accuracy, per implementation.

    python benchmarks/cov_table.py --json out.json     # GPU: 8B and 70B MLP shapes; CPU: a small table
    python benchmarks/cov_table.py --reps 10 --pad 0.1 --models 8B

Rows per shape: "bound" (the tokens/s the upper-triangle work would reach at the bf16 matrix rate
measured on this device by one large torch.mm; no row can beat it), "torch.mm" (one unchunked
``torch.mm(Kᵀ, K, out_dtype=fp32)`` of the full square: the plain cuBLAS speed, with one
truncating accumulator over the whole batch), the reference formulation (kept rows gathered, fp32
``addmm``), and every registered backend available here: "torch" (the default: cuBLAS calls of
2048 rows, each added in the GEMM epilogue), "triton", "cuda". Shapes: 8B (d_ff 14336, d 4096) and
70B (d_ff 28672, d 8192), bf16 activations as a hooked [4, 4096, width] tensor (16,384 tokens, the
last ``--pad`` of the last sequence padding), KKᵀ only and fused KKᵀ+VKᵀ. "extra MiB" is the peak
memory allocated during the call above what was live before it. Then the relative error
(Frobenius, upper triangle for kk) vs float64 on a smaller case, for bf16 and fp32 activations.

``--json`` writes every row (``counts_for`` marks the rows the backend-preference rule compares:
the registered backends, torch included) for ``python -m zu_fast.ops.preferences record-speed``.
"""

from __future__ import annotations

import argparse
import json
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


def matmul_rate(device: str) -> float:
    """bf16 FLOP/s of one large torch.mm on random data (the ceiling the bound row uses)."""
    n = 8192 if device == "cuda" else 1024
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    sec = timed(lambda: torch.mm(a, b), 10 if device == "cuda" else 2, device)
    return 2.0 * n**3 / sec


def mm_unchunked(kk, ks, n, keys, mask=None, *, values=None, vk=None, vs=None) -> None:
    """One cuBLAS product per call (full square, fp32 output, no row chunks): the plain speed."""
    k = keys.reshape(-1, keys.shape[-1])
    if mask is not None:
        k = k[mask.reshape(-1)]
    out = {"out_dtype": torch.float32} if k.is_cuda and k.dtype != torch.float32 else {}
    if not k.is_cuda:  # no out_dtype on CPU: upcast (CPU only runs the small smoke table)
        k = k.float()
    kk.add_(torch.mm(k.t(), k, **out))
    ks.add_(k.sum(0, dtype=ks.dtype))
    n.add_(k.shape[0])
    if values is not None:
        v = values.reshape(-1, values.shape[-1])
        v = v[mask.reshape(-1)] if mask is not None else v
        v = v if v.is_cuda else v.float()
        vk.add_(torch.mm(v.t(), k, **out))
        vs.add_(v.sum(0, dtype=vs.dtype))


def speed_table(models: dict, batch: int, seq: int, reps: int, pad: float, device: str, rows: list) -> None:
    # torch first: the ratio column's base; on a GPU the fp32 reference formulation is left out (an
    # fp32 CUDA-core GEMM of the full square: seconds per call at 70B, and no backend candidate)
    impls = [i for i in impls_for(device) if i != "torch" and not (device == "cuda" and i == "reference")]
    impls = ["torch", *impls]
    rate = matmul_rate(device)
    print(f"matrix rate measured here ({'bf16' if device == 'cuda' else 'fp32'} torch.mm, one large product): "
          f"{rate / 1e12:.3g} TFLOP/s")
    hdr = (f"{'model':<6} {'d_ff':>6} {'d':>5} {'op':<6} {'impl':<10} {'ms/call':>9} {'tokens/s':>12} "
           f"{'TFLOP/s':>8} {'extra MiB':>10} {'vs torch':>9}")
    print(hdr)
    print("-" * len(hdr))
    for model, (d_ff, d) in models.items():
        for fused in (False, True):
            keys, mask, values, acc = make_inputs(batch, seq, d_ff, d, fused=fused, device=device, pad=pad)
            tokens = int(mask.sum())
            op = "kk+vk" if fused else "kk"
            shape = f"{model} {op}"
            # Useful work: the upper triangle of the Gram (d_ff(d_ff+1) per token) plus, fused, the
            # cross term (2·d·d_ff per token); the bound is that work at the measured matrix rate.
            flops = tokens * (d_ff * (d_ff + 1) + (2.0 * d * d_ff if fused else 0.0))
            print(f"{model:<6} {d_ff:>6} {d:>5} {op:<6} {'bound':<10} {flops / rate * 1e3:9.2f} "
                  f"{tokens * rate / flops:12.4g} {rate / 1e12:8.3g}")
            rows.append({"shape": shape, "impl": "bound", "seconds": flops / rate, "tokens": tokens, "counts_for": []})
            results = {}
            for impl in ["torch.mm", *impls]:
                fn = mm_unchunked if impl == "torch.mm" else impl_fn(impl)

                def run(fn=fn, acc=acc, keys=keys, mask=mask, values=values):
                    call(fn, acc, keys, mask, values)

                try:
                    sec = timed(run, reps, device)
                    extra = peak_extra(run, device)
                except Exception as e:  # one failing backend must not hide the others
                    print(f"{model:<6} {d_ff:>6} {d:>5} {op:<6} {impl:<10} failed: {type(e).__name__}: {e}")
                    rows.append({"shape": shape, "impl": impl, "seconds": None, "error": f"{type(e).__name__}: {e}",
                                 "counts_for": [] if impl in ("torch.mm", "reference") else ["cov_accumulate"]})
                    continue
                results[impl] = sec
                ratio = results["torch"] / sec if "torch" in results else float("nan")
                print(f"{model:<6} {d_ff:>6} {d:>5} {op:<6} {impl:<10} "
                      f"{sec * 1e3:9.2f} {tokens / sec:12.4g} {flops / sec / 1e12:8.3g} {extra:10.0f} "
                      f"{ratio:8.2f}x")
                rows.append({"shape": shape, "impl": impl, "seconds": sec, "tokens": tokens, "extra_mib": extra,
                             "counts_for": [] if impl in ("torch.mm", "reference") else ["cov_accumulate"]})
            del keys, mask, values, acc
            if device == "cuda":
                torch.cuda.empty_cache()


def _relerr(got, ref) -> float:
    got, ref = got.double(), ref.double()
    return float((got - ref).norm() / ref.norm())


def error_table(d_ff: int, d: int, batch: int, seq: int, pad: float, device: str, rows: list) -> None:
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
        for impl in ["torch.mm", *impls_for(device)]:
            _, _, _, acc = make_inputs(1, 1, d_ff, d, fused=True, device=device)  # fresh zero accumulators
            try:
                call(mm_unchunked if impl == "torch.mm" else impl_fn(impl), acc, keys, mask, values)
            except Exception as e:
                print(f"{str(dtype).replace('torch.', ''):<9} {impl:<10} failed: {type(e).__name__}: {e}")
                continue
            errs = (_relerr(acc["kk"][up], ref_kk[up]), _relerr(acc["ks"], k.sum(0)),
                    _relerr(acc["vk"], ref_vk), _relerr(acc["vs"], v.sum(0)))
            print(f"{str(dtype).replace('torch.', ''):<9} {impl:<10} " + " ".join(f"{e:10.2e}" for e in errs))
            rows.append({"dtype": str(dtype), "impl": impl, "rows": int(mask.sum()),
                         "rel_err": dict(zip(("kk", "ks", "vk", "vs"), errs))})


def triton_tuning() -> list:
    """What the Triton autotuner tried, chose and dropped (shared memory over the device's limit)."""
    try:
        from zu_fast.kernels.cov_accumulate import TUNING_REPORT
    except Exception:
        return []
    out = []
    for key, rep in TUNING_REPORT.items():
        out.append({"key": str(key), "limit": rep["limit"], "chosen": rep["chosen"],
                    "times_ms": {str(c): t for c, t in rep["times_ms"].items()},
                    "dropped": [{**d, "config": str(d["config"])} for d in rep["dropped"]]})
        print(f"triton tuning {key}: chose {rep['chosen']}, dropped {len(rep['dropped'])}: "
              + "; ".join(f"{d['config']} ({d.get('shared_bytes', d.get('error'))} > {rep['limit']})"
                          for d in rep["dropped"]))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--pad", type=float, default=0.1, help="fraction of the last sequence that is padding")
    ap.add_argument("--models", default="8B,70B", help="comma-separated subset of 8B,70B (GPU)")
    ap.add_argument("--json", help="write the rows here")
    args = ap.parse_args(argv)
    rows, errors = [], []
    if torch.cuda.is_available():
        device_name = torch.cuda.get_device_name()
        print(f"cov_accumulate on {device_name}, bf16 activations, 16384-row batches "
              f"([4, 4096], last {args.pad:.0%} of the last sequence padding)")
        models = {m: GPU_MODELS[m] for m in args.models.split(",") if m}
        speed_table(models, 4, 4096, args.reps, args.pad, "cuda", rows)
        error_table(4096, 1024, 4, 4096, args.pad, "cuda", errors)
    else:
        device_name = "cpu"
        print("no CUDA device: small CPU table only (triton/cuda backends need a GPU; 8B/70B shapes skipped)")
        speed_table(CPU_MODELS, 2, 1024, args.reps, args.pad, "cpu", rows)
        error_table(256, 128, 2, 300, args.pad, "cpu", errors)
    tuning = triton_tuning()
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": device_name, "rows": rows, "errors": errors, "triton_tuning": tuning}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
