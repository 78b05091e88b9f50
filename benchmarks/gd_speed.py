"""ZeroUnlearn-GD: dense float64 reference vs zu_fast's gd_update — time and quality, printed as a table.

    python benchmarks/gd_speed.py                  # CPU, the small model's shapes (+ real problems if cached)
    python benchmarks/gd_speed.py --real 50        # also the small model's real layer problems, 50 records
    python benchmarks/gd_speed.py --gpu-steps 20   # with CUDA: 8B shapes (d 4096, d_in 14336)

Columns: reference time (full SVD of C + 500 Adam steps through a dense P_null, float64, autograd);
zu_fast cold (eigendecomposition included), warm (eigenbasis cached — the case for every call after
the first on a layer's statistics), and "full" (no early stop, i.e. the per-step speed-up alone);
steps taken; final loss; relative difference of ΔW and of the forget outputs W'K_f against the
reference; and ``gd_variable="null"`` (Adam on the null-space coordinates: the same objective, not the
same iterates) with its time, steps, final loss, forget-output difference and C-norm ratio (its edit's
sqrt(tr ΔW C ΔWᵀ) over the reference's: how much it moves the corpus keys). On CUDA at 8B shapes
the reference runs only ``--gpu-steps`` steps and all are reported per step and extrapolated to
gd_steps (the reference would take minutes).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_gd import gd_problem, reference_gd  # noqa: E402  (the faithful dense reference lives with its tests)

from zu_fast import UnlearnConfig  # noqa: E402
from zu_fast.method import gd as gd_mod  # noqa: E402
from zu_fast.stats.moments import LayerStats  # noqa: E402


def _sync(dev) -> None:
    if torch.device(dev).type == "cuda":
        torch.cuda.synchronize()


def _fresh(st: LayerStats) -> LayerStats:
    """A copy without the cached eigenbasis (a cold start)."""
    return LayerStats(st.layer, st.kk.clone(), st.ks, st.n)


def compare(name: str, W, st, K, R, U, cfg, bias=None, repeats: int = 1) -> dict:
    """Time reference vs fast on one layer problem and measure the quality difference."""
    dev = W.device
    C = st.second_moment(torch.float64)

    def best(fn):
        out, t = None, float("inf")
        for _ in range(repeats):
            _sync(dev)
            t0 = time.perf_counter()
            out = fn()
            _sync(dev)
            t = min(t, time.perf_counter() - t0)
        return out, t

    (dW_ref, losses_ref, _), t_ref = best(lambda: reference_gd(W, C, K, R, U, cfg, bias=bias))
    cold = _fresh(st)
    (dW_cold, info_cold), t_cold = best(lambda: gd_mod.gd_update(W, _fresh(st), K, R, U, cfg, bias=bias))
    gd_mod.eigh_of(cold)  # warm the cache on this object
    (dW, info), t_warm = best(lambda: gd_mod.gd_update(W, cold, K, R, U, cfg, bias=bias))
    (dW_full, info_full), t_full = best(lambda: gd_mod.gd_update(W, cold, K, R, U, cfg, bias=bias, tol=0.0))
    # gd_variable="null": Adam on the null-space coordinates (a different trajectory of the same objective)
    (dW_null, info_null), t_null = best(lambda: gd_mod.gd_update(W, cold, K, R, U, cfg.replace(gd_variable="null"),
                                                                   bias=bias))
    Kd, Wd = K.double(), W.double()
    base = Wd @ Kd
    out_ref = (Wd + dW_ref) @ Kd  # forget outputs after the reference edit  [d, N]

    def rel_out(x):
        return float(((Wd + x.double()) @ Kd - out_ref).norm() / (out_ref - base).norm().clamp_min(1e-30))

    def c_norm(x):
        x = x.double()
        return float(torch.einsum("ij,jk,ik->", x, C, x).clamp_min(0).sqrt())

    return {
        "problem": name,
        "shape": f"{W.shape[0]}x{W.shape[1]} N={K.shape[1]}",
        "null_rank": int(info["gd_null_rank"]),
        "ref_s": t_ref,
        "cold_s": t_cold,
        "warm_s": t_warm,
        "full_s": t_full,
        "speedup_cold": t_ref / t_cold,
        "speedup_warm": t_ref / t_warm,
        "speedup_full": t_ref / t_full,
        "steps": int(info["gd_steps"]),
        "loss_ref": losses_ref[-1],
        "loss_fast": info["gd_loss_final"],
        "dW_rel": float((dW.double() - dW_ref).norm() / dW_ref.norm().clamp_min(1e-30)),
        "dW_full_rel": float((dW_full.double() - dW_ref).norm() / dW_ref.norm().clamp_min(1e-30)),
        "out_rel": rel_out(dW),
        "null_var_s": t_null,
        "null_var_steps": int(info_null["gd_steps"]),
        "null_var_loss": info_null["gd_loss_final"],
        "null_var_out_rel": rel_out(dW_null),
        # ‖ΔW‖_C = sqrt(tr ΔW C ΔWᵀ): the edit's effect on the corpus keys, null variable / reference
        "null_var_cnorm_ratio": c_norm(dW_null) / max(c_norm(dW_ref), 1e-30),
    }


def real_problems(n_records: int, seed: int = 0, tinylm_spec: str | None = None) -> list[tuple]:
    """The small model's actual GD problems: capture gd_update's inputs during zu_fast.unlearn(method="gd")."""
    import zu_fast
    from zu_fast.eval import tinylm
    from zu_fast.eval.harness import tinylm_config

    c = tinylm_config(tinylm_spec)
    model, tok, world = tinylm.load_or_train(progress=False) if c is None else tinylm.load_or_train(c, progress=False)
    cfg = zu_fast.UnlearnConfig.for_model(model, method="gd", progress=False)
    stats = zu_fast.collect_stats(model, tok, world.training_texts(), cfg)
    captured = []
    orig = gd_mod.gd_update

    def spy(W, st, K, R, U, c, *, bias=None, **kw):
        captured.append((W.detach().clone(), st, K.detach().clone(), R.detach().clone(), U.detach().clone(),
                         None if bias is None else bias.detach().clone()))
        return orig(W, st, K, R, U, c, bias=bias, **kw)

    gd_mod.gd_update = spy
    try:
        edit = zu_fast.unlearn(model, tok, world.records(n_records, seed), cfg, stats=stats)
        edit.restore()
    finally:
        gd_mod.gd_update = orig
    return [(f"tinylm L{st.layer} n={n_records}", *c, cfg) for c in captured for st in [c[1]]]


def print_table(rows: list[dict], title: str) -> None:
    print(f"\n### {title}\n")
    cols = ["problem", "shape", "null_rank", "ref_s", "cold_s", "warm_s", "full_s", "speedup_cold", "speedup_warm",
            "speedup_full", "steps", "loss_ref", "loss_fast", "dW_rel", "dW_full_rel", "out_rel", "null_var_s",
            "null_var_steps", "null_var_loss", "null_var_out_rel", "null_var_cnorm_ratio"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        cells = []
        for c in cols:
            v = r[c]
            if isinstance(v, float):
                seconds = c in ("ref_s", "cold_s", "warm_s", "full_s", "null_var_s")
                cells.append(f"{v:.3f}" if seconds else f"{v:.3g}")
            else:
                cells.append(str(v))
        print("| " + " | ".join(cells) + " |")


def _cuda_problem(d: int, d_in: int, N: int, null_frac: float, seed: int = 0):
    """gd_problem's construction, built on the GPU (a CPU QR/product of 14336² would take minutes)."""
    from zu_fast.method.projector import representation_basis

    g = torch.Generator(device="cuda").manual_seed(seed)
    dev = "cuda"
    Q, _ = torch.linalg.qr(torch.randn(d_in, d_in, generator=g, device=dev))  # [d_in, d_in]
    k = int(round(null_frac * d_in))
    lam = torch.cat([torch.rand(k, generator=g, device=dev) * 3e-3,
                     0.1 + 2 * torch.rand(d_in - k, generator=g, device=dev)])
    n = 1000
    kk = (Q * (lam * n)) @ Q.t()  # [d_in, d_in]
    st = LayerStats(3, kk, torch.zeros(d_in, dtype=torch.float64, device=dev), n)
    W = (torch.randn(d, d_in, generator=g, device=dev) / d_in**0.5).bfloat16()  # [d, d_in]
    K = Q[:, k:] @ torch.randn(d_in - k, N, generator=g, device=dev)
    K = K + 0.3 * Q[:, :k] @ torch.randn(k, N, generator=g, device=dev)  # [d_in, N]
    R = 0.3 * torch.randn(d, N, generator=g, device=dev)  # [d, N]
    U = representation_basis(W.float() @ K).float()  # [d, N]
    return W, st, K, R, U


