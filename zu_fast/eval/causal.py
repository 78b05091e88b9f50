"""Where does a model look facts up? A causal check of "facts are stored at the subject's tokens".

Locate-then-edit methods (ROME, MEMIT, AlphaEdit, ZeroUnlearn) edit MLP weights at the subject's
LAST token. That can only work if the model reads the fact out of the subject's hidden states,
i.e. if the answer depends on what the subject's positions carry at the edit layers.
:func:`subject_locality` measures this with a noising intervention: at the output of layer ``l``
it adds Gaussian noise of norm ``scale * ||h||`` (``h`` = the clean hidden state at that position)
either to every token of the subject span or to the final (prediction) position only, and reports
the mean probability of the true answer (first token) clean, subject-perturbed and
final-perturbed. A model that stores facts at the subject shows a large drop for the subject
span at middle layers; a model that looks facts up at the prediction position does not.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..config import UnlearnConfig
from ..model import continuation_ids, get_module, model_device, padded_batch, subject_token_ranges

__all__ = ["subject_locality"]


@torch.no_grad()
def subject_locality(
    model,
    tok,
    records: Sequence[dict],
    layers: Sequence[int],
    *,
    scale: float = 2.0,
    n_noise: int = 4,
    seed: int = 0,
    layer_module_tmp: str | None = None,
) -> dict:
    """Mean p(true answer) clean vs. subject-span-perturbed vs. final-position-perturbed, per layer.

    ``records`` are CounterFact-shaped (``prompt`` with ``{}``, ``subject``, ``target_true``).
    Each prompt is noised ``n_noise`` times per layer and position set (fixed ``seed``).
    Returns ``{"clean": float, "layers": {l: {"subject": float, "final": float,
    "subject_drop": float, "final_drop": float}}}`` where drops are relative (1 - p/p_clean).
    ``layer_module_tmp`` names the decoder layers (default: the model's preset, as in
    :meth:`UnlearnConfig.for_model`).
    """
    templates = [r["prompt"] for r in records]
    subjects = [r["subject"] for r in records]
    ids_list, first, last = subject_token_ranges(tok, templates, subjects)
    answers = []
    for r in records:
        t = r["target_true"]
        answers.append(continuation_ids(tok, t["str"] if isinstance(t, dict) else t)[0])
    device = model_device(model)
    batch = padded_batch(tok, ids_list, device)
    final = torch.tensor([len(x) - 1 for x in ids_list], device=device)
    rows = torch.arange(len(ids_list), device=device)
    ans = torch.tensor(answers, device=device)
    span = torch.zeros(batch["input_ids"].shape, dtype=torch.bool, device=device)
    for i, (a, b) in enumerate(zip(first, last)):
        span[i, a : b + 1] = True
    fin = torch.zeros_like(span)
    fin[rows, final] = True

    def p_answer() -> torch.Tensor:
        logits = model(**batch, use_cache=False).logits
        return logits[rows, final].float().softmax(-1)[rows, ans]

    was_training = model.training
    model.eval()
    clean = p_answer()
    gen = torch.Generator(device="cpu").manual_seed(seed)
    tmp = layer_module_tmp or UnlearnConfig.for_model(model, progress=False).locate.layer_module
    out: dict = {"clean": clean.mean().item(), "layers": {}}
    try:
        for layer in layers:
            res = {}
            for name, mask in (("subject", span), ("final", fin)):
                ps = []
                for _ in range(n_noise):
                    def hook(_m, _a, o, mask=mask):
                        h = o[0] if isinstance(o, tuple) else o
                        noise = torch.randn(h.shape, generator=gen).to(h)
                        noise = noise / noise.norm(dim=-1, keepdim=True) * scale * h.norm(dim=-1, keepdim=True)
                        h = h + noise * mask.unsqueeze(-1).to(h)
                        return (h, *o[1:]) if isinstance(o, tuple) else h

                    handle = get_module(model, tmp.format(layer)).register_forward_hook(hook)
                    try:
                        ps.append(p_answer())
                    finally:
                        handle.remove()
                p = torch.stack(ps).mean(0)
                res[name] = p.mean().item()
                res[f"{name}_drop"] = 1.0 - res[name] / max(out["clean"], 1e-12)
            out["layers"][int(layer)] = res
    finally:
        model.train(was_training)
    return out
