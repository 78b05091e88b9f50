"""Every causal-LM family transformers ships, as a tiny random model built from its own default config (issue 26).

``tiny_config(model_type)`` takes the family's default config (``CONFIG_MAPPING[model_type]()``) and shrinks it
generically: every size-like field the family has (hidden, feed-forward, layers, heads, head dims, experts,
state sizes, vocabulary, context) is set to a small value by its name, the same in nested sub-configs
(``text_config``, ``vision_config`` ...), and per-layer lists (``layer_types`` ...) are cut to the new depth.
Nothing is downloaded: ``AutoModelForCausalLM.from_config`` builds random weights. The vocabulary is the shared
locally trained tokenizer's (``tiny_models.tokenizer``), so every family reads the same texts.

``run_family(model_type)`` is the end-to-end check of ``benchmarks/family_sweep.py`` and
``tests/test_all_families.py``: for_model → collect_stats → unlearn → restore bit-exact, or a ZuFastError. It
returns an outcome row (``outcome``: ``ok`` / ``refused`` / ``not built`` / ``error``, and where and why).
"""

from __future__ import annotations

import time
import traceback
import warnings
from typing import Any

import torch

H, FF, LAYERS, HEADS, KV_HEADS, HEAD_DIM, EXPERTS = 32, 64, 3, 4, 2, 8, 4

# field name → small value (a callable gets the current value); fields absent from a family's config are skipped
_SIZES: dict[str, Any] = {
    # widths
    **dict.fromkeys(("hidden_size", "n_embd", "d_model", "n_embed", "model_dim", "embed_dim", "embedding_size",
                     "word_embed_proj_dim", "attention_hidden_size", "lru_width", "backbone_hidden_size",
                     "input_embedding_size", "output_embedding_size", "hidden_dim", "dim", "embedding_dim"), H),
    **dict.fromkeys(("intermediate_size", "ffn_dim", "ffn_hidden_size", "n_inner", "d_ff", "dff", "dim_ff",
                     "feed_forward_size", "d_inner", "intermediate_size_mlp", "dense_intermediate_size",
                     "decoder_ffn_dim", "encoder_ffn_dim", "shared_intermediate_size", "expert_ffn_hidden_size",
                     "shared_expert_intermediate_size", "shared_experts_intermediate_size",
                     "moe_shared_expert_intermediate_size"), FF),
    "moe_intermediate_size": 24,
    # depth
    **dict.fromkeys(("num_hidden_layers", "n_layer", "num_layers", "n_layers", "decoder_layers", "encoder_layers",
                     "num_decoder_layers", "num_encoder_layers", "num_blocks"), LAYERS),
    # attention
    **dict.fromkeys(("num_attention_heads", "n_head", "num_heads", "n_heads", "decoder_attention_heads",
                     "encoder_attention_heads", "attention_heads", "swa_num_attention_heads",
                     "num_encoder_attention_heads", "num_decoder_attention_heads", "linear_num_value_heads",
                     "linear_num_heads", "mamba_n_heads", "mamba_num_heads"), HEADS),
    **dict.fromkeys(("num_key_value_heads", "num_kv_heads", "swa_num_key_value_heads", "multi_query_group_num",
                     "linear_num_key_heads", "index_n_heads"), KV_HEADS),
    **dict.fromkeys(("head_dim", "v_head_dim", "swa_head_dim", "kv_channels", "attention_head_dim", "d_head",
                     "dim_head", "attention_head_size", "linear_key_head_dim", "linear_value_head_dim",
                     "linear_head_dim", "index_head_dim", "mamba_d_head", "mamba_head_dim", "qk_head_dim"), HEAD_DIM),
    "qk_rope_head_dim": 4, "qk_nope_head_dim": 4, "kv_lora_rank": 16,
    "q_lora_rank": lambda v: None if v is None else 16, "o_lora_rank": lambda v: None if v is None else 16,
    "rotary_dim": 4,
    # experts
    **dict.fromkeys(("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts"), EXPERTS),
    "zero_expert_num": 1,
    **dict.fromkeys(("num_experts_per_tok", "num_experts_per_token", "moe_topk", "top_k", "index_topk", "moe_k"), 2),
    **dict.fromkeys(("n_group", "topk_group", "num_expert_group", "n_groups", "o_groups"), 1),
    # state-space / recurrent parts
    **dict.fromkeys(("mamba_d_state", "ssm_state_size", "state_size", "mamba_d_ssm"), 16),
    **dict.fromkeys(("time_step_rank", "mamba_dt_rank"), 4),
    **dict.fromkeys(("mamba_chunk_size", "chunk_size"), 32),
    # context: long enough for the tests' prompts, small enough for position tables
    **dict.fromkeys(("max_position_embeddings", "n_positions", "n_ctx", "max_seq_len", "context_length",
                     "max_target_positions", "max_source_positions"), lambda v: min(int(v), 512)),
    # vision / audio towers of multimodal families
    "image_size": 32, "patch_size": 8, "num_mel_bins": 16,
}


