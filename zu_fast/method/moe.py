"""ZeroUnlearn on mixture-of-experts layers: per-expert keys, weights and solves (docs/design-notes.md,
"Mixture of experts").

A MoE layer's output at token t is  y_t = Σ_c g_{c,t} W_c k_{c,t}  over its components c: the routed
experts the router sends t to (gate g = the router's weight) and the shared expert (gate 1, or Qwen2-MoE's
sigmoid gate). Each component is edited like a dense layer, by the closed form or GD of
``closed_form.py`` / ``gd.py``, with three changes that make the sum of the per-component problems an upper
bound of the layer's own problem (Cauchy–Schwarz: ‖Σ_c g_c a_c‖² ≤ G Σ_c g_c ‖a_c‖², G = Σ_c g_c):

- forget set: component c's key for request i is the gate-weighted mean of its keys over the context
  templates whose subject token is routed to c, k_{c,i} = Σ_j a_j g_{c,ij} k_{c,ij} / ω_{c,i}, with weight
  ω_{c,i} = Σ_j a_j g_{c,ij} (a_j: the two-level template average of docs/algorithm.md, step 1); only the
  components with ω > 0 for some request are edited, every other expert stays bit-identical;
- residual: each touched component aims its own output at W_c k_{c,i} + r_i / G_i, so that the layer's
  output moves by Σ_c g_c r_i / G_i = r_i (G_i = Σ_c ω_{c,i});
- corpus: the closed form weights component c's corpus term by π_c = (1/n) Σ_t g_{c,t} (its share of the
  gate mass, from the gate moments of ``zu_fast.stats.moe``) times its routed tokens' second moment C_c;
  GD's null space is C_c's (the energy rule is scale-free, so π_c does not enter).

The weights enter the unchanged dense solvers by scaling request columns: K_c → K_c diag(√ω), R_c → (R/G)
diag(√ω) (plus (√ω − 1) b for a biased expert in the closed form, which makes V + R scale exactly). A
dense layer is the one-component case (g = 1, ω = 1, G = 1, π = 1): the dense maths exactly.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from ..config import UnlearnConfig
from ..errors import ZuFastError
from ..model import model_device
from ..model.hooks import StopForward, batch_shape_of, forward_until, unflatten_tokens
from ..model.locate import SHARED, EditTarget, MoETarget, describe_key, expert_key, get_module
from ..requests import UnlearnRequest
from ..stats.collect import CorpusStats
from ..stats.moe import expert_call_args, hook_block
from .components import ComponentProblem
from .keys import subject_batches


@dataclass
class LayerReadings:
    """What one edited layer computes at the requests' subject tokens (one entry per component key)."""

    key_sums: dict[int, torch.Tensor] = field(default_factory=dict)  # key → Σ_j a_j g k   [N, d_in] fp32
    mass: dict[int, torch.Tensor] = field(default_factory=dict)  # key → ω = Σ_j a_j g   [N] fp32
    bare_value: torch.Tensor | None = None  # the layer's MLP output (block output) on the bare prompt [N, d]

    def keys(self, key: int) -> torch.Tensor:
        """k_c  # [N, d_in]: the gate-weighted mean key (rows with ω = 0 are 0)."""
        return self.key_sums[key] / self.mass[key].clamp_min(1e-30)[:, None]


@dataclass
class Readings:
    layers: dict[int, LayerReadings]
    z_out: torch.Tensor | None  # [N, d] output of decoder layer z on the bare prompt


def components(t: EditTarget | MoETarget) -> list[tuple[int, EditTarget]]:
    """(key, target) of every weight a layer's edit may change: a dense layer's one, or a MoE layer's
    experts then its shared expert."""
    if not isinstance(t, MoETarget):
        return [(t.layer, t)]
    out = [(expert_key(t.layer, e), t.expert_target(e)) for e in range(t.num_experts)]
    return out + ([(t.shared.layer, t.shared)] if t.shared is not None else [])


