"""The target optimisation against a plain re-statement of the reference's ``compute_z``.

The reference optimises one request at a time: full forwards of every context-template prompt (plus
the KL prompt "{subject} is a") with a hook that adds δ at the subject's last token to the output of
``edit_template.format(layer)`` — the decoder layer for z (step 2), ``down_proj`` for the original
representation (step 3) — loss = mean target NLL (read at layer ``max(v_loss_layer, layer)`` through
ln_f and the LM head) + kl_factor · kl_div(log p_init, log p_cur, log_target=True) + decay, Adam, stop
when the loss < 0.05, clamp ‖δ‖ ≤ clamp · ‖h_init‖. ``_reference_z`` below is that loop written plainly
(no batching, no layer skipping, no bucketing); zu_fast's batched optimiser must follow it.
"""

from __future__ import annotations

import pytest
import torch
from tiny_models import REQUESTS, llama

from zu_fast import UnlearnConfig
from zu_fast.method.targets import optimize_deltas
from zu_fast.model import continuation_ids, get_module, padded_batch, subject_spans
from zu_fast.requests import normalize_requests

TEMPLATES = [["{}"], ["Because I. {}", "You. {}"]]


def _reference_z(model, tok, req, cfg: UnlearnConfig, layer: int, target_ids: list[int], edit_template: str):
    """One request, the reference's way. Returns (δ, h_init, steps)."""
    prompts = [c.format(req.prompt) for group in TEMPLATES for c in group]
    ids, idx = subject_spans(tok, prompts + ["{} is a"], [req.subject] * (len(prompts) + 1))
    n_rw = len(prompts)
    for i in range(n_rw):
        ids[i] = ids[i] + target_ids[:-1]
    batch = padded_batch(tok, ids, "cpu")
    n_layers = model.config.num_hidden_layers
    loss_layer = max(cfg.targets.loss_layer, layer) if cfg.targets.loss_layer is not None else n_layers - 1
    delta = torch.zeros(model.config.hidden_size, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=cfg.targets.lr)
    h_init = kl_init = None
    mod = get_module(model, edit_template.format(layer))
    loss_out = {}

    def edit_hook(module, args, output):
        nonlocal h_init
        out = output[0] if isinstance(output, tuple) else output
        if h_init is None:
            h_init = out[0, idx[0]].detach().clone()
        out = out.clone()
        for i, p in enumerate(idx):
            out[i, p] = out[i, p] + delta
        return (out,) + tuple(output[1:]) if isinstance(output, tuple) else out

    def loss_hook(module, args, output):
        loss_out["h"] = output[0] if isinstance(output, tuple) else output

    h1 = mod.register_forward_hook(edit_hook)
    h2 = get_module(model, cfg.locate.layer_module.format(loss_layer)).register_forward_hook(loss_hook)
    for p in model.parameters():
        p.requires_grad_(False)
    steps = 0
    try:
        for it in range(cfg.targets.steps):
            opt.zero_grad()
            logits = model(**batch, use_cache=False).logits
            kl_logp = torch.log_softmax(logits[n_rw, idx[n_rw]][None], -1)
            if kl_init is None:
                kl_init = kl_logp.detach().clone()
            head = model.lm_head
            logp = torch.log_softmax(head(get_module(model, cfg.locate.final_norm)(loss_out["h"][:n_rw])), -1)
            nll = []
            for i in range(n_rw):
                start = len(ids[i]) - len(target_ids)
                nll.append(-sum(logp[i, start + j, t] for j, t in enumerate(target_ids)) / len(target_ids))
            nll = torch.stack(nll).mean()
            kl = cfg.targets.kl_factor * torch.nn.functional.kl_div(kl_init, kl_logp, log_target=True,
                                                                    reduction="batchmean")
            wd = cfg.targets.weight_decay * (delta.norm() / h_init.norm() ** 2)
            loss = nll + kl + wd
            if loss < cfg.targets.stop_loss or it == cfg.targets.steps - 1:
                break
            loss.backward()
            opt.step()
            steps += 1
            max_norm = cfg.targets.clamp * h_init.norm()
            if delta.norm() > max_norm:
                with torch.no_grad():
                    delta[...] = delta * max_norm / delta.norm()
    finally:
        h1.remove()
        h2.remove()
    return delta.detach(), h_init, steps


