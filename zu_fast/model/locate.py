"""Locating the edited modules on any HF causal LM, by name template.

Besides plain ``nn.Linear`` / GPT-2 ``Conv1D`` output projections this module knows two things the
rest of zu_fast builds on:

- **Names resolved from the model** (:func:`resolve_names`): the decoder layer list, the MLP's output
  projection, the LM head and the final norm are found on the model itself (transformers renames
  them between versions: GPT-NeoX's head was ``embed_out`` and is ``lm_head`` in transformers 5).
- **Mixture-of-experts layers** (:class:`MoETarget`): transformers 5 stores a layer's routed experts
  fused, as 3-D parameters (``experts.down_proj`` [E, d, d_ff], or [E, d_ff, d] when
  ``is_transposed``). An expert's output projection is the slice ``down_proj[e]``; it is named
  ``"<experts>.down_proj[e]"`` (:func:`get_module` resolves such a name to an :class:`ExpertSlice`,
  whose ``weight`` is a view of the slice, so in-place edits write into the fused parameter) and is
  an ordinary :class:`EditTarget` keyed by :func:`expert_key`. ``zu_fast.Edit`` therefore saves,
  restores and re-applies expert edits without knowing about experts.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import ZuFastError


@dataclass
class Locate:
    """Where the edit lives on the model: module name templates, ``{}`` standing for the layer index.

    The ``locate`` section of ``UnlearnConfig`` (defined here, where it is used, so that the model layer
    needs nothing from the config layer above it).
    """

    rewrite_module: str = "model.layers.{}.mlp.down_proj"  # the edited linear map W: k → v (rewrite_module_tmp)
    layer_module: str = "model.layers.{}"  # decoder layer; z lives at the last edited one's output
    lm_head: str = "lm_head"
    final_norm: str = "model.norm"  # used only when targets.loss_layer is below the last layer (ln_f_module)

    def validate(self) -> None:
        for name in ("rewrite_module", "layer_module"):
            value = getattr(self, name)
            if not isinstance(value, str) or "{}" not in value:
                raise ZuFastError(f"config.locate.{name}={value!r} must contain '{{}}' for the layer")
        for name in ("lm_head", "final_norm"):
            if not isinstance(getattr(self, name), str):
                raise ZuFastError(f"config.locate.{name} must be a module name, got {getattr(self, name)!r}")


_SLICE = re.compile(r"^(?P<owner>.+)\.(?P<attr>[A-Za-z_][A-Za-z0-9_]*)\[(?P<index>\d+)\]$")


def get_module(model: nn.Module, name: str) -> nn.Module:
    """The submodule called ``name``; a clear error naming the closest existing prefix if absent.

    ``"<experts module>.<param>[e]"`` (e.g. ``"model.layers.3.mlp.experts.down_proj[5]"``) names one
    expert's slice of a fused 3-D parameter and returns an :class:`ExpertSlice`.
    """
    m = _SLICE.match(name)
    if m is not None:
        return ExpertSlice(get_module(model, m["owner"]), m["attr"], int(m["index"]), name)
    try:
        return model.get_submodule(name)
    except AttributeError:
        parts = name.split(".")
        have = ""
        for i in range(len(parts), 0, -1):
            try:
                model.get_submodule(".".join(parts[:i]))
                have = ".".join(parts[:i])
                break
            except AttributeError:
                continue
        raise ZuFastError(
            f"module {name!r} not found in {type(model).__name__}"
            + (f" (the longest existing prefix is {have!r})" if have else "")
            + "; set rewrite_module_tmp / layer_module_tmp in UnlearnConfig for this architecture"
        ) from None


def layer_count(model: nn.Module, layer_module_tmp: str) -> int:
    """Number of decoder layers, found by probing the layer template."""
    n = 0
    while True:
        try:
            model.get_submodule(layer_module_tmp.format(n))
        except AttributeError:
            return n
        n += 1


def offload_hook(module: nn.Module):
    """The accelerate hook that offloads ``module``'s own weights (weights_map + offload=True), or None.

    With accelerate's CPU/disk offload the parameters of such a module sit on the meta device and
    the hook materialises them from its ``weights_map`` only for the duration of the forward.
    """
    for h in _hooks(module):
        if getattr(h, "offload", False) and getattr(h, "weights_map", None) is not None:
            return h
    return None


def execution_device(module: nn.Module) -> torch.device:
    """Where ``module`` computes: its weight's device, or accelerate's execution device when offloaded."""
    if module.weight.device.type != "meta":
        return module.weight.device
    for h in _hooks(module):
        dev = getattr(h, "execution_device", None)
        if dev is not None:
            return torch.device(f"cuda:{dev}" if isinstance(dev, int) else dev)
    raise ZuFastError(f"{type(module).__name__} has its weights on the meta device and no accelerate hook that "
                      "says where it runs; load the model onto a real device")


def _hooks(module: nn.Module) -> list:
    """accelerate hooks on ``module`` (a SequentialHook unpacked)."""
    hook = getattr(module, "_hf_hook", None)
    return list(getattr(hook, "hooks", None) or ([hook] if hook is not None else []))


def offloaded_value(model: nn.Module, name: str) -> torch.Tensor | None:
    """The real value of parameter/buffer ``name`` that accelerate keeps in an offload map (else None)."""
    mod_name, _, attr = name.rpartition(".")
    try:
        mod = model.get_submodule(mod_name) if mod_name else model
    except AttributeError:
        return None
    hook = offload_hook(mod)
    if hook is None:
        return None
    try:
        return hook.weights_map[attr]
    except KeyError:
        return None


# Names of a norm applied to the MLP's output before it joins the residual stream ("sandwich" blocks: Gemma 2/3/4,
# OLMo 2/3, EXAONE 4 call it post_feedforward_layernorm, GLM-4 post_mlp_layernorm). Llama's
# post_attention_layernorm is the norm *before* the MLP and is not one of them.
POST_MLP_NORMS = ("post_feedforward_layernorm", "post_mlp_layernorm", "post_ffn_layernorm", "post_feedforward_norm")


def post_mlp_norm(model: nn.Module, layer_module_tmp: str, layer: int) -> nn.Module | None:
    """The norm a decoder layer applies to its MLP's output before adding it to the residual stream, or None
    (the MLP output is added as it is: pre-norm blocks, GPT-2, GPT-J, ...)."""
    block = model.get_submodule(layer_module_tmp.format(layer))
    return next((getattr(block, n) for n in POST_MLP_NORMS if isinstance(getattr(block, n, None), nn.Module)), None)


def model_device(model: nn.Module) -> torch.device:
    """Device of the input embeddings (where token ids must go; accelerate's execution device if offloaded)."""
    try:
        emb = model.get_input_embeddings()
        return execution_device(emb)
    except (AttributeError, NotImplementedError):
        return next(model.parameters()).device


@dataclass
class EditTarget:
    """One edited linear map W: k ∈ R^{d_in} → v = W k (+ b) ∈ R^d at one layer."""

    layer: int
    name: str
    module: nn.Module
    transposed: bool  # GPT-2 Conv1D stores Wᵀ

    @property
    def weight(self) -> torch.Tensor:
        """W as a [d, d_in] view of the module's parameter (detached; in-place writes go through)."""
        w = self.module.weight.detach()
        return w.t() if self.transposed else w

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.module, "bias", None)

    @property
    def d(self) -> int:
        return self.weight.shape[0]

    @property
    def d_in(self) -> int:
        return self.weight.shape[1]

    @property
    def device(self) -> torch.device:
        """Where the module computes (accelerate's execution device for an offloaded module)."""
        return execution_device(self.module)

    @property
    def offloaded(self) -> bool:
        """True when accelerate keeps the weight in an offload map (meta here, real only in its forward)."""
        return self.module.weight.device.type == "meta"