@torch.no_grad()
def read_at_subject(model, tok, requests: Sequence[UnlearnRequest], cfg: UnlearnConfig,
                    templates: Sequence[Sequence[str]], targets: Sequence[EditTarget | MoETarget], *,
                    read_z: bool = True) -> Readings:
    """Keys (per component, gate-weighted), gate masses ω and layer outputs at each request's subject token.

    The MoE counterpart of ``keys.read_at_subject`` (same prompts, same two-level template average; one
    truncated forward per batch reads every layer): a routed expert's key is its down-projection input,
    recomputed for the subject tokens routed to it, weighted by its gate; the shared expert's by its gate.
    """
    n = len(requests)
    out = {t.layer: LayerReadings() for t in targets}
    z_name = cfg.locate.layer_module.format(cfg.z_layer)
    z_out = None
    deepest = max(targets, key=lambda t: t.layer)

    for pb in subject_batches(tok, requests, templates, cfg.runtime.batch_size, model_device(model),
                              cfg.templates.fact_token):
        batch = pb.batch
        reader = _BatchReader(out, n, pb.pos, pb.req, pb.is_bare, pb.weight)
        handles = [model.register_forward_pre_hook(reader.record_shape, with_kwargs=True)]
        for t in targets:
            handles += _reading_hooks(model, t, reader, stop=(not read_z and t is deepest))
        if read_z:
            handles.append(get_module(model, z_name).register_forward_hook(reader.z_hook))
        try:
            forward_until(model, batch)
        finally:
            for h in handles:
                h.remove()
        if read_z:
            if z_out is None:
                z_out = torch.zeros(n, reader.z.shape[1])
            z_out[reader.req[reader.is_bare]] = reader.z[reader.is_bare]
    return Readings(out, z_out)


class _BatchReader:
    """One batch of prompts: their subject positions, requests and template weights, and the sums it adds to."""

    def __init__(self, out: dict[int, LayerReadings], n: int, pos: torch.Tensor, req: torch.Tensor,
                 is_bare: torch.Tensor, a: torch.Tensor) -> None:
        self.out, self.n = out, n
        self.rows = torch.arange(len(pos))  # [P] prompt rows of the batch
        self.pos, self.req, self.is_bare, self.a = pos, req, is_bare, a  # [P] each
        self.shape: tuple[int, int] | None = None  # [batch, seq] of the forward
        self.z: torch.Tensor | None = None  # [P, d] z-layer output at the subject tokens
        self.scratch: dict[str, torch.Tensor] = {}

    def record_shape(self, module, args, kwargs) -> None:
        self.shape = batch_shape_of(args, kwargs)

    def at_subject(self, x: torch.Tensor) -> torch.Tensor:
        """x [batch, seq, ·] or flattened [batch·seq, ·] → its rows at the subject tokens [P, ·] fp32."""
        x = unflatten_tokens(x, self.shape)
        return x[self.rows.to(x.device), self.pos.to(x.device)].float()

    def add(self, layer: int, key: int, keys: torch.Tensor, gate: torch.Tensor, sel: torch.Tensor) -> None:
        """Add a·g·k of the prompts ``sel`` [P] bool to component ``key``'s sums (keys [P_sel, d_in], gate [P_sel])."""
        rd = self.out[layer]
        if key not in rd.key_sums:
            rd.key_sums[key] = torch.zeros(self.n, keys.shape[1])
            rd.mass[key] = torch.zeros(self.n)
        wgt = self.a[sel] * gate.float().cpu()  # [P_sel]
        rd.key_sums[key].index_add_(0, self.req[sel], keys.float().cpu() * wgt[:, None])
        rd.mass[key].index_add_(0, self.req[sel], wgt)

    def keep_value(self, layer: int, y: torch.Tensor) -> None:
        """The layer's output on the bare prompts."""
        rd = self.out[layer]
        v = self.at_subject(y)  # [P, d]
        if rd.bare_value is None:
            rd.bare_value = torch.zeros(self.n, v.shape[1])
        rd.bare_value[self.req[self.is_bare]] = v[self.is_bare].cpu()

    def z_hook(self, module, args, output) -> None:
        self.z = self.at_subject(output[0] if isinstance(output, (tuple, list)) else output).cpu()
        raise StopForward


def _reading_hooks(model, t: EditTarget | MoETarget, reader: _BatchReader, stop: bool) -> list:
    """Hooks reading one layer during a forward of prompts (see ``read_at_subject``)."""

    def finish(output) -> None:
        reader.keep_value(t.layer, output[0] if isinstance(output, (tuple, list)) else output)
        if stop:
            raise StopForward

    if not isinstance(t, MoETarget):
        def dense_hook(module, args, output):
            k = reader.at_subject(args[0])  # [P, d_in]
            reader.add(t.layer, t.layer, k, torch.ones(k.shape[0]), torch.ones(k.shape[0], dtype=torch.bool))
            finish(output)

        return [t.module.register_forward_hook(dense_hook)]

    def experts_pre_hook(module, args, kwargs):
        x, idx, w = expert_call_args(args, kwargs)  # [T, d], [T, k], [T, k]
        xs, w_s = reader.at_subject(x), reader.at_subject(w)  # [P, d], [P, k]
        idx_s = reader.at_subject(idx).long()  # [P, k]
        for e in torch.unique(idx_s).tolist():
            if not 0 <= e < t.num_experts:  # expert-parallel sentinels
                continue
            hit = idx_s == e  # [P, k]
            sel = hit.any(1)  # [P] the prompts whose subject token is routed to e
            gate = (w_s * hit).sum(1)[sel]  # [P_e]
            keys = t.expert_inputs(e, xs[sel].to(x.dtype))  # [P_e, d_ff]
            add_sel = sel.cpu()
            reader.add(t.layer, expert_key(t.layer, e), keys, gate, add_sel)

    def shared_hook(module, args, output):
        reader.scratch["shared_keys"] = reader.at_subject(args[0])  # [P, d_ff_s]

    def shared_gate_hook(module, args, output):
        reader.scratch["shared_gate"] = torch.sigmoid(reader.at_subject(output)).reshape(-1)  # [P]

    def block_hook(module, args, output):
        if t.shared is not None:
            k = reader.scratch.pop("shared_keys")
            gate = reader.scratch.pop("shared_gate") if t.shared_gate else torch.ones(k.shape[0])
            reader.add(t.layer, t.shared.layer, k, gate, torch.ones(k.shape[0], dtype=torch.bool))
        finish(output)

    return hook_block(model, t, experts_pre_hook, shared_hook, shared_gate_hook, block_hook)