@pytest.mark.parametrize("at_module", [False, True], ids=["z_at_layer_output", "original_at_module_output"])
@pytest.mark.parametrize("v_loss_layer", [None, 2], ids=["model_logits", "loss_at_layer_2"])
def test_batched_targets_follow_the_reference_loop(at_module, v_loss_layer):
    model, tok = llama()
    cfg = UnlearnConfig.for_model(model, layers=[0, 1], progress=False, v_num_grad_steps=6, v_lr=0.05,
                                  v_weight_decay=0.3, kl_factor=0.5, clamp_norm_factor=2.0,
                                  v_loss_layer=v_loss_layer, targets={"lr_relative": False})
    reqs = normalize_requests(REQUESTS[1:])
    layer = 1
    targets = [continuation_ids(tok, None), continuation_ids(tok, "Acme Oslo")]  # one token, several
    got = optimize_deltas(model, tok, reqs, cfg, TEMPLATES, layer, targets, at_module=at_module)
    edit_template = cfg.locate.rewrite_module if at_module else cfg.locate.layer_module
    for i, r in enumerate(reqs):
        delta, h_init, steps = _reference_z(model, tok, r, cfg, layer, targets[i], edit_template)
        assert torch.allclose(got.h_init[i], h_init, rtol=1e-5, atol=1e-7)
        assert int(got.steps[i]) == steps
        assert torch.allclose(got.delta[i], delta, rtol=1e-4, atol=1e-6), (i, (got.delta[i] - delta).norm())


def test_kl_is_current_given_initial():
    """A regression to KL(initial ‖ current) must change the result: with a large KL weight the two
    directions give different δ (checked against the reference loop, which uses kl_div(init, cur))."""
    model, tok = llama()
    cfg = UnlearnConfig.for_model(model, layers=[0, 1], progress=False, v_num_grad_steps=6, v_lr=0.2,
                                  kl_factor=5.0, v_weight_decay=0.0, clamp_norm_factor=5.0,
                                  targets={"lr_relative": False})
    r = normalize_requests(REQUESTS[:1])
    eos = [continuation_ids(tok, None)]
    got = optimize_deltas(model, tok, r, cfg, TEMPLATES, 1, eos)
    delta, _, _ = _reference_z(model, tok, r[0], cfg, 1, eos[0], cfg.locate.layer_module)
    assert torch.allclose(got.delta[0], delta, rtol=1e-4, atol=1e-6)


def test_module_injection_radius_is_relative_to_the_module_output():
    """Step 3's clamp radius is clamp · ‖down_proj output‖, not the decoder layer's."""
    model, tok = llama()
    cfg = UnlearnConfig.for_model(model, layers=[0, 1], progress=False, v_num_grad_steps=10, v_lr=1.0,
                                  clamp_norm_factor=0.1, v_weight_decay=0.0)
    reqs = normalize_requests(REQUESTS)
    t = [continuation_ids(tok, "Lisbon")] * 3
    mod = optimize_deltas(model, tok, reqs, cfg, TEMPLATES, 1, t, at_module=True)
    lay = optimize_deltas(model, tok, reqs, cfg, TEMPLATES, 1, t, at_module=False)
    for res in (mod, lay):
        ratio = res.delta.norm(dim=1) / res.h_init.norm(dim=1)
        assert torch.all(ratio <= 0.1 + 1e-5) and torch.all(ratio > 0.099)  # clamped at the radius
    assert torch.all(mod.h_init.norm(dim=1) < lay.h_init.norm(dim=1))  # different reference points