# ------------------------------------------------------------------ mixture of experts ------

# Keys of expert components in edits and statistics (``Edit.factors``, ``CorpusStats.layers``), which are
# keyed by int: expert e of layer l is (l + 1)·EXPERT_KEY_BASE + e (layer 3, expert 5 → 40005), the
# shared expert of layer l is (l + 1)·EXPERT_KEY_BASE + SHARED. A MoE layer's own key l holds its gate
# moments (``zu_fast.stats.moe``). Dense layers keep their layer number.
EXPERT_KEY_BASE = 10_000
SHARED = EXPERT_KEY_BASE - 1  # the shared expert's index in expert_key


def expert_key(layer: int, expert: int) -> int:
    """The int key of expert ``expert`` (or :data:`SHARED`) of MoE layer ``layer``."""
    if not 0 <= expert < EXPERT_KEY_BASE:
        raise ZuFastError(f"expert index {expert} out of range (at most {EXPERT_KEY_BASE - 1} experts per layer)")
    return (layer + 1) * EXPERT_KEY_BASE + expert


def split_key(key: int) -> tuple[int, int | None]:
    """(layer, expert) of an edit/statistics key; expert None for a dense layer's key."""
    if key < EXPERT_KEY_BASE:
        return key, None
    return key // EXPERT_KEY_BASE - 1, key % EXPERT_KEY_BASE


