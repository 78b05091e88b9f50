"""pytest-benchmark suite for ``cov_accumulate`` (kk += KᵀK, ks += Σk, n += rows [, vk += VᵀK, vs += Σv]).

    pytest benchmarks/bench_cov_accumulate.py --benchmark-only     # CPU sizes always, GPU sizes with CUDA

Every backend available on the device is measured ("torch" default everywhere; "triton" and "cuda"
on CUDA when available), plus "reference": the reference formulation (kept rows gathered, cast to
fp32, ``addmm`` of the full square). Activations arrive as a hooked [batch, seq, width] tensor with
an attention mask; KKᵀ-only and fused KKᵀ+VKᵀ. GPU shapes: 8B (d_ff 14336, d 4096) and 70B
(d_ff 28672, d 8192) MLPs, bf16, 16,384-token batches. ``benchmarks/cov_table.py`` prints the same
comparison as one table in tokens/s.
"""

from __future__ import annotations

import pytest
import torch

from zu_fast.ops import backend_fn, registry

HAS_CUDA = torch.cuda.is_available()
# (batch, seq, d_ff, d)
CPU_SHAPES = [(2, 256, 256, 128), (2, 1024, 1024, 512)]
GPU_SHAPES = {"8B": (4, 4096, 14336, 4096), "70B": (4, 4096, 28672, 8192)}


def reference_cov(kk, ks, n, keys, mask=None, *, values=None, vk=None, vs=None) -> None:
    """The reference formulation: gather kept rows, cast to fp32, fp32 addmm (full square)."""
    keep = mask.reshape(-1).bool() if mask is not None else None
    k = keys.reshape(-1, keys.shape[-1])
    k = (k[keep] if keep is not None else k).float()
    kk.addmm_(k.T, k)
    ks.add_(k.sum(0))
    n.add_(k.shape[0])
    if values is not None:
        v = values.reshape(-1, values.shape[-1])
        v = (v[keep] if keep is not None else v).float()
        vk.addmm_(v.T, k)
        vs.add_(v.sum(0))


def impls_for(device_type: str) -> list[str]:
    """"reference" plus every registered backend that runs (and is available) on this device type."""
    op = registry.get_op("cov_accumulate")
    names = [
        name for name, b in op.backends.items() if registry.supports(b, device_type) and b.is_available()
    ]
    return ["reference"] + sorted(names, key=lambda s: (s != "torch", s))


def impl_fn(name: str):
    return reference_cov if name == "reference" else backend_fn("cov_accumulate", name)


def make_inputs(batch, seq, d_ff, d, *, fused, device, dtype=torch.bfloat16, pad=0.1, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    keys = torch.randn(batch, seq, d_ff, device=device, dtype=dtype, generator=g)
    values = torch.randn(batch, seq, d, device=device, dtype=dtype, generator=g) if fused else None
    mask = torch.ones(batch, seq, dtype=torch.bool, device=device)
    mask[-1, int(seq * (1 - pad)):] = False  # right padding in the last sequence
    acc = dict(
        kk=torch.zeros(d_ff, d_ff, device=device),
        ks=torch.zeros(d_ff, device=device, dtype=torch.float64),
        n=torch.zeros((), dtype=torch.int64, device=device),
    )
    if fused:
        acc["vk"] = torch.zeros(d, d_ff, device=device)
        acc["vs"] = torch.zeros(d, device=device, dtype=torch.float64)
    return keys, mask, values, acc


def call(fn, acc, keys, mask, values):
    if values is not None:
        fn(acc["kk"], acc["ks"], acc["n"], keys, mask, values=values, vk=acc["vk"], vs=acc["vs"])
    else:
        fn(acc["kk"], acc["ks"], acc["n"], keys, mask)


@pytest.mark.parametrize("shape", CPU_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("fused", [False, True], ids=["kk", "kk+vk"])
@pytest.mark.parametrize("impl", impls_for("cpu"))
def test_cov_cpu(benchmark, impl, fused, shape):
    keys, mask, values, acc = make_inputs(*shape, fused=fused, device="cpu")
    fn = impl_fn(impl)
    benchmark.group = f"cov cpu {'x'.join(map(str, shape))} {'kk+vk' if fused else 'kk'}"
    benchmark.extra_info["tokens"] = int(mask.sum())
    benchmark(call, fn, acc, keys, mask, values)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("model", list(GPU_SHAPES))
@pytest.mark.parametrize("fused", [False, True], ids=["kk", "kk+vk"])
@pytest.mark.parametrize("impl", impls_for("cuda") if HAS_CUDA else ["torch"])
def test_cov_gpu(benchmark, impl, fused, model):
    shape = GPU_SHAPES[model]
    keys, mask, values, acc = make_inputs(*shape, fused=fused, device="cuda")
    fn = impl_fn(impl)

    def run():
        call(fn, acc, keys, mask, values)
        torch.cuda.synchronize()

    run()  # compile / tune outside the measurement
    benchmark.group = f"cov gpu {model} {'kk+vk' if fused else 'kk'}"
    benchmark.extra_info["tokens"] = int(mask.sum())
    benchmark.pedantic(run, rounds=5, iterations=1, warmup_rounds=1)