def layer_problems(t: EditTarget | MoETarget, rd: LayerReadings, resid: torch.Tensor, stats: CorpusStats,
                   *, bias_in_r: bool) -> list[ComponentProblem]:
    """The per-component problems of one layer (module docstring), for the components the forget set touches.

    resid  [N, d]  the layer's residual r_i (already divided by the number of remaining layers)
    bias_in_r      fold (√ω − 1) b into R (the closed form; GD compares ΔW K with R, where b cancels)
    """
    keys = [k for k, _ in components(t)]
    G = sum(rd.mass[k] for k in keys if k in rd.mass)  # [N] total gate mass of the layer per request
    gate_mass = stats[t.layer].ks.double() / max(stats[t.layer].n, 1) if isinstance(t, MoETarget) else None  # π
    out = []
    for c, (key, target) in enumerate(components(t)):
        if key not in rd.mass or not bool((rd.mass[key] > 0).any()):
            continue  # not touched by the forget set: its weights are never written
        rows = (rd.mass[key] > 0).nonzero().flatten()
        omega = rd.mass[key][rows]  # [n_c]
        s = omega.sqrt().to(target.device)  # [n_c]
        K = (rd.keys(key)[rows].to(target.device) * s[:, None]).t()  # [d_in, n_c]
        R = (resid[rows].to(target.device) / G[rows].to(target.device)[:, None] * s[:, None]).t()  # [d, n_c]
        b = target.bias
        if bias_in_r and b is not None:
            R = R + b.detach().float().to(target.device)[:, None] * (s - 1.0)[None, :]
        st = stats[key]
        if st.n < 2:
            raise ZuFastError(
                f"{describe_key(key)}: the forget set is routed to this expert ({len(rows)} of the requests), but "
                f"the corpus statistics saw it on {st.n} tokens; collect statistics on a larger corpus")
        weight = float(gate_mass[c]) if gate_mass is not None else 1.0
        out.append(ComponentProblem(key, target, K, R, weight, rows, omega,
                                    {"requests": float(rows.numel()), "gate_mass_mean": float(omega.mean()),
                                     "corpus_weight": weight}))
    return out


class MoELayers:
    """Mixture-of-experts blocks (and dense layers among them, as one-component layers): per-component keys,
    gate masses and weighted problems (module docstring). Every expert of the edited layers is backed up up
    front, since which experts the forget set reaches at a layer is known only once the layers below it are
    edited; the untouched ones are never written."""

    def bound_targets(self, targets: Sequence[EditTarget | MoETarget]) -> list[EditTarget]:
        return [c for t in targets for _, c in components(t)]

    def check_stats(self, stats: CorpusStats, targets: Sequence[EditTarget | MoETarget]) -> None:
        for t in targets:
            for key in ([t.layer] + [k for k, _ in components(t)]):
                stats[key]  # noqa: B018 - a clear error naming the layer if the statistics lack it
            for key, c in components(t):
                if stats[key].d_in != c.d_in:
                    raise ZuFastError(f"{describe_key(key)}: statistics have width {stats[key].d_in}, {c.name} "
                                      f"takes {c.d_in}")

    def read(self, model, tok, requests, cfg, templates, targets) -> Readings:
        return read_at_subject(model, tok, requests, cfg, templates, targets)

    def clean_output(self, readings: Readings, t: EditTarget | MoETarget) -> torch.Tensor:
        return readings.layers[t.layer].bare_value

    def problems(self, t: EditTarget | MoETarget, readings: Readings, resid: torch.Tensor, stats: CorpusStats, *,
                 bias_in_r: bool) -> list[ComponentProblem]:
        return layer_problems(t, readings.layers[t.layer], resid.cpu(), stats, bias_in_r=bias_in_r)


__all__ = ["LayerReadings", "MoELayers", "Readings", "components", "layer_problems", "read_at_subject", "SHARED"]