def describe_key(key: int) -> str:
    """'layer 3', 'layer 3 expert 5' or 'layer 3 shared expert' (for messages and reports)."""
    layer, e = split_key(key)
    if e is None:
        return f"layer {layer}"
    return f"layer {layer} shared expert" if e == SHARED else f"layer {layer} expert {e}"


class ExpertSlice:
    """One expert's slice of a fused 3-D expert parameter, standing in for a module with ``.weight``.

    ``weight`` is a detached view of ``owner.<attr>[index]`` (in-place writes go into the fused
    parameter; nothing is copied), ``bias`` the matching slice of ``owner.<attr>_bias`` if the
    experts have biases (gpt-oss). Not an ``nn.Module``: it is never registered on the model.
    """

    def __init__(self, owner: nn.Module, attr: str, index: int, name: str = "") -> None:
        p = getattr(owner, attr, None)
        if not isinstance(p, torch.Tensor) or p.dim() != 3:
            raise ZuFastError(f"{name or attr!r}: {type(owner).__name__}.{attr} is not a fused 3-D expert parameter")
        if not 0 <= index < p.shape[0]:
            raise ZuFastError(f"{name or attr!r}: expert {index} out of range (the layer has {p.shape[0]} experts)")
        self.owner, self.attr, self.index, self.name = owner, attr, index, name

    @property
    def weight(self) -> torch.Tensor:
        return getattr(self.owner, self.attr).detach()[self.index]

    @property
    def bias(self) -> torch.Tensor | None:
        b = getattr(self.owner, f"{self.attr}_bias", None)
        return b.detach()[self.index] if isinstance(b, torch.Tensor) else None

    @property
    def _hf_hook(self) -> Any:  # accelerate's hook lives on the owning experts module
        return getattr(self.owner, "_hf_hook", None)

    def __repr__(self) -> str:
        return f"ExpertSlice({type(self.owner).__name__}.{self.attr}[{self.index}])"


def is_fused_experts(module: nn.Module) -> bool:
    """True for transformers ≥ 5's fused experts (``down_proj`` and ``gate_up_proj``/``up_proj`` 3-D)."""
    down = getattr(module, "down_proj", None)
    up = getattr(module, "gate_up_proj", None)
    if up is None:
        up = getattr(module, "up_proj", None)
    return (isinstance(down, torch.Tensor) and down.dim() == 3 and isinstance(up, torch.Tensor) and up.dim() == 3)


