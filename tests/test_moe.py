"""Mixture-of-experts editing (issue 15, docs/design-notes.md "Mixture of experts").

- per-expert statistics equal a float64 reference that gathers each expert's routed tokens (keys
  recomputed here from the raw expert weights with each family's formula), the gate moments too;
- the keys zu_fast recomputes reproduce the MoE block's own output;
- the per-expert closed form (wide and narrow experts, with bias) equals the float64 normal-equation
  solution of the gate-weighted problem written from its definition, and the per-expert objectives
  bound the layer's coupled objective (the derivation's Cauchy–Schwarz step);
- a one-expert top-1 Mixtral is a dense MLP: its edit equals the dense edit of the same weights;
- GD and closed form edit only the experts the forget set is routed to: the others stay bit-identical;
  restore and save/load/apply are bit-exact; an expert without corpus statistics is refused by name.
"""

from __future__ import annotations

import math

import pytest
import torch
import transformers as T
from family_models import build
from tiny_models import REQUESTS, corpus, tokenizer

import zu_fast
from zu_fast import UnlearnConfig, ZuFastError
from zu_fast.method.closed_form import multiplier, narrow_multiplier
from zu_fast.method.moe import LayerReadings, layer_problems
from zu_fast.model import edit_targets
from zu_fast.model.locate import SHARED, EditTarget, MoETarget, expert_key
from zu_fast.stats.collect import CorpusStats
from zu_fast.stats.moments import LayerStats

TEMPLATES = [["{}"], ["Because. {}"]]
FAST = dict(progress=False, v_num_grad_steps=2, original_representation="clean", stats_batch_tokens=256)


def _layers_and_names(cfg):
    return cfg.layers, cfg.locate


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ----------------------------------------------------------------------- statistics ------


def _reference_keys(family: str, experts, e: int, x: torch.Tensor) -> torch.Tensor:
    """Expert e's down-projection input for hidden states x, float64, from the raw weights (each family's
    formula written out here, independently of zu_fast)."""
    x = x.double()
    if family == "gpt_oss":  # transposed, interleaved gate/up, biases, clamped SwiGLU
        h = x @ experts.gate_up_proj[e].double() + experts.gate_up_proj_bias[e].double()
        gate, up = h[:, ::2].clamp(max=experts.limit), h[:, 1::2].clamp(-experts.limit, experts.limit)
        return (up + 1) * gate * torch.sigmoid(gate * experts.alpha)
    gate, up = (x @ experts.gate_up_proj[e].double().t()).chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "gpt_oss"])
