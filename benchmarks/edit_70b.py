"""A ZeroUnlearn edit of a Llama-3-70B-shaped model on ONE GPU (memory and time per phase).

    # H200 (141 GB): statistics + unlearn 100 requests + restore, the whole model resident in bf16
    python benchmarks/edit_70b.py --mode full --out bench_70b_full.json

    # H100 (80 GB): statistics only, loading only the embeddings and layers 0..max(layers) from a
    # sharded safetensors checkpoint (written first to --workdir, ~40 GB for layers 19-21)
    python benchmarks/edit_70b.py --mode stats-partial --workdir /tmp/ckpt70b --out bench_70b_stats.json

    # CPU self-test of the script at a tiny scale (seconds)
    python benchmarks/edit_70b.py --tiny --mode full --out /tmp/tiny.json
    python benchmarks/edit_70b.py --tiny --mode stats-partial --workdir /tmp/tinyckpt --out /tmp/tiny2.json

The model is random-initialised (no download): built on the meta device, materialised with
``to_empty`` straight on the GPU and filled in place (the host never holds it), every tensor from
its own seed (crc32 of its name), so a model truncated to fewer layers has exactly the same
weights in the layers it keeps. Its outputs are meaningless: this measures memory and speed.

Why statistics run on a truncated model in ``full`` mode: 70.6 B bf16 parameters are 131.4 GiB,
leaving ~7-8 GiB of an H200; the fp32 Σkkᵀ accumulators of three d_ff = 28 672 layers alone are
9.2 GiB. The statistics only need layers 0..max(layers) (the forward stops there), so they are
collected on that prefix (~40 % of the weights for layers 46-48), moved to host memory, and the
full model is then built for the edit; the closed form streams Σkkᵀ to the GPU in column chunks.

Peak memory is reported ABOVE THE RESIDENT WEIGHTS of each phase (max_memory_allocated − weights).
Default settings keep the target optimisation within the headroom: requests are optimised
``--targets-batch`` at a time (activations of every layer above the z layer are kept for the
backward pass: ~0.3 MB per token per layer in bf16), ``--steps`` Adam steps each (the reference
uses 25; time per step is what this measures), and ``--orig-repr clean`` (no step-3 optimisation
per layer; ``optimized`` is the reference's choice and costs one more optimisation per layer).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import random
import sys
import time
import zlib
from pathlib import Path

os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")  # little headroom: avoid fragmentation

import torch  # noqa: E402
from torch import nn  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import zu_fast  # noqa: E402
from zu_fast.eval.tinylm import train_tokenizer  # noqa: E402
from zu_fast.model import tensor_fingerprint  # noqa: E402
from zu_fast.provenance import stats_model_fingerprint  # noqa: E402

GiB = 2**30

SHAPES = {
    "llama-3-70b": dict(layers=80, d=8192, d_ff=28672, heads=64, kv=8, vocab=128256, rope_theta=500000.0),
    "tiny": dict(layers=8, d=64, d_ff=160, heads=4, kv=2, vocab=512, rope_theta=500000.0),
}
DEFAULT_LAYERS = {("llama-3-70b", "full"): [46, 47, 48], ("llama-3-70b", "stats-partial"): [19, 20, 21],
                  ("tiny", "full"): [4, 5, 6], ("tiny", "stats-partial"): [2, 3, 4]}

WORDS = ("city river music language company piano violin market harbour garden winter summer north south "
         "engineer painter doctor teacher writer singer village island mountain forest library museum "
         "bridge station theatre festival morning evening history science").split()
FIRST = "Alice Bruno Carla Deniz Edda Farid Greta Hugo Ines Jonas Kira Lukas Mila Nadia Oskar Pia".split()
LAST = "Morvan Kestrel Dunmore Quill Sorrel Varga Lindqvist Okafor Brandt Castell Ferreira Holm".split()
CITIES = "Lisbon Oslo Lima Porto Quito Riga Turin Malmo Ghent Split".split()
RELATIONS = ["{} was born in", "{} lives in", "The home town of {} is", "{} grew up in"]


# ------------------------------------------------------------------------------------------ helpers ----
def synthetic_corpus(n_texts: int, words_per_text: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    vocab = WORDS + FIRST + LAST + CITIES
    return [" ".join(rng.choice(vocab) for _ in range(words_per_text)) + "." for _ in range(n_texts)]


def synthetic_requests(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    seen, out = set(), []
    while len(out) < n:
        subject = f"{rng.choice(FIRST)} {rng.choice(LAST)} {rng.choice(LAST)}"
        if subject in seen:
            continue
        seen.add(subject)
        out.append({"prompt": rng.choice(RELATIONS), "subject": subject, "target_true": rng.choice(CITIES)})
    return out


def llama_config(shape: dict, n_layers: int, tok):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=max(shape["vocab"], len(tok)), hidden_size=shape["d"],
                       intermediate_size=shape["d_ff"], num_hidden_layers=n_layers,
                       num_attention_heads=shape["heads"], num_key_value_heads=shape["kv"],
                       max_position_embeddings=8192, rope_theta=shape["rope_theta"], rms_norm_eps=1e-5,
                       tie_word_embeddings=False, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                       pad_token_id=tok.pad_token_id)


@torch.no_grad()
def init_tensor_(name: str, t: torch.Tensor, seed: int = 0) -> None:
    """Deterministic in-place init from the tensor's NAME (identical in truncated and full models)."""
    if name.endswith("norm.weight"):
        t.fill_(1.0)
        return
    g = torch.Generator(device=t.device).manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63)
    t.normal_(0.0, 0.02, generator=g)