def gpu_rows(steps: int, d: int = 4096, d_in: int = 14336, N: int = 50) -> list[dict]:
    """8B shapes on CUDA: per-step time of the reference (float64, dense P) vs fast, extrapolated."""
    rows = []
    for null_frac in (0.25, 0.75):
        W, st, K, R, U = _cuda_problem(d, d_in, N, null_frac)
        cfg = UnlearnConfig(layers=[3], gd_steps=steps)
        C = st.second_moment(torch.float64)
        _sync("cuda")
        t0 = time.perf_counter()
        reference_gd(W, C, K, R, U, cfg)
        _sync("cuda")
        t_ref = time.perf_counter() - t0
        t0 = time.perf_counter()
        gd_mod.eigh_of(st)
        _sync("cuda")
        t_eig = time.perf_counter() - t0
        t0 = time.perf_counter()
        _, info = gd_mod.gd_update(W, st, K, R, U, cfg, tol=0.0)
        _sync("cuda")
        t_fast = time.perf_counter() - t0
        t0 = time.perf_counter()
        gd_mod.gd_update(W, st, K, R, U, cfg.replace(gd_variable="null"), tol=0.0)
        _sync("cuda")
        t_null = time.perf_counter() - t0
        full = UnlearnConfig().gd.steps
        rows.append({"shape": f"{d}x{d_in} N={N}", "null_rank": int(info["gd_null_rank"]),
                     "ref_ms_per_step": 1e3 * t_ref / steps, "fast_ms_per_step": 1e3 * t_fast / steps,
                     "null_var_ms_per_step": 1e3 * t_null / steps,
                     "eigh_s": t_eig, "per_step_speedup": t_ref / t_fast,
                     f"ref_{full}_steps_s_est": t_ref / steps * full,
                     f"fast_{full}_steps_s_est": t_fast / steps * full})
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--real", type=int, default=50, help="records for the small model's real problems (0: skip)")
    p.add_argument("--tinylm", default=None, metavar="JSON", help="TinyLMConfig overrides (as in zu-fast eval)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: stable timings on a shared CPU)")
    p.add_argument("--repeats", type=int, default=1, help="timing repeats (best of)")
    p.add_argument("--gpu-steps", type=int, default=20, help="reference steps timed at 8B shapes on CUDA")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = UnlearnConfig(layers=[3])  # reference hyper-parameters: lr 1e-3, 500 steps
    print(f"device: cpu ({torch.get_num_threads()} threads), torch {torch.__version__}; "
          f"gd_steps {cfg.gd.steps}, early stop tol {cfg.gd.tol} over {cfg.gd.window} steps")
    rows = []
    for null_frac in (0.1, 0.5, 0.9):  # the small model's shape: d 128, d_ff 512
        W, st, K, R, U, _ = gd_problem(d=128, d_in=512, N=50, null_frac=null_frac, seed=1)
        rows.append(compare(f"random null {null_frac:.0%}", W, st, K, R, U, cfg, repeats=args.repeats))
    print_table(rows, "CPU, small-model shapes, random problems")
    if args.real:
        try:
            problems = real_problems(args.real, tinylm_spec=args.tinylm)
        except Exception as e:  # the small model may not be trained/cached here
            print(f"\n(real problems skipped: {e!r})")
        else:
            real = [compare(name, W, st, K, R, U, c, bias=b, repeats=args.repeats)
                    for name, W, st, K, R, U, b, c in problems]
            print_table(real, "CPU, the small model's real layer problems")
    if torch.cuda.is_available():
        g = gpu_rows(args.gpu_steps)
        print(f"\n### CUDA ({torch.cuda.get_device_name(0)}), 8B shapes, {args.gpu_steps} steps timed\n")
        keys = list(g[0])
        print("| " + " | ".join(keys) + " |")
        print("|" + "---|" * len(keys))
        for r in g:
            print("| " + " | ".join(f"{r[k]:.3g}" if isinstance(r[k], float) else str(r[k]) for k in keys) + " |")
    else:
        print("\n(no CUDA device: the 8B-shape GPU comparison was not run)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
