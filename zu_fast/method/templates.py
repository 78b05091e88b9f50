"""Step 0: context templates — short model-generated prefixes that make keys less prompt-specific."""

from __future__ import annotations

import hashlib
import json
import re

import torch

from ..config import UnlearnConfig
from ..model import encode_prompts, model_device, model_fingerprint, padded_batch
from ..stats.store import cache_root


@torch.no_grad()
def generate_context_templates(model, tok, cfg: UnlearnConfig) -> list[list[str]]:
    """``[["{}"], ["<generation>. {}", ...]]``: one generation of ``context_template_length``
    tokens per prompt in ``cfg.templates.prompts`` (top-5 sampling from a seeded generator,
    as the reference does, so the result is deterministic), braces removed so the generations
    cannot interfere with ``str.format``.
    """
    if cfg.templates.length <= 0 or not cfg.templates.prompts:
        return [["{}"]]
    device = model_device(model)
    gen = torch.Generator(device="cpu").manual_seed(cfg.templates.seed)
    seqs = encode_prompts(tok, cfg.templates.prompts)
    bad = {tok.eos_token_id, tok.pad_token_id, getattr(tok, "bos_token_id", None)} - {None}
    for _ in range(cfg.templates.length):
        batch = padded_batch(tok, seqs, device)
        logits = model(**batch, use_cache=False).logits  # [n, T, vocab]
        last = batch["attention_mask"].sum(1) - 1
        nxt = logits[torch.arange(len(seqs), device=logits.device), last].float().cpu()  # [n, vocab]
        for b in bad:
            nxt[:, b] = -float("inf")  # keep the prefixes free of EOS/padding
        top = nxt.topk(5, dim=-1)
        probs = torch.softmax(top.values, -1)
        pick = torch.multinomial(probs, 1, generator=gen).squeeze(1)
        for i, s in enumerate(seqs):
            s.append(int(top.indices[i, pick[i]]))
    texts = tok.batch_decode(seqs, skip_special_tokens=True)
    cleaned = [re.sub(r"\s+", " ", t.replace("{", " ").replace("}", " ")).strip() for t in texts]
    return [["{}"], [f"{t}. {{}}" for t in cleaned]]


def context_templates(model, tok, cfg: UnlearnConfig, cache: bool = True) -> list[list[str]]:
    """Context templates for this model, generated once and cached on disk (keyed by weights + settings)."""
    key_src = json.dumps({
        "model": model_fingerprint(model),
        "prompts": cfg.templates.prompts,
        "length": cfg.templates.length,
        "seed": cfg.templates.seed,
    }, sort_keys=True)
    path = cache_root() / "context_templates" / (hashlib.sha256(key_src.encode()).hexdigest()[:24] + ".json")
    if cache and path.exists():
        return json.loads(path.read_text())
    templates = generate_context_templates(model, tok, cfg)
    if cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(templates))
        tmp.replace(path)
    return templates