def build_random_llama(shape: dict, n_layers: int, tok, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """Meta-device construction, ``to_empty`` on ``device``, in-place init: the host never holds the weights."""
    from accelerate import init_empty_weights
    from transformers import LlamaForCausalLM

    cfg = llama_config(shape, n_layers, tok)
    with init_empty_weights(include_buffers=False):  # parameters on meta; buffers (rotary inv_freq) real
        model = LlamaForCausalLM(cfg)
    # to_empty leaves buffers uninitialised and .to(dtype) would round rotary inv_freq to bf16: keep the
    # buffers as built (fp32, CPU) and put them back on the device afterwards
    buffers = {(id(mod), k): b.clone() for mod in model.modules() for k, b in mod._buffers.items() if b is not None}
    for p in model.parameters():
        p.data = p.data.to(dtype)  # meta tensors: no memory, no copy
    model.to_empty(device=device)
    for name, p in model.named_parameters():
        init_tensor_(name, p.data)
    for mod in model.modules():
        for k in list(mod._buffers):
            if (id(mod), k) in buffers:
                mod._buffers[k] = buffers[(id(mod), k)].to(device)
    return model.eval().requires_grad_(False)


def write_partial_checkpoint(shape: dict, deepest: int, tok, path: Path, device: torch.device,
                             dtype: torch.dtype) -> dict:
    """A sharded safetensors checkpoint of the FULL 80-layer model's config and index, with the shards
    of the embeddings and layers 0..deepest written (one shard per layer; the rest is never read, so —
    to fit the disk — it is not written: the index names shards that do not exist)."""
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    cfg = llama_config(shape, shape["layers"], tok)
    cfg.save_pretrained(path)
    tok.save_pretrained(path)
    d, d_ff, kv_dim = shape["d"], shape["d_ff"], shape["d"] // shape["heads"] * shape["kv"]
    vocab = cfg.vocab_size
    layer_shapes = {"self_attn.q_proj.weight": (d, d), "self_attn.k_proj.weight": (kv_dim, d),
                    "self_attn.v_proj.weight": (kv_dim, d), "self_attn.o_proj.weight": (d, d),
                    "mlp.gate_proj.weight": (d_ff, d), "mlp.up_proj.weight": (d_ff, d),
                    "mlp.down_proj.weight": (d, d_ff), "input_layernorm.weight": (d,),
                    "post_attention_layernorm.weight": (d,)}
    weight_map, written = {}, 0
    head_file = "model-embed.safetensors"
    for name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        weight_map[name] = head_file
    for i in range(shape["layers"]):
        for k in layer_shapes:
            weight_map[f"model.layers.{i}.{k}"] = f"model-layer{i:03d}.safetensors"

    def emit(fname: str, tensors: dict[str, tuple]) -> None:
        nonlocal written
        out = {}
        for name, shp in tensors.items():
            t = torch.empty(shp, dtype=dtype, device=device)
            init_tensor_(name, t)
            out[name] = t.cpu()  # one layer at a time on the host (≤ 1.7 GB)
            written += t.numel() * t.element_size()
        save_file(out, str(path / fname), metadata={"format": "pt"})

    emit(head_file, {"model.embed_tokens.weight": (vocab, d), "model.norm.weight": (d,)})  # no LM head: unused
    for i in range(deepest + 1):
        emit(f"model-layer{i:03d}.safetensors", {f"model.layers.{i}.{k}": s for k, s in layer_shapes.items()})
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": 0},
                                                                  "weight_map": weight_map}))
    return {"bytes_written": written, "layers_written": deepest + 1, "layers_in_index": shape["layers"]}


