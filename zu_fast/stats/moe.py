"""Per-expert corpus statistics of mixture-of-experts layers, in the same single pass as the dense ones.

For a MoE layer l (``zu_fast.model.MoETarget``) one truncated forward per batch accumulates, next to
the dense layers' sums:

- for every routed expert e, over the (non-padding) tokens the router sends to e — the router's
  top-k assignment is the row set — the expert's key sums Σkkᵀ, Σk, n_e (``ops.cov_accumulate``),
  keyed ``expert_key(l, e)``. The experts' down-projection input is not a module input (transformers
  5 fuses the experts into 3-D parameters), so the hook recomputes it for the routed tokens with the
  model's own maths (``MoETarget.expert_inputs``): the forward's up projections once more for the
  edited layers, nothing for the others;
- for the shared expert (Qwen2-MoE, DeepSeek), a dense MLP that sees every token, its
  down-projection input, keyed ``expert_key(l, SHARED)``;
- the layer's gate moments, keyed ``l``: with g_t ∈ R^C the gate of every component at token t
  (router weights of the routed experts, 0 where not routed; then the shared expert's gate, 1 when
  ungated), kk = Σ_t g_t g_tᵀ  # [C, C] and ks = Σ_t g_t  # [C] (ks[e]/n is expert e's share π_e of
  the gate mass, which weights its corpus term in the closed form; kk says which experts fire together).
"""

from __future__ import annotations

from typing import Any

import torch

from .. import ops
from ..errors import ZuFastError
from ..model.hooks import StopForward, match_token_mask
from ..model.locate import SHARED, EditTarget, MoETarget, describe_key, expert_key, split_key
from .moments import LayerStats, new_layer_stats

_INDEX_KW = ("top_k_index", "router_indices", "topk_indices", "selected_experts")
_WEIGHT_KW = ("top_k_weights", "routing_weights", "topk_weights", "router_scores")


def stat_keys(t: EditTarget | MoETarget) -> list[int]:
    """The ``CorpusStats`` keys an edit target needs: its layer; for a MoE layer also every component."""
    return [t.layer] + (t.component_keys() if isinstance(t, MoETarget) else [])


def n_components(t: MoETarget) -> int:
    """C: routed experts plus the shared expert (the width of the gate moments)."""
    return t.num_experts + (1 if t.shared is not None else 0)


