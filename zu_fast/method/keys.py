"""Steps 1 and 5's readings: keys (and values) at the key position of each prompt, z-layer outputs.

The key position is ``cfg.templates.fact_token``: the subject's last token (the paper's) or the prompt's last
token (:func:`key_positions`). Retain records (``method/retain.py``) are read by the same functions.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from ..config import UnlearnConfig
from ..errors import ZuFastError
from ..model import Capture, EditTarget, forward_until, model_device, padded_batch, subject_spans
from ..requests import UnlearnRequest


def key_positions(tok, prompts: Sequence[str], subjects: Sequence[str], what: Sequence[str] | None,
                  fact_token: str) -> tuple[list[list[int]], list[int]]:
    """Token ids of each ``prompt.format(subject)`` and the position where its key is read (and δ placed):
    ``"subject_last"``, the subject's last token, or ``"last"``, the prompt's last token. The subject is located
    in either case (a prompt that does not contain it is refused, naming ``what``)."""
    ids, subject_last = subject_spans(tok, prompts, subjects, what)
    if fact_token == "subject_last":
        return ids, subject_last
    if fact_token == "last":
        return ids, [len(x) - 1 for x in ids]
    raise ZuFastError(f"unknown fact_token {fact_token!r}; choose 'subject_last' or 'last'")


@dataclass
class SubjectReadings:
    """What the model computes at each request's key position (``cfg.templates.fact_token``)."""

    keys: dict[int, torch.Tensor]  # layer → [N, d_in] fp32, averaged over templates, then over template types
    bare_values: dict[int, torch.Tensor]  # layer → [N, d] fp32, module output for the bare prompt
    z_out: torch.Tensor | None  # [N, d] fp32, output of decoder layer z on the bare prompt


@dataclass
class PromptBatch:
    """One batch of the forget set's prompts (every context template of every request, and each bare prompt)."""

    batch: dict  # padded model inputs
    pos: torch.Tensor  # [B] the key position (the subject's last token, or the prompt's last)
    req: torch.Tensor  # [B] the request each prompt belongs to
    is_bare: torch.Tensor  # [B] bool: the bare prompt "{}" (values and z are read there)
    weight: torch.Tensor  # [B] the prompt's weight in its request's two-level template average (0: extra bare)


def template_weights(templates: Sequence[Sequence[str]]) -> list[float]:
    """Each flat template's weight in its request's two-level average (1/(types · templates of its type)): the
    reference's mean over the templates of each context type, then over the types."""
    return [1.0 / (len(templates) * len(group)) for group in templates for _ in group]


def subject_batches(tok, requests: Sequence[UnlearnRequest], templates: Sequence[Sequence[str]], batch_size: int,
                    device, fact_token: str = "subject_last") -> Iterator[PromptBatch]:
    """The prompts every reading runs: each request in every context template (``templates`` grouped by type),
    plus its bare prompt when no template is a bare "{}", in batches of ``batch_size``. A prompt's weight is
    1/(types · templates of its type), so averaging keys is the reference's two-level mean over templates,
    then types, and a type with many templates does not dominate. The prompts are batched by length (each
    batch is padded to its own longest prompt; the readers add up per request, in any order)."""
    flat = [t for group in templates for t in group]
    weights = template_weights(templates)
    bare_j = next((j for j, t in enumerate(flat) if t == "{}"), None)
    prompts = [(i, j) for i in range(len(requests)) for j in range(len(flat))]
    if bare_j is None:  # templates without a bare "{}": read it as an extra prompt (weight 0)
        bare_j = len(flat)
        prompts += [(i, bare_j) for i in range(len(requests))]
    tpls = [(flat[j] if j < len(flat) else "{}").format(requests[i].prompt) for i, j in prompts]
    ids, idx = key_positions(tok, tpls, [requests[i].subject for i, _ in prompts],
                             [requests[i].describe() for i, _ in prompts], fact_token)
    order = sorted(range(len(prompts)), key=lambda k: len(ids[k]))
    for b in range(0, len(order), batch_size):
        chunk = order[b : b + batch_size]
        yield PromptBatch(
            padded_batch(tok, [ids[k] for k in chunk], device), torch.tensor([idx[k] for k in chunk]),
            torch.tensor([prompts[k][0] for k in chunk]), torch.tensor([prompts[k][1] == bare_j for k in chunk]),
            torch.tensor([weights[prompts[k][1]] if prompts[k][1] < len(flat) else 0.0 for k in chunk]))


@torch.no_grad()
def read_at_subject(
    model,
    tok,
    requests: Sequence[UnlearnRequest],
    cfg: UnlearnConfig,
    templates: Sequence[Sequence[str]],
    targets: Sequence[EditTarget],
    *,
    read_z: bool = True,
) -> SubjectReadings:
    """One truncated forward per batch of prompts reads every requested layer at once.

    Keys are averaged over the templates of each context type, then over the types (the
    reference's two-level average), so a type with many templates does not dominate.
    """
    names = {t.layer: t.name for t in targets}
    z_name = cfg.locate.layer_module.format(cfg.z_layer)
    stop = z_name if read_z else names[max(names)]
    keys = {layer: None for layer in names}
    bare = {layer: None for layer in names}
    z_out = None
    n = len(requests)
    for pb in subject_batches(tok, requests, templates, cfg.runtime.batch_size, model_device(model),
                              cfg.templates.fact_token):
        outs = [z_name] if read_z else []
        with Capture(model, inputs=list(names.values()), outputs=list(names.values()) + outs, stop_after=stop) as cap:
            forward_until(model, pb.batch)
        rows = torch.arange(len(pb.req))
        pos, req, is_bare, w = pb.pos, pb.req, pb.is_bare, pb.weight
        for layer, name in names.items():
            k = cap.inputs[name][rows.to(cap.inputs[name].device), pos.to(cap.inputs[name].device)].float().cpu()
            v = cap.outputs[name][rows.to(cap.outputs[name].device), pos.to(cap.outputs[name].device)].float().cpu()
            if keys[layer] is None:
                keys[layer] = torch.zeros(n, k.shape[1])
                bare[layer] = torch.zeros(n, v.shape[1])
            keys[layer].index_add_(0, req, k * w[:, None])
            bare[layer][req[is_bare]] = v[is_bare]
        if read_z:
            h = cap.outputs[z_name]
            hz = h[rows.to(h.device), pos.to(h.device)].float().cpu()
            if z_out is None:
                z_out = torch.zeros(n, hz.shape[1])
            z_out[req[is_bare]] = hz[is_bare]
    dev = {t.layer: t.device for t in targets}
    return SubjectReadings(
        {layer: k.to(dev[layer]) for layer, k in keys.items()},
        {layer: v.to(dev[layer]) for layer, v in bare.items()},
        z_out,
    )