class Phases:
    """Wall time and peak device memory above the resident weights, per phase."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.rows, self.errors = device, [], {}
        self.cuda = device.type == "cuda"
        self.allocated_weights = 0  # set by phases that load weights themselves

    def allocated(self) -> int:
        return torch.cuda.memory_allocated(self.device) if self.cuda else 0

    def run(self, name: str, weights_bytes, fn):
        """Run ``fn()``; record seconds and peak-above-weights; on error record it and return None.

        ``weights_bytes``: the resident weights during the phase, or a function of ``fn``'s result.
        """
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        t0 = time.perf_counter()
        try:
            out = fn()
            err = None
        except Exception as e:  # keep the other phases' numbers (OOM, …): they are the point of the run
            out, err = None, f"{type(e).__name__}: {str(e)[:500]}"
            self.errors[name] = err
        if self.cuda:
            torch.cuda.synchronize(self.device)
        secs = time.perf_counter() - t0
        w = weights_bytes(out) if callable(weights_bytes) else weights_bytes
        peak = torch.cuda.max_memory_allocated(self.device) if self.cuda else None
        self.rows.append({"phase": name, "seconds": round(secs, 3), "weights_gib": round(w / GiB, 3),
                          "peak_above_weights_gib": None if peak is None else round((peak - w) / GiB, 3),
                          "error": err})
        return out

    def table(self) -> str:
        lines = ["| phase | wall s | resident weights GiB | peak above weights GiB |", "|---|---|---|---|"]
        for r in self.rows:
            peak = "n/a (CPU)" if r["peak_above_weights_gib"] is None else f"{r['peak_above_weights_gib']:.2f}"
            status = f" — FAILED: {r['error']}" if r["error"] else ""
            lines.append(f"| {r['phase']} | {r['seconds']:.2f} | {r['weights_gib']:.2f} | {peak}{status} |")
        return "\n".join(lines)


def param_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters() if p.device.type != "meta")


def _built_bytes(model: nn.Module | None) -> int:
    return 0 if model is None else param_bytes(model)


# ------------------------------------------------------------------------------------------ modes ------
def run(args) -> dict:
    shape_name = "tiny" if args.tiny else "llama-3-70b"
    shape = SHAPES[shape_name]
    layers = args.layers or DEFAULT_LAYERS[(shape_name, args.mode)]
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if not args.tiny and device.type != "cuda":
        raise SystemExit("the 70B shapes need a GPU; use --tiny for the CPU self-test")
    dtype = torch.bfloat16
    corpus = synthetic_corpus(args.corpus_texts or (64 if not args.tiny else 24),
                              args.words_per_text or (300 if not args.tiny else 30))
    tok = train_tokenizer(corpus + [" ".join(r["subject"] for r in synthetic_requests(200))], 400)
    cfg = zu_fast.UnlearnConfig(layers=layers, progress=args.progress, v_num_grad_steps=args.steps,
                                targets_batch_size=args.targets_batch, original_representation=args.orig_repr,
                                stats_batch_tokens=args.stats_batch_tokens, batch_size=16, backup_device="cpu")
    ph = Phases(device)
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.machine()})"
    result: dict = {"mode": args.mode, "shape": shape_name, "shape_dims": shape, "layers": layers,
                    "device": dev_name,
                    "torch": torch.__version__, "zu_fast": zu_fast.__version__, "dtype": str(dtype),
                    "corpus_texts": len(corpus),
                    "config": {"v_num_grad_steps": cfg.targets.steps, "targets_batch_size": cfg.targets.batch_size,
                               "original_representation": cfg.representation.source,
                               "stats_batch_tokens": cfg.stats.batch_tokens,
                               "gram_precision": cfg.closed_form.gram_precision}}
    n_prefix = max(layers) + 1
    state: dict = {}

    if args.mode == "full":
        # 1. statistics on the prefix 0..max(layers) (same weights as the full model's prefix)
        state["m"] = ph.run(f"build prefix (layers 0..{max(layers)})", _built_bytes,
                            lambda: build_random_llama(shape, n_prefix, tok, device, dtype))
        w_prefix = param_bytes(state["m"]) if state["m"] is not None else 0
        st = ph.run("statistics", w_prefix,
                    lambda: zu_fast.collect_stats(state["m"], tok, corpus, cfg, cache=False))
        if st is not None:
            st.layers = {k: v.to("cpu") for k, v in st.layers.items()}  # host: the full model needs the room
            result["stats"] = {"tokens": st.meta["collection"]["tokens"],
                               "fingerprint": st.meta["model_fingerprint"]}
        state.pop("m", None)
        gc.collect()
        # 2. the full model
        state["m"] = ph.run("build full model", _built_bytes,
                            lambda: build_random_llama(shape, shape["layers"], tok, device, dtype))
        model = state["m"]
        if model is None or st is None:
            return result | {"phases": ph.rows, "errors": ph.errors}
        w_full = param_bytes(model)
        result["weights_gib"] = round(w_full / GiB, 3)
        result["stats_fingerprint_matches_full_model"] = (
            stats_model_fingerprint(model, cfg.layers, cfg.locate) == result["stats"]["fingerprint"])
        reqs = synthetic_requests(args.requests)
        before = {layer: tensor_fingerprint(model.get_submodule(cfg.locate.rewrite_module.format(layer)).weight)
                  for layer in layers}
        edit = ph.run(f"unlearn {len(reqs)} requests", w_full,
                      lambda: zu_fast.unlearn(model, tok, reqs, cfg, stats=st))
        if edit is not None:
            result["edit_report"] = edit.report.to_dict()
            ph.run("restore", w_full, edit.restore)
            after = {layer: tensor_fingerprint(model.get_submodule(cfg.locate.rewrite_module.format(layer)).weight)
                     for layer in layers}
            result["restore_bit_exact"] = before == after
    elif args.mode == "stats-partial":
        ckpt = Path(args.workdir or "/tmp/zu_fast_edit70b_ckpt") / shape_name
        if not (ckpt / "model.safetensors.index.json").exists() or args.rewrite_checkpoint:
            info = ph.run(f"write checkpoint (layers 0..{max(layers)})", 0,
                          lambda: write_partial_checkpoint(shape, max(layers), tok, ckpt, device, dtype))
            result["checkpoint"] = info
        result["checkpoint_path"] = str(ckpt)
        st = ph.run("load prefix + statistics", lambda out: ph.allocated_weights,
                    lambda: _stats_from_path(ckpt, corpus, cfg, device, ph))
        if st is not None:
            result["stats"] = {"tokens": st.meta["collection"]["tokens"], "seconds": st.meta["collection"]["seconds"],
                               "layers": {str(k): {"n": v.n} for k, v in st.layers.items()}}
    else:
        raise SystemExit(f"unknown mode {args.mode!r}")
    result["phases"] = ph.rows
    result["errors"] = ph.errors
    return result


def _stats_from_path(ckpt: Path, corpus, cfg, device, ph: Phases):
    """collect_stats(path): only the embeddings and layers 0..max(layers) are read from the shards."""
    from zu_fast.model import partial

    real = partial.load_partial_model
    loaded = {}

    def spy(*a, **k):  # record the loaded bytes: they are the resident weights of this phase
        m = real(*a, **k)
        loaded["bytes"] = m.zu_fast_partial["bytes"]
        return m

    partial.load_partial_model = spy
    try:
        st = zu_fast.collect_stats(str(ckpt), None, corpus, cfg, cache=False, device=device)
    finally:
        partial.load_partial_model = real
    ph.allocated_weights = loaded.get("bytes", 0)
    return st


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mode", choices=["full", "stats-partial"], default="full")
    p.add_argument("--tiny", action="store_true", help="tiny shapes (CPU self-test of the script)")
    p.add_argument("--out", required=True, help="JSON output path")
    p.add_argument("--layers", type=lambda s: [int(x) for x in s.split(",")], default=None)
    p.add_argument("--requests", type=int, default=100)
    p.add_argument("--steps", type=int, default=5, help="Adam steps of the z optimisation (reference: 25)")
    p.add_argument("--targets-batch", type=int, default=2, help="requests optimised together")
    p.add_argument("--orig-repr", choices=["clean", "optimized"], default="clean")
    p.add_argument("--stats-batch-tokens", type=int, default=8192)
    p.add_argument("--corpus-texts", type=int, default=None)
    p.add_argument("--words-per-text", type=int, default=None)
    p.add_argument("--workdir", default=None, help="stats-partial: where the checkpoint is written")
    p.add_argument("--rewrite-checkpoint", action="store_true")
    p.add_argument("--device", default=None)
    p.add_argument("--progress", action="store_true")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    result = run(args)
    result["total_seconds"] = round(time.perf_counter() - t0, 2)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2, default=str))
    print(f"zu_fast edit_70b — mode {args.mode}, shape {result['shape']}, layers {result['layers']}, "
          f"device {result['device']}")
    ph_table = Phases(torch.device("cpu"))
    ph_table.rows = result["phases"]
    print(ph_table.table())
    if "edit_report" in result:
        tg = result["edit_report"]["targets"]
        print(f"z loss initial → final: {tg['z_loss_initial']:.3f} → {tg['z_loss_final']:.3f}")
        print("restore bit-exact:", result.get("restore_bit_exact"))
    print(f"wrote {args.out}")
    return 1 if result["errors"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