# left None by a family's defaults, and used as numbers by its code
_FILL_IF_NONE = {"head_dim": HEAD_DIM, "num_key_value_heads": KV_HEADS, "num_experts_per_tok": 2, "n_group": 1,
                 "topk_group": 1}


def _shrink(d: dict[str, Any], depth_from: int | None = None) -> dict[str, Any]:
    """The size-like fields of config dict ``d`` shrunk (recursively into sub-config dicts)."""
    out = dict(d)
    old_depth = next((d[k] for k in ("num_hidden_layers", "n_layer", "num_layers", "n_layers", "decoder_layers")
                      if isinstance(d.get(k), int)), depth_from)
    for k, v in d.items():
        if k in _SIZES and (isinstance(v, int) and not isinstance(v, bool) or v is None and callable(_SIZES[k])):
            new = _SIZES[k](v) if callable(_SIZES[k]) else _SIZES[k]
            out[k] = new if v is None or new is None else min(int(v), new)
        elif k in _FILL_IF_NONE and v is None:
            out[k] = _FILL_IF_NONE[k]
        elif isinstance(v, dict) and k.endswith(("_config", "config")) and "model_type" in v:
            out[k] = _shrink(v)
        elif isinstance(v, list) and old_depth and old_depth > LAYERS and len(v) == old_depth:
            out[k] = v[:LAYERS]  # a per-layer list (layer types, per-layer sizes, ...): its first entries
        elif k == "per_layer_config" and isinstance(v, dict):
            out[k] = {i: c for i, c in v.items() if int(i) < LAYERS}
    if "is_decoder" in d:
        out["is_decoder"] = True  # the ...ForCausalLM of an encoder family runs as a decoder
    # consistency rules some families check
    if "kv_lora_rank" in out and "num_key_value_heads" in out:  # multi-head latent attention: one K/V per head
        out["num_key_value_heads"] = out.get("num_attention_heads", HEADS)
    for k in ("first_k_dense_replace", "first_dense_layers", "num_dense_layers"):  # keep a MoE layer in the 3
        if isinstance(out.get(k), int) and out[k] >= LAYERS:
            out[k] = 1
    if isinstance(out.get("qk_rope_head_dim"), int):  # multi-head latent attention: rotary part = head_dim
        if "head_dim" in out:
            out["head_dim"] = out["qk_rope_head_dim"]
        if "qk_head_dim" in out and isinstance(out.get("qk_nope_head_dim"), int):
            out["qk_head_dim"] = out["qk_nope_head_dim"] + out["qk_rope_head_dim"]
    expand = out.get("mamba_expand", out.get("expand"))
    width = out.get("hidden_size")
    if isinstance(expand, int) and isinstance(width, int):  # Mamba-2 heads × head dim = expand × hidden
        for heads, dim in (("mamba_n_heads", "mamba_d_head"), ("mamba_num_heads", "mamba_head_dim"),
                           ("num_heads", "head_dim")):
            if heads in out and dim in out and "state_size" in out or heads in out and heads.startswith("mamba"):
                out[dim] = HEAD_DIM
                out[heads] = expand * width // HEAD_DIM
        if isinstance(out.get("mamba_d_ssm"), int):
            out["mamba_d_ssm"] = expand * width
    if all(isinstance(out.get(k), int) for k in ("n_input_layers", "n_recurrent_layers", "n_output_layers")):
        out["n_input_layers"] = out["n_recurrent_layers"] = out["n_output_layers"] = 1
        out["num_hidden_layers"] = 3
    return out


def tokenizer():
    from tiny_models import tokenizer as tok

    return tok()


def tiny_config(model_type: str):
    """The family's default config with every size-like field small (see the module docstring)."""
    from transformers import CONFIG_MAPPING

    cls = CONFIG_MAPPING[model_type]
    base = cls().to_dict()
    small = _shrink(base)
    tok = tokenizer()
    small["vocab_size"] = len(tok)
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        small[name] = getattr(tok, name)
    for k in ("text_config",):
        if isinstance(small.get(k), dict):
            small[k]["vocab_size"] = len(tok)
            for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
                small[k][name] = getattr(tok, name)
    small.pop("model_type", None)
    small.pop("transformers_version", None)
    small.pop("architectures", None)
    return cls(**small)