def test_per_expert_statistics_equal_a_float64_gather(family):
    tok = tokenizer()
    model = build(family)
    cfg = UnlearnConfig.for_model(model, **FAST)
    seen = []  # every call of each MoE layer in the statistics pass: (mask, x, idx, w, shared input, s)
    mask = [None]
    layers = {t.layer: t for t in edit_targets(model, cfg.layers, cfg.locate) if isinstance(t, MoETarget)}
    hooks = [model.register_forward_pre_hook(lambda m, a, kw: mask.__setitem__(0, kw["attention_mask"]),
                                             with_kwargs=True)]
    for layer, t in layers.items():
        cur: dict = {"layer": layer}  # this forward's call of the layer, filled by its parts in any order

        def pre(m, args, kwargs, cur=cur):
            cur.update(mask=mask[0].reshape(-1).bool(), x=args[0], idx=args[1], w=args[2])

        def done(m, a, o, cur=cur):  # the block's forward hook: registered before zu_fast's, so it runs first
            seen.append(dict(cur))

        hooks.append(t.experts.register_forward_pre_hook(pre, with_kwargs=True))
        if t.shared is not None:
            hooks.append(t.shared.module.register_forward_hook(
                lambda m, a, o, cur=cur: cur.update(shared=a[0].reshape(-1, a[0].shape[-1]))))
            hooks.append(model.get_submodule(t.shared_gate).register_forward_hook(
                lambda m, a, o, cur=cur: cur.update(s=torch.sigmoid(o.reshape(-1)))))
        hooks.append(t.block.register_forward_hook(done))
    try:
        stats = zu_fast.collect_stats(model, tok, corpus(40), cfg, cache=False)
    finally:
        for h in hooks:
            h.remove()
    assert len({r["layer"] for r in seen}) == len(layers) and len(seen) > len(layers)  # several batches
    for layer, t in layers.items():
        calls = [r for r in seen if r["layer"] == layer]
        E = t.num_experts
        for e in range(E):
            kk = torch.zeros(t.d_in, t.d_in, dtype=torch.float64)
            ks = torch.zeros(t.d_in, dtype=torch.float64)
            n = 0
            for r in calls:
                rows = (r["idx"] == e).any(1) & r["mask"]  # the tokens routed to e, padding never
                k = _reference_keys(family, t.experts, e, r["x"][rows].detach())
                kk += k.t() @ k
                ks += k.sum(0)
                n += int(rows.sum())
            st = stats[expert_key(layer, e)]
            assert st.n == n > 0
            torch.testing.assert_close(st.kk.double(), kk, rtol=2e-5, atol=2e-5 * float(kk.abs().max()))
            torch.testing.assert_close(st.ks.double(), ks, rtol=2e-5, atol=2e-5 * float(ks.abs().max()))
        # gate moments: g_t = router weight of each expert (0 if not routed), then the shared expert's gate
        g = []
        for r in calls:
            gt = torch.zeros(r["idx"].shape[0], E + (t.shared is not None), dtype=torch.float64)
            gt[:, :E].scatter_add_(1, r["idx"], r["w"].double())
            if t.shared is not None:
                gt[:, E] = r["s"].double()
            g.append(gt[r["mask"]])
        g = torch.cat(g)
        torch.testing.assert_close(stats[layer].kk.double(), g.t() @ g, rtol=2e-5, atol=1e-6)
        torch.testing.assert_close(stats[layer].ks.double(), g.sum(0), rtol=2e-5, atol=1e-6)
        if t.shared is not None:
            ref = torch.cat([r["shared"][r["mask"]] for r in calls]).double()
            st = stats[expert_key(layer, SHARED)]
            assert st.n == ref.shape[0]
            torch.testing.assert_close(st.kk.double(), ref.t() @ ref, rtol=2e-5, atol=2e-5 * float(st.kk.abs().max()))


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "gpt_oss", "deepseek_v3"])
def test_expert_keys_reproduce_the_block(family):
    """Σ_e g_e (W_e k_e + b_e) [+ s · shared] computed from zu_fast's keys equals the MoE block's output."""
    tok = tokenizer()
    model = build(family)
    t = next(t for t in edit_targets(model, *_layers_and_names(UnlearnConfig.for_model(model, progress=False)))
             if isinstance(t, MoETarget))
    got = {}
    h1 = t.experts.register_forward_pre_hook(lambda m, a, kw: got.update(x=a[0], idx=a[1], w=a[2]), with_kwargs=True)
    h2 = t.block.register_forward_hook(lambda m, a, o: got.update(y=(o[0] if isinstance(o, tuple) else o)))
    try:
        with torch.no_grad():
            model(**tok(["Alice Morvan was born in Lisbon."], return_tensors="pt"))
    finally:
        h1.remove()
        h2.remove()
    x, idx, w = got["x"], got["idx"], got["w"]
    with torch.no_grad():
        y = torch.zeros_like(x)
        for e in range(t.num_experts):
            rows = (idx == e).any(1)
            if rows.any():
                g = (w * (idx == e)).sum(1)[rows]
                y[rows] += g[:, None] * t.expert_outputs(e, t.expert_inputs(e, x[rows]))
        if t.shared is not None:
            mlp = model.get_submodule(t.shared.name.rpartition(".")[0])
            s = torch.sigmoid(model.get_submodule(t.shared_gate)(x)) if t.shared_gate else 1.0
            y += s * mlp(x)
    torch.testing.assert_close(y, got["y"].reshape(y.shape), rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------- the maths ------


def _random_stats(key: int, d_in: int, n: int, gen) -> tuple[LayerStats, torch.Tensor]:
    keys = torch.randn(n, d_in, generator=gen) * torch.linspace(0.2, 2.0, d_in)  # [n, d_in]
    st = LayerStats(key, (keys.t() @ keys).float(), keys.sum(0).double(), n)
    return st, keys


@pytest.mark.parametrize("d_in,bias", [(12, False), (12, True), (40, True)])
def test_per_expert_closed_form_equals_the_float64_weighted_problem(d_in, bias):
    """layer_problems folds the gate weights into columns (√ω) and the split residual r/G; the solve equals
    the normal equations of  λ_w π tr(ΔW C ΔWᵀ)-form corpus term + λ_f Σ_i ω_i ‖D W k_i − P(W k_i + b + r_i/G_i)‖²
    + λ‖D W − P W‖²  written out in float64 (D W compared: unique also for a narrow expert, d_in < d)."""
    gen = torch.Generator().manual_seed(0)
    d, N, E, layer = 16, 5, 3, 2
    cfg = UnlearnConfig(layers=[layer], progress=False, forget_weight_fk=30.0, forget_weight_fv=30.0,
                        mom2_update_weight_wk=200.0, mom2_update_weight_wv=200.0)
    gates = torch.zeros(200, E)
    gates[torch.arange(200), torch.randint(0, E, (200,), generator=gen)] = torch.rand(200, generator=gen)
    stats = {layer: LayerStats(layer, (gates.t() @ gates).float(), gates.sum(0).double(), 200)}
    W = {e: torch.randn(d, d_in, generator=gen) / math.sqrt(d_in) for e in range(E)}
    b = {e: (0.3 * torch.randn(d, generator=gen) if bias else None) for e in range(E)}
    for e in range(E):
        stats[expert_key(layer, e)] = _random_stats(expert_key(layer, e), d_in, 300, gen)[0]

    class _Experts(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.down_proj = torch.nn.Parameter(torch.stack([W[e] for e in range(E)]))
            self.gate_up_proj = torch.nn.Parameter(torch.zeros(E, 2 * d_in, d))
            if bias:
                self.down_proj_bias = torch.nn.Parameter(torch.stack([b[e] for e in range(E)]))

    experts = _Experts()
    t = MoETarget(layer, "mlp", torch.nn.Module(), "mlp.experts", experts,
                  flags={"has_gate": True, "has_bias": bias, "transposed": False})
    rd = LayerReadings()
    mass = torch.rand(E, N, generator=gen) * (torch.rand(E, N, generator=gen) > 0.4)  # ω, some experts not routed
    mass[:, 0] = torch.tensor([0.7, 0.3, 0.0])
    keys = torch.randn(E, N, d_in, generator=gen)
    for e in range(E):
        rd.mass[expert_key(layer, e)] = mass[e]
        rd.key_sums[expert_key(layer, e)] = keys[e] * mass[e][:, None]
    resid = torch.randn(N, d, generator=gen)  # [N, d]
    U = torch.linalg.qr(torch.randn(d, 3, generator=gen, dtype=torch.float64))[0]  # [d, 3]
    problems = layer_problems(t, rd, resid, CorpusStats(stats), bias_in_r=True)
    G = mass.sum(0)  # [N]
    assert {p.key for p in problems} == {expert_key(layer, e) for e in range(E) if bool((mass[e] > 0).any())}
    P = (1 + cfg.representation.projector_eps) * torch.eye(d, dtype=torch.float64) - U @ U.t()
    for p in problems:
        e = p.key % 10_000
        lam = {"mom2_update_weight_wk": cfg.closed_form.corpus_weight_k * p.weight,
               "mom2_update_weight_wv": cfg.closed_form.corpus_weight_v * p.weight}
        solve = multiplier if d_in >= d else narrow_multiplier
        D = solve(W[e], stats[p.key], p.K, p.R, U, cfg.replace(**lam), bias=b[e])  # [d, d]
        # the reference: explicit weighted sums, no column scaling
        pi = float(gates[:, e].sum()) / 200
        Wd, st = W[e].double(), stats[p.key]
        C = st.kk.double() / st.n
        X = (Wd @ C + (torch.outer(b[e].double(), st.ks / st.n) if bias else 0.0)) * st.n / (st.n - 1)
        cf = cfg.closed_form
        M = cf.corpus_weight_k * pi * C + cf.regularization * torch.eye(d_in, dtype=torch.float64)
        Y = cfg.closed_form.corpus_weight_v * pi * X + cfg.closed_form.regularization * Wd
        for i in range(N):
            w_i = float(mass[e, i])
            if w_i == 0:
                continue
            k = keys[e, i].double()
            v = Wd @ k + (b[e].double() if bias else 0.0) + resid[i].double() / float(G[i])
            M += cfg.closed_form.forget_weight_k * w_i * torch.outer(k, k)
            Y += cfg.closed_form.forget_weight_v * w_i * torch.outer(v, k)
        B = Wd @ M @ Wd.t()
        A = P @ Y @ Wd.t()
        D_ref = A @ torch.linalg.pinv(B, hermitian=True)  # the minimum-norm solution of D B = A
        # fp32 keys (as read from the model) scaled by √ω: agreement to fp32 round-off
        torch.testing.assert_close(D @ Wd, D_ref @ Wd, rtol=1e-5, atol=1e-6)
        if d_in < d:  # narrow: the multiplicative edit reaches the weighted least-squares weight itself
            torch.testing.assert_close(D @ Wd, P @ Y @ torch.linalg.inv(M), rtol=1e-5, atol=1e-6)


def test_per_expert_objectives_bound_the_layer_objective():
    """The derivation's step: ‖Σ_c g_c a_c‖² ≤ G Σ_c g_c ‖a_c‖² for the layer's output error at every token."""
    gen = torch.Generator().manual_seed(1)
    for _ in range(20):
        g = torch.rand(4, generator=gen, dtype=torch.float64)
        a = torch.randn(4, 8, generator=gen, dtype=torch.float64)
        lhs = ((g[:, None] * a).sum(0)).pow(2).sum()
        assert lhs <= g.sum() * (g * a.pow(2).sum(1)).sum() + 1e-12


def test_one_expert_moe_is_the_dense_edit():
    """Mixtral with one expert and top-1 routing (gate 1) is a Mistral MLP: same statistics, same edit."""
    tok = tokenizer()
    kw = dict(vocab_size=len(tok), hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=256, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
              pad_token_id=tok.pad_token_id, sliding_window=None, rms_norm_eps=1e-6,
              rope_parameters={"rope_type": "default", "rope_theta": 10000.0})  # Mixtral's defaults differ
    torch.manual_seed(0)
    moe = T.MixtralForCausalLM(T.MixtralConfig(intermediate_size=48, num_local_experts=1, num_experts_per_tok=1,
                                               **kw)).eval()
    dense = T.MistralForCausalLM(T.MistralConfig(intermediate_size=48, **kw)).eval()
    sd = {}
    for k, v in moe.state_dict().items():
        if k.endswith("mlp.experts.gate_up_proj"):
            sd[k.replace("experts.gate_up_proj", "gate_proj.weight")], sd[k.replace("experts.gate_up_proj",
                                                                                    "up_proj.weight")] = v[0].chunk(2)
        elif k.endswith("mlp.experts.down_proj"):
            sd[k.replace("experts.down_proj", "down_proj.weight")] = v[0]
        elif "mlp.gate" not in k:
            sd[k] = v
    dense.load_state_dict(sd, strict=True)
    with torch.no_grad():
        ids = tok(["Alice Morvan was born in Lisbon."], return_tensors="pt")
        # the same function, computed through other kernels (fused experts vs three Linear layers): equal to
        # float32 rounding, not bit for bit, in recent transformers
        torch.testing.assert_close(moe(**ids).logits, dense(**ids).logits, rtol=1e-5, atol=1e-6)
    for method in ("closed_form", "gd"):
        factors = []
        for model in (moe, dense):
            cfg = UnlearnConfig.for_model(model, **FAST, method=method, gd_steps=30)
            stats = zu_fast.collect_stats(model, tok, corpus(24), cfg, cache=False)
            edit = zu_fast.unlearn(model, tok, REQUESTS[:2], cfg, stats=stats, context_templates=TEMPLATES)
            factors.append([edit.factors[k] for k in edit.layers])
            edit.restore()
        assert len(factors[0]) == len(factors[1]) == 2  # layers [0, 1]: expert 0 of each, the dense down_proj
        for a, b in zip(*factors):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------- editing ------


@pytest.mark.parametrize("method", ["gd", "closed_form"])
def test_only_routed_experts_change(method, tmp_path):
    tok = tokenizer()
    model = build("qwen2_moe", layers=3, num_experts=8)
    cfg = UnlearnConfig.for_model(model, **FAST, method=method, gd_steps=20)
    stats = zu_fast.collect_stats(model, tok, corpus(40), cfg, cache=False)
    before = _state(model)
    edit = zu_fast.unlearn(model, tok, REQUESTS[:1], cfg, stats=stats, context_templates=[["{}"]])
    edited = _state(model)
    touched = set(edit.layers)
    assert {expert_key(layer, SHARED) for layer in cfg.layers} <= touched  # the shared expert sees every token
    for layer in cfg.layers:
        routed = {k % 10_000 for k in touched if k // 10_000 == layer + 1 and k % 10_000 != SHARED}
        assert len(routed) == 2  # one request, bare prompt only: its subject token's top-2 experts
        name = f"model.layers.{layer}.mlp.experts.down_proj"
        for e in range(8):
            same = torch.equal(edited[name][e], before[name][e])
            assert same == (e not in routed), (layer, e)
        assert torch.equal(edited[f"model.layers.{layer}.mlp.experts.gate_up_proj"],
                           before[f"model.layers.{layer}.mlp.experts.gate_up_proj"])
    assert set(edit.report.layers) == touched  # one report row per edited expert
    edit.save(tmp_path / "e")
    edit.restore()
    assert all(torch.equal(v, before[k]) for k, v in _state(model).items())
    zu_fast.Edit.load(tmp_path / "e").apply(model)
    assert all(torch.equal(v, edited[k]) for k, v in _state(model).items())


def test_expert_without_corpus_tokens_is_refused():
    tok = tokenizer()
    model = build("mixtral")
    cfg = UnlearnConfig.for_model(model, **FAST)
    stats = zu_fast.collect_stats(model, tok, corpus(24), cfg, cache=False)
    before = _state(model)
    for e in range(4):  # as if the corpus had never reached the experts of layer 1
        stats.layers[expert_key(1, e)].n = 1
    with pytest.raises(ZuFastError, match=r"layer 1 expert \d: the forget set is routed to this expert.*1 tokens"):
        zu_fast.unlearn(model, tok, REQUESTS[:1], cfg, stats=stats, context_templates=TEMPLATES)
    assert all(torch.equal(v, before[k]) for k, v in _state(model).items())


def test_expert_slice_names_resolve():
    model = build("gpt_oss")
    t = next(t for t in edit_targets(model, *_layers_and_names(UnlearnConfig.for_model(model, progress=False)))
             if isinstance(t, MoETarget))
    target = t.expert_target(2)
    assert isinstance(target, EditTarget) and target.transposed and target.weight.shape == (32, 24)
    mod = zu_fast.model.get_module(model, target.name)
    assert mod.weight.data_ptr() == t.experts.down_proj[2].data_ptr()  # a view: edits write into the parameter
    assert torch.equal(mod.bias, t.experts.down_proj_bias[2])
    with pytest.raises(ZuFastError, match="expert 9 out of range"):
        zu_fast.model.get_module(model, t.experts_name + ".down_proj[9]")


def test_tiny_moe_option_keeps_the_default_model():
    from zu_fast.eval.tinylm import TinyLMConfig, _build_model

    assert TinyLMConfig().cache_key() == "f07f610c72e7fed4"  # the default small model's key never moves
    cfg = TinyLMConfig(moe_experts=4, moe_intermediate_size=48, hidden_size=32, num_layers=3, num_heads=4)
    assert cfg.cache_key() != TinyLMConfig().cache_key() and cfg.to_dict()["moe_experts"] == 4
    model = _build_model(cfg, len(tokenizer()), tokenizer())
    assert isinstance(model, T.MixtralForCausalLM) and model.config.num_local_experts == 4
    preset = UnlearnConfig.for_model(model)
    assert preset.method == "gd" and preset.locate.rewrite_module == "model.layers.{}.mlp" and preset.layers == [0, 1]
