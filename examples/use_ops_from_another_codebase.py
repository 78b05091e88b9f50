"""Using zu_fast's ops from a MEMIT-style editing loop (runs on CPU with a tiny random Llama).

A MEMIT/AlphaEdit code base needs three things that zu_fast provides as drop-in pieces:

1. ``zu_fast.compat.layer_stats`` — same signature/return shape as their ``layer_stats``:
   ``stat.mom2.moment()`` is C = E[k kᵀ] of the edited module's input, computed by zu_fast's
   one-pass engine and cached;
2. ``zu_fast.ops.cov_accumulate`` — if the code base accumulates its own statistics (e.g. over
   the keys of the edit requests), the fused in-place K ᵀK / Σk / n update (Triton/CUDA on GPU);
3. ``zu_fast.ops.multiplicative_update_`` — W ← D W in place, chunked, one rounding; any editor
   whose update is a left multiplication (ZeroUnlearn, or W + ΔW written as (I + ΔW W⁺) W) can
   apply it without a full-size fp32 copy of W.

    python examples/use_ops_from_another_codebase.py
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the tiny test model (no download)
from tiny_models import corpus, llama  # noqa: E402

from zu_fast import ops  # noqa: E402
from zu_fast.compat import layer_stats  # noqa: E402


def compute_keys(model, tok, prompts: list[str], layer_name: str) -> torch.Tensor:
    """The edit keys: input of ``layer_name`` at each prompt's last token   [N, d_in] (as MEMIT does)."""
    keys = []
    h = model.get_submodule(layer_name).register_forward_hook(lambda m, a, o: keys.append(a[0][0, -1]))
    with torch.no_grad():
        for p in prompts:
            model(**tok(p, return_tensors="pt"))
    h.remove()
    return torch.stack(keys)


def main() -> None:
    model, tok = llama()
    layer_name = "model.layers.2.mlp.down_proj"
    W = model.get_submodule(layer_name).weight  # [d, d_in]
    with tempfile.TemporaryDirectory() as stats_dir:
        # 1. the corpus second moment, exactly as MEMIT's get_cov() reads it
        stat = layer_stats(model, tok, layer_name, stats_dir, corpus(64), to_collect=["mom2"],
                           sample_size=64, precision="float32", progress=None)
        C = stat.mom2.moment().double()  # [d_in, d_in]
        print(f"corpus statistics: {stat.mom2.count} tokens, C {tuple(C.shape)}, cached at {stat.path}")

    # 2. statistics of the edit keys with the fused op (accumulators fp32/fp64, counter on the device)
    prompts = ["Alice Morvan was born in", "Bob Kestrel works for", "Carla Dunmore plays the"]
    K = compute_keys(model, tok, prompts, layer_name)  # [N, d_in]
    d_in = K.shape[1]
    kk = torch.zeros(d_in, d_in)  # [d_in, d_in] fp32
    ks = torch.zeros(d_in, dtype=torch.float64)
    n = torch.zeros((), dtype=torch.int64)
    ops.cov_accumulate(kk, ks, n, K)  # in place: kk += KᵀK (upper triangle), ks += Σk, n += N
    ops.symmetrize_upper_(kk)
    assert torch.allclose(kk, K.t() @ K, atol=1e-5) and int(n) == len(prompts)

    # 3. a MEMIT-style least-squares edit, written multiplicatively: move each key's output by R
    #    (here: toward zero), keeping outputs on the corpus keys:  D W (λC + KKᵀ) Wᵀ = (W(λC + KKᵀ) + R Kᵀ) Wᵀ
    Wd = W.detach().double()
    R = -(Wd @ K.double().t())  # [d, N] the change each key's output should get
    lam = 1.0
    M = lam * C + kk.double()
    B = Wd @ M @ Wd.t() + 1e-6 * torch.eye(Wd.shape[0], dtype=torch.float64)
    A = (Wd @ M + R @ K.double()) @ Wd.t()
    D = torch.linalg.solve(B, A, left=False)  # D = A B⁻¹   [d, d]
    before = (W.detach() @ K.t()).norm().item()
    ops.multiplicative_update_(W.data, D)  # W ← D W in place, one rounding to W's dtype
    after = (W.detach() @ K.t()).norm().item()
    print(f"edit-key outputs ‖W K‖: {before:.4f} → {after:.4f} "
          f"(backend {ops.choose('multiplicative_update_', W.device.type).name})")


if __name__ == "__main__":
    main()