def expert_call_args(args: tuple, kwargs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(hidden states [T, d], top-k expert indices [T, k], top-k gate weights [T, k]) of a call to fused experts
    (transformers 5 passes them positionally; keyword names differ between families)."""
    pos = list(args)
    x = pos.pop(0) if pos else kwargs.get("hidden_states")
    idx = pos.pop(0) if pos else next((kwargs[k] for k in _INDEX_KW if k in kwargs), None)
    w = pos.pop(0) if pos else next((kwargs[k] for k in _WEIGHT_KW if k in kwargs), None)
    if x is None or idx is None or w is None or x.dim() != 2 or idx.shape != w.shape:
        raise ZuFastError("could not read (hidden_states, expert indices, gate weights) from the call to the fused "
                          "experts; this MoE implementation is not supported")
    return x, idx, w


def new_accumulators(t: MoETarget, measured: bool) -> dict[int, tuple[LayerStats, torch.Tensor]]:
    """Zeroed accumulators of every statistic of MoE layer ``t`` (gate moments, experts, shared expert)."""
    dev = t.device
    out = {t.layer: new_layer_stats(t.layer, n_components(t), dev)}
    for e in range(t.num_experts):
        key = expert_key(t.layer, e)
        out[key] = new_layer_stats(key, t.d_in, dev, t.d if measured else None)
    if t.shared is not None:
        key = expert_key(t.layer, SHARED)
        out[key] = new_layer_stats(key, t.shared.d_in, t.shared.device, t.shared.d if measured else None)
    return out


def hook_block(model: torch.nn.Module, t: MoETarget, experts_pre_hook, shared_hook, shared_gate_hook,
               block_hook) -> list:
    """Register one MoE block's four hooks (the shared expert's two only where the block has one): before the
    routed experts (with kwargs: their tokens and routing), on the shared expert and its gate, on the block's
    output. Returns the handles. Shared by the statistics pass and the forget-set reader (method/moe.py)."""
    handles = [t.experts.register_forward_pre_hook(experts_pre_hook, with_kwargs=True)]
    if t.shared is not None:
        handles.append(t.shared.module.register_forward_hook(shared_hook))
        if t.shared_gate:
            handles.append(model.get_submodule(t.shared_gate).register_forward_hook(shared_gate_hook))
    handles.append(t.block.register_forward_hook(block_hook))
    return handles


def register_hooks(model: torch.nn.Module, t: MoETarget, acc: dict[int, LayerStats],
                   counters: dict[int, torch.Tensor], current_mask: list, stop: bool, measured: bool) -> list:
    """Hooks that feed the accumulators of MoE layer ``t`` during a forward; ``current_mask[0]`` is the
    batch's attention mask [batch, seq]. With ``stop`` the forward ends after the block (the deepest
    edited layer). Returns the handles (remove them when done)."""
    E = t.num_experts
    seen: dict[str, Any] = {}  # this forward's routing, read by the block hook

    def experts_pre_hook(module, args, kwargs):
        x, idx, w = expert_call_args(args, kwargs)  # [T, d], [T, k], [T, k]
        valid = match_token_mask(x, current_mask[0].to(x.device), t.experts_name).bool()  # [T]
        seen.update(idx=idx, w=w, valid=valid)
        for e in torch.unique(idx[valid]).tolist():
            if not 0 <= e < E:  # expert-parallel sentinels
                continue
            rows = ((idx == e).any(1) & valid).nonzero().flatten()  # the tokens routed to e
            keys = t.expert_inputs(e, x[rows])  # [n_e, d_ff]
            key = expert_key(t.layer, e)
            st = acc[key]
            values = t.expert_outputs(e, keys) if measured else None
            ops.cov_accumulate(st.kk, st.ks, counters[key], keys, None, values=values, vk=st.vk, vs=st.vs)

    def shared_hook(module, args, output):
        keys = args[0]  # [batch, seq, d_ff_s] or flattened [batch·seq, d_ff_s] (Qwen2-MoE)
        mask = match_token_mask(keys, current_mask[0].to(keys.device), t.shared.name)
        key = expert_key(t.layer, SHARED)
        st = acc[key]
        values = (output[0] if isinstance(output, tuple) else output) if measured else None
        ops.cov_accumulate(st.kk, st.ks, counters[key], keys, mask, values=values, vk=st.vk, vs=st.vs)

    def shared_gate_hook(module, args, output):
        seen["shared_gate"] = torch.sigmoid(output.float()).reshape(-1)  # [T]: Qwen2-MoE's sigmoid gate

    def block_hook(module, args, output):
        if "idx" not in seen:
            raise ZuFastError(f"layer {t.layer}: the fused experts {t.experts_name!r} were not called by the forward "
                              "of their block")
        idx, w, valid = seen.pop("idx"), seen.pop("w"), seen.pop("valid")
        g = torch.zeros(idx.shape[0], n_components(t), dtype=torch.float32, device=idx.device)  # [T, C]
        ok = (idx >= 0) & (idx < E)
        g.scatter_add_(1, idx.clamp(0, E - 1), torch.where(ok, w.float(), torch.zeros_like(w, dtype=torch.float32)))
        if t.shared is not None:
            g[:, E] = seen.pop("shared_gate", None) if t.shared_gate else 1.0
        st = acc[t.layer]
        ops.cov_accumulate(st.kk, st.ks, counters[t.layer], g, valid)
        if stop:
            raise StopForward  # nothing above the deepest edited layer is needed

    return hook_block(model, t, experts_pre_hook, shared_hook, shared_gate_hook, block_hook)


def check_component(st: LayerStats) -> None:
    """Finite sums (an expert that saw fewer than 2 corpus tokens is allowed here: ``unlearn`` refuses to
    edit it, naming it, only if the forget set is routed there)."""
    layer, e = split_key(st.layer)
    if e is None or st.n >= 2:
        st.check()
        return
    for name in ("kk", "ks", "vk", "vs"):
        v = getattr(st, name)
        if v is not None and not bool(torch.isfinite(v).all()):
            raise ZuFastError(f"{describe_key(st.layer)}: statistic {name} contains NaN/Inf (overflowing activations? "
                              "collect in a wider dtype)")


__all__ = ["check_component", "expert_call_args", "n_components", "new_accumulators", "register_hooks", "stat_keys"]