# Names of a dense MLP's output projection inside an MLP module (Llama/Mistral/Qwen/Gemma/DeepSeek
# down_proj, GPT-2 c_proj, GPT-J fc_out, NeoX/Falcon dense_4h_to_h, OPT/Phi fc2, Mixtral-v0 w2, ModernBERT Wo).
_MLP_OUTPUTS = ("down_proj", "c_proj", "fc_out", "dense_4h_to_h", "fc2", "w2", "Wo")
_SHARED_EXPERTS = ("shared_expert", "shared_experts", "shared_mlp")


@dataclass
class MoETarget:
    """The routed experts (and the shared expert, if any) of one mixture-of-experts layer.

    ``name``/``block`` are the MoE block (what ``rewrite_module_tmp`` names, e.g. ``model.layers.3.mlp``);
    its output is the layer's MLP output (the "module output" of docs/algorithm.md, steps 1 and 3).
    ``module`` is expert 0's slice, for code that reads the edited weights' dtype and device.
    Expert e computes v_e = W_e k_e (+ b_e) with k_e = act(x W_gate,eᵀ) ⊙ (x W_up,eᵀ)  # [d_ff]
    and the block returns Σ_{e ∈ top-k(x)} g_e(x) v_e [+ s(x) · shared(x)].
    """

    layer: int
    name: str
    block: nn.Module  # the MoE block
    experts_name: str
    experts: nn.Module  # fused experts (3-D parameters)
    shared: EditTarget | None = None  # the shared expert's output projection, keyed expert_key(layer, SHARED)
    shared_gate: str | None = None  # a Linear(d, 1) whose sigmoid scales the shared expert (Qwen2-MoE)
    flags: dict[str, bool] = field(default_factory=dict)  # has_gate, has_bias, transposed

    @property
    def num_experts(self) -> int:
        return int(self.experts.down_proj.shape[0])

    @property
    def module(self) -> ExpertSlice:
        return ExpertSlice(self.experts, "down_proj", 0, self.expert_name(0))

    @property
    def transposed(self) -> bool:
        """down_proj stored [E, d_ff, d] (gpt-oss) instead of [E, d, d_ff]."""
        return self.flags["transposed"]

    @property
    def d(self) -> int:
        """Output width (the hidden size)."""
        p = self.experts.down_proj
        return int(p.shape[2] if self.transposed else p.shape[1])

    @property
    def d_in(self) -> int:
        """Width of one expert's keys (d_ff of an expert)."""
        p = self.experts.down_proj
        return int(p.shape[1] if self.transposed else p.shape[2])

    @property
    def device(self) -> torch.device:
        return _param_device(self.experts, "down_proj")

    @property
    def offloaded(self) -> bool:
        return self.experts.down_proj.device.type == "meta"

    def expert_name(self, e: int) -> str:
        return f"{self.experts_name}.down_proj[{e}]"

    def expert_target(self, e: int) -> EditTarget:
        """Expert e's output projection as an EditTarget (a view of the slice; keyed expert_key(layer, e))."""
        name = self.expert_name(e)
        return EditTarget(expert_key(self.layer, e), name, ExpertSlice(self.experts, "down_proj", e, name),
                          self.transposed)

    def component_keys(self) -> list[int]:
        """Statistics/edit keys of every component: the routed experts, then the shared expert."""
        keys = [expert_key(self.layer, e) for e in range(self.num_experts)]
        return keys + ([expert_key(self.layer, SHARED)] if self.shared is not None else [])

    def expert_inputs(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """k_e  # [n, d_ff]: expert e's down-projection input for hidden states x [n, d] (the model's
        own maths: its ``_apply_gate``/``act_fn``, weight layout and biases)."""
        ex = self.experts
        if self.flags["has_gate"]:
            w, b = ex.gate_up_proj[e], getattr(ex, "gate_up_proj_bias", None)
        else:
            w, b = ex.up_proj[e], getattr(ex, "up_proj_bias", None)
        h = x @ w if self.transposed else nn.functional.linear(x, w)
        if self.flags["has_bias"] and b is not None:
            h = h + b[e]
        if not self.flags["has_gate"]:
            return ex.act_fn(h)
        if hasattr(ex, "_apply_gate"):
            return ex._apply_gate(h)
        gate, up = h.chunk(2, dim=-1)
        return ex.act_fn(gate) * up

    def expert_outputs(self, e: int, k: torch.Tensor) -> torch.Tensor:
        """v_e = W_e k (+ b_e)  # [n, d] for keys k [n, d_ff]."""
        t = self.expert_target(e)
        v = k @ t.weight.t()
        return v + t.bias if t.bias is not None else v


def _param_device(module: nn.Module, attr: str) -> torch.device:
    p = getattr(module, attr)
    if p.device.type != "meta":
        return p.device
    for h in _hooks(module):
        dev = getattr(h, "execution_device", None)
        if dev is not None:
            return torch.device(f"cuda:{dev}" if isinstance(dev, int) else dev)
    raise ZuFastError(f"{type(module).__name__}.{attr} is on the meta device and no accelerate hook says where it "
                      "runs; load the model onto a real device")


def moe_target(model: nn.Module, layer: int, name: str, module: nn.Module) -> MoETarget | None:
    """The MoETarget of the block ``name`` (or of fused experts named directly), else None."""
    if is_fused_experts(module):
        experts, experts_name = module, name
        block_name = name.rpartition(".")[0]
        block = get_module(model, block_name) if block_name else model
    else:
        experts = getattr(module, "experts", None)
        if not isinstance(experts, nn.Module) or not is_fused_experts(experts):
            if isinstance(experts, nn.ModuleList):
                raise ZuFastError(
                    f"layer {layer}: {name!r} keeps its experts as a ModuleList of separate MLPs; zu_fast edits the "
                    "fused 3-D experts of transformers ≥ 5 (load the model with transformers 5, or name one "
                    "expert's output projection in rewrite_module_tmp to edit it as a dense layer)")
            return None
        block, block_name, experts_name = module, name, f"{name}.experts"
    if getattr(experts, "has_post_expert_norm", False):
        raise ZuFastError(f"layer {layer}: the experts of {block_name!r} normalise each expert's output; the edit "
                          "W ← D W assumes the expert's output projection is the last map: not supported")
    down = experts.down_proj
    transposed = getattr(experts, "is_transposed", None)
    if transposed is None:  # older classes: infer from the hidden size
        hidden = getattr(getattr(experts, "config", None), "hidden_size", None)
        transposed = bool(hidden is not None and down.shape[2] == hidden and down.shape[1] != hidden)
    flags = {"has_gate": bool(getattr(experts, "has_gate", hasattr(experts, "gate_up_proj"))),
             "has_bias": bool(getattr(experts, "has_bias", hasattr(experts, "down_proj_bias"))),
             "transposed": bool(transposed)}
    shared = shared_gate = None
    for attr in _SHARED_EXPERTS:
        mlp = getattr(block, attr, None)
        if isinstance(mlp, nn.Module):
            out = next((o for o in _MLP_OUTPUTS if isinstance(getattr(mlp, o, None), nn.Linear)), None)
            if out is None:
                raise ZuFastError(f"layer {layer}: the shared expert {block_name}.{attr} has no Linear output "
                                  f"projection named one of {_MLP_OUTPUTS}")
            sname = f"{block_name}.{attr}.{out}"
            shared = EditTarget(expert_key(layer, SHARED), sname, getattr(mlp, out), False)
            gate = getattr(block, f"{attr}_gate", None)
            if isinstance(gate, nn.Linear) and gate.out_features == 1:
                shared_gate = f"{block_name}.{attr}_gate"
            break
    return MoETarget(layer, block_name, block, experts_name, experts, shared, shared_gate, flags)


# ------------------------------------------------------------------ names from the model ------

# Where families keep the final norm (read only for a ``v_loss_layer`` below the top).
_FINAL_NORMS = ("model.norm", "transformer.ln_f", "gpt_neox.final_layer_norm", "model.final_layernorm",
                "model.decoder.final_layer_norm", "model.language_model.norm", "transformer.norm_f")


def module_name(model: nn.Module, module: nn.Module | None) -> str | None:
    """The name under which ``module`` is registered in ``model`` (None if it is not)."""
    if module is None:
        return None
    return next((n for n, m in model.named_modules() if m is module), None)


def resolve_names(model: nn.Module, n_layers: int | None = None) -> dict[str, Any]:
    """Module names of a decoder-only model, found on the model itself.

    Returns a dict with whatever was found of ``layer_module_tmp`` (the ModuleList of decoder layers
    with ``n_layers`` entries, preferring a language model's over a vision tower's),
    ``rewrite_module_tmp`` (layer 0's MoE block or MLP output projection, by the names the families
    use), ``lm_head_module`` (``get_output_embeddings()``) and ``ln_f_module``; and ``n_layers``.
    """
    out: dict[str, Any] = {}
    try:
        head = model.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        head = None
    name = module_name(model, head)
    if name:
        out["lm_head_module"] = name
    every = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    # the config's depth picks the decoder's list; when no list has it (the decoder of an encoder-decoder family,
    # whose num_hidden_layers is the encoder's: Blenderbot), every list is a candidate
    outer = [(n, m) for n, m in every if not any(n.startswith(o + ".") for o, _ in every)]  # not inside a layer
    lists = [(n, m) for n, m in every if n_layers is None or len(m) == n_layers] or outer

    def rank(item: tuple[str, nn.Module]) -> tuple[int, int]:
        n, m = item
        avoid = any(w in n for w in ("encoder", "expert"))
        return (1 if avoid else 0, -len(m))

    # a vision or audio tower's layers are never the language model's, even when nothing else is recognised
    towers = ("vision", "visual", "image", "audio", "speech")
    for lname, layers in sorted([x for x in lists if not any(w in x[0] for w in towers)], key=rank):
        # every layer, not only the first: a MoE model whose first layers are dense (DeepSeek, GLM-4.5, ...) is
        # edited through the MoE block's name, which resolves to the MLP output projection on its dense layers
        rels = [_mlp_output_in(layer) for layer in layers]
        moe = [r for r, layer in zip(rels, layers) if r is not None and _is_moe_block(layer, r)]
        rel = moe[0] if moe else rels[0]
        if rel is not None:
            out["layer_module_tmp"] = lname + ".{}"
            out["rewrite_module_tmp"] = lname + ".{}." + rel
            out["n_layers"] = len(layers)
            break
    for norm in _FINAL_NORMS:
        try:
            model.get_submodule(norm)
        except AttributeError:
            continue
        out["ln_f_module"] = norm
        break
    return out


def _is_moe_block(layer: nn.Module, rel: str) -> bool:
    mod = layer.get_submodule(rel) if rel else layer
    return isinstance(getattr(mod, "experts", None), nn.Module) and is_fused_experts(mod.experts)


def _mlp_output_in(layer: nn.Module) -> str | None:
    """The edited module inside one decoder layer, relative to it: a MoE block, else the MLP's output."""
    for mlp_name in ("mlp", "block_sparse_moe", "feed_forward", "ffn", "mlp_block", ""):
        mlp = getattr(layer, mlp_name, None) if mlp_name else layer
        if not isinstance(mlp, nn.Module):
            continue
        if isinstance(getattr(mlp, "experts", None), nn.Module) and is_fused_experts(mlp.experts):
            return mlp_name
        for o in _MLP_OUTPUTS:
            mod = getattr(mlp, o, None)
            if isinstance(mod, nn.Linear) or (type(mod).__name__ == "Conv1D" and hasattr(mod, "weight")):
                return f"{mlp_name}.{o}" if mlp_name else o
    return None


# ------------------------------------------------------------------ the edit targets ------


def edit_targets(model: nn.Module, layers: list[int], locate: Locate, *,
                 allow_offloaded: bool = False) -> list[EditTarget | MoETarget]:
    """The edit targets of ``layers`` (modules ``locate.rewrite_module``), validating layer range and module kind.

    A dense layer gives an :class:`EditTarget` (nn.Linear or Conv1D); a mixture-of-experts block (or
    its fused experts) a :class:`MoETarget`; a dense MLP module named in place of its output
    projection (DeepSeek's first layers under the MoE template ``model.layers.{}.mlp``) resolves to
    that projection.
    ``allow_offloaded``: accept modules whose weights accelerate offloads (CPU/disk offload hooks):
    reading their inputs (statistics) works, but the edit writes weights in place, so ``unlearn``
    requires the edited modules to be resident and refuses offloaded ones with a clear error.
    """
    n_layers = layer_count(model, locate.layer_module)
    if n_layers == 0:
        raise ZuFastError(
            f"layer_module_tmp {locate.layer_module!r} matched nothing in {type(model).__name__}; "
            "set it (and rewrite_module_tmp) for this architecture"
        )
    out: list[EditTarget | MoETarget] = []
    for layer in layers:
        if not 0 <= layer < n_layers:
            raise ZuFastError(f"layer {layer} out of range: the model has layers 0..{n_layers - 1}")
        name = locate.rewrite_module.format(layer)
        mod = get_module(model, name)
        if isinstance(mod, nn.Linear):
            transposed = False
        elif type(mod).__name__ == "Conv1D" and hasattr(mod, "weight"):
            transposed = True  # transformers' GPT-2 Conv1D: y = x @ weight + bias, weight [d_in, d]
        else:
            moe = moe_target(model, layer, name, mod)
            if moe is not None:
                _check_resident(moe.experts, "down_proj", layer, moe.experts_name, locate, allow_offloaded)
                if moe.shared is not None:
                    _check_resident(moe.shared.module, "weight", layer, moe.shared.name, locate, allow_offloaded)
                out.append(moe)
                continue
            inner = next((o for o in _MLP_OUTPUTS if isinstance(getattr(mod, o, None), nn.Linear)), None)
            if inner is None:
                raise ZuFastError(
                    f"layer {layer}: module {name!r} is a {type(mod).__name__}; zu_fast edits nn.Linear or "
                    "Conv1D modules (the MLP's output projection) and fused mixture-of-experts blocks"
                )
            name, mod, transposed = f"{name}.{inner}", getattr(mod, inner), False
        _check_resident(mod, "weight", layer, name, locate, allow_offloaded)
        out.append(EditTarget(layer, name, mod, transposed))
    return out


def _check_resident(mod: nn.Module, attr: str, layer: int, name: str, locate: Locate,
                    allow_offloaded: bool) -> None:
    """Refuse a weight on the meta device (not loaded), and, unless allowed, one accelerate offloads."""
    if getattr(mod, attr).device.type != "meta":
        return
    if offload_hook(mod) is None:
        raise ZuFastError(
            f"layer {layer}: weight of {name!r} is on the meta device (not loaded); load it onto a real "
            "device before editing"
        )
    if not allow_offloaded:
        raise ZuFastError(
            f"layer {layer}: {name!r} is offloaded by accelerate (its weight lives in the offload hook's "
            "weights map and is materialised only during its forward); zu_fast edits weights in place, so "
            f"the edited layers must be resident: keep {locate.layer_module.format(layer)!r} on a device "
            "in the device_map (e.g. device_map[...] = 0 or 'cpu', not 'disk' and outside cpu_offload). "
            "collect_stats works with offloaded layers."
        )