def build(model_type: str, seed: int = 0) -> torch.nn.Module:
    """A tiny random ``AutoModelForCausalLM`` of ``model_type`` (float32, eval mode)."""
    from transformers import AutoModelForCausalLM

    cfg = tiny_config(model_type)
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_config(cfg)
    return model.float().eval()


TEMPLATES = [["{}"], ["Because. {}"]]
FAST = dict(progress=False, v_num_grad_steps=2, original_representation="clean", stats_batch_tokens=512)


def run_family(model_type: str, *, method: str = "closed_form") -> dict[str, Any]:
    """for_model → collect_stats → unlearn → restore on a tiny ``model_type``; an outcome row.

    ``outcome``: ``ok`` (edited, restored bit-exact), ``refused`` (a ZuFastError; ``stage`` says where, and the
    weights are checked unchanged), ``no edit`` (nothing was changed, and the report says so: flag
    ``nothing_edited``), ``not built`` (no tiny random model of it can be built here: ``why``), or ``error``
    (anything else: a bug, ``why`` has the exception).
    """
    from tiny_models import REQUESTS, corpus, param_hashes

    import zu_fast

    row: dict[str, Any] = {"family": model_type, "outcome": None, "stage": None, "why": "", "class": None}
    t0 = time.perf_counter()
    tok = tokenizer()
    try:
        model = build(model_type)
        with torch.no_grad():  # the tiny config must give a working model before zu_fast is judged on it
            model(**tok(["Alice Morvan was born in Lisbon."], return_tensors="pt"), use_cache=False)
    except Exception as e:  # noqa: BLE001  (a row per family: why it cannot be built)
        row.update(outcome="not built", stage="build", why=_one_line(f"{type(e).__name__}: {e}"))
        return row
    row["class"] = type(model).__name__
    before = param_hashes(model)
    stage = "for_model"
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            cfg = zu_fast.UnlearnConfig.for_model(model, **FAST, method=method)
            row["module"] = cfg.locate.rewrite_module
            row["layers"] = list(cfg.layers)
            row["guessed"] = any("no preset" in str(w.message) for w in caught)
            stage = "collect_stats"
            stats = zu_fast.collect_stats(model, tok, corpus(24), cfg, cache=False)
            stage = "unlearn"
            edit = zu_fast.unlearn(model, tok, REQUESTS[:2], cfg, stats=stats, context_templates=TEMPLATES)
            row["flags"] = sorted({f["kind"] for f in edit.report.flags})
            row["rel_weight_change_max"] = max((r.get("rel_weight_change", 0.0) for r in edit.report.layers.values()),
                                               default=None)
            row["z_gap_closed"] = edit.report.targets.get("z_gap_closed")
            edited = param_hashes(model)
            stage = "restore"
            edit.restore()
        changed = [k for k in before if before[k] != edited[k]]
        if not changed and "nothing_edited" in row["flags"]:
            row.update(outcome="no edit", stage="unlearn", why="nothing edited (flagged nothing_edited): " +
                       next(f["message"] for f in edit.report.flags if f["kind"] == "nothing_edited"))
        elif not changed:
            row.update(outcome="error", stage="unlearn", why="the edit changed no weight, unflagged")
        elif param_hashes(model) != before:
            row.update(outcome="error", stage="restore", why="restore() was not bit-exact")
        else:
            row.update(outcome="ok", stage="restore")
    except zu_fast.ZuFastError as e:
        same = param_hashes(model) == before
        row.update(outcome="refused" if same else "error", stage=stage,
                   why=_one_line(str(e)) + ("" if same else " (AND THE WEIGHTS CHANGED)"))
    except Exception as e:  # noqa: BLE001
        tb = traceback.extract_tb(e.__traceback__)
        where = next((f"{f.filename.split('/zu_fast/')[-1]}:{f.lineno}" for f in reversed(tb)
                      if "/zu_fast/" in f.filename), "")
        row.update(outcome="error", stage=stage, why=_one_line(f"{type(e).__name__}: {e}") + (f" [{where}]" if where
                                                                                            else ""))
    row["seconds"] = round(time.perf_counter() - t0, 2)
    return row


def _one_line(text: str, n: int = 300) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= n else text[: n - 1] + "…"


def causal_families() -> list[str]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


__all__ = ["FAST", "TEMPLATES", "build", "causal_families", "run_family", "tiny_config"]
