"""Does the knowledge stay gone? Attacks and probes on an unlearned model (issue 18).

Published critiques of unlearning find forgotten knowledge coming back after quantization, after a
few fine-tuning steps, under other phrasings, or still readable in the hidden states. Five probes,
all offline, each measured on the model as it is (edited or not):

- ``quant``: fake-quantize every linear weight (round-to-nearest, groupwise; :func:`rtn_quantize`;
  the LM head is kept, as weight-only quantizers do) and re-measure Efficacy / Generalization (and
  Specificity / PPL, the quantization noise). Run on the unedited model too: its change is the
  noise floor. Only the torch implementation here (neither bitsandbytes nor torchao is installed
  on the project's machines; RTN is what their weight-only int8/int4 modes compute, minus kernels).
- ``relearn``: k optimiser steps (AdamW, all parameters) of plain language-model fine-tuning on
  texts that do NOT state the forgotten facts, then re-measure forget recall at each k.
  Synthetic world: (a) ``unrelated``: facts about people not forgotten; (b) ``same_subject``: the
  forgotten people's OTHER facts. The world's facts are drawn independently, so nothing in either
  text set lets a model that never knew a forgotten fact infer it: recall above chance after
  relearning is knowledge that was still in the weights. ``forget`` (the forget facts themselves)
  is the positive control.
- ``lens``: at every decoder layer, the hidden state at the subject's last token (and at the
  prompt's last token) decoded through the final norm and the LM head (the logit lens): the rank
  of the true answer's first token, and whether it beats the relation's other candidate answers.
  ``lens`` also trains, per layer and relation, a linear probe (ridge regression onto the classes)
  on the retained people's facts and applies it to the forgotten ones: the attacker's view of
  whether the answer is still linearly decodable.
- ``generate``: greedy, greedy with EOS forbidden (a neutral-target edit may only have put EOS in
  front of the answer), and sampled continuations (20 new tokens) of the forget prompts and their
  paraphrases: does the true answer appear?
- ``multihop``: two-hop questions whose first hop is a forgotten fact ("The country where X was
  born is"), on a world built with ``WorldConfig(compose=True)``; teacher-forced recall as
  Efficacy, beside the base rate of guessing by the answers' frequencies.

The probe functions take plain prompts, texts and pairs, so they work on any HuggingFace causal LM;
:func:`run_probes` is the synthetic world's driver that ``zu-fast eval --probes ...`` calls after
each method's edit, and :func:`write_robustness` writes the robustness table (md/json/png).
Every probe leaves the model's weights exactly as it found them.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import re
import statistics
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import metrics
from ..errors import ZuFastError
from ..model import Capture, get_module, layer_count, model_device, subject_spans

PROBES = ("quant", "relearn", "lens", "generate", "multihop")
RELEARN_KINDS = ("unrelated", "same_subject", "forget")

__all__ = [
    "PROBES",
    "RELEARN_KINDS",
    "ProbeSettings",
    "final_norm_module",
    "generation_probe",
    "hidden_states_at",
    "lens_probe",
    "linear_probe",
    "multihop_probe",
    "parse_probes",
    "quant_probe",
    "quantized",
    "relearn_probe",
    "relearn_texts",
    "robustness_tables",
    "rtn_quantize",
    "run_probes",
    "write_robustness",
]


@dataclass
class ProbeSettings:
    """Knobs of the probes (recorded with every result)."""

    quant_schemes: tuple[str, ...] = ("int8", "int4")  # see rtn_quantize / parse_scheme
    quant_group_size: int = 128
    relearn_kinds: tuple[str, ...] = ("unrelated", "same_subject")
    relearn_steps: tuple[int, ...] = (5, 20, 50)
    # AdamW on every parameter. 1e-4 is the baselines' fine-tuning rate (BaselineHParams: the
    # literature's 1e-5 on 7B models scaled by the pre-training learning rate, 3e-4 → 3e-3 here).
    relearn_lr: float = 1e-4
    relearn_batch_size: int = 16
    relearn_max_texts: int = 512  # texts per relearning set at most (sampled, seeded)
    lens_positions: tuple[str, ...] = ("subject", "last")
    probe_l2: float = 1e-2  # L2 weight of the linear probe (on standardised features)
    probe_val_fraction: float = 0.2  # retained people held out to validate the probe itself
    gen_max_new_tokens: int = 20
    gen_samples: int = 5
    gen_temperature: float = 1.0
    batch_size: int = 32
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def parse_probes(spec: str | Sequence[str]) -> list[str]:
    """``"quant,relearn"`` (or a list; ``"all"``) → validated probe names in canonical order."""
    names = [s.strip().lower() for s in (spec.split(",") if isinstance(spec, str) else spec) if s.strip()]
    if "all" in names:
        return list(PROBES)
    bad = [n for n in names if n not in PROBES]
    if bad:
        raise ZuFastError(f"unknown probes {bad}; choose from {list(PROBES)} (or 'all')")
    return [p for p in PROBES if p in names]


# =========================================================================== quantization ====


def parse_scheme(scheme: str) -> tuple[int, bool, int | None]:
    """``"int4"``, ``"int8"``, ``"int4-sym"``, ``"int8-asym"``, ``"int4-g64"`` → (bits, symmetric, group).

    Defaults: 8-bit symmetric (absmax), fewer bits asymmetric (min/max with a zero point, as
    GPTQ/AWQ-style RTN int4 stores); group None = the caller's group size.
    """
    m = re.fullmatch(r"int(\d+)(-sym|-asym)?(?:-g(\d+))?", scheme.strip().lower())
    if not m or not 2 <= int(m.group(1)) <= 8:
        raise ZuFastError(f"quantization scheme {scheme!r}: expected int2..int8 with optional -sym/-asym "
                          "and -g<group size>, e.g. 'int4' or 'int8-sym-g64'")
    bits = int(m.group(1))
    symmetric = bits == 8 if m.group(2) is None else m.group(2) == "-sym"
    return bits, symmetric, int(m.group(3)) if m.group(3) else None


@torch.no_grad()
def rtn_quantize(w: torch.Tensor, bits: int, group_size: int = 128, symmetric: bool = True) -> torch.Tensor:
    """Round-to-nearest groupwise fake quantization of a weight ``w`` [out, in]: quantize each group
    of ``group_size`` consecutive input columns of a row with its own scale (and zero point when
    not symmetric), dequantize, return in ``w``'s dtype. ``group_size`` ≤ 0: one group per row.

    This is exactly what a weight-only quantized layer multiplies the activations by.
    """
    if w.ndim != 2:
        raise ZuFastError(f"rtn_quantize expects a 2-D weight, got shape {tuple(w.shape)}")
    if not 2 <= bits <= 8:
        raise ZuFastError(f"bits must be in 2..8, got {bits}")
    g = w.shape[1] if group_size <= 0 else group_size
    out = torch.empty_like(w)
    for j in range(0, w.shape[1], g):  # the last group may be narrower
        blk = w[:, j : j + g].float()  # [out, g]
        if symmetric:
            qmax = 2 ** (bits - 1) - 1
            scale = blk.abs().amax(dim=1, keepdim=True) / qmax  # [out, 1]
            scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero group stays zero
            q = torch.clamp(torch.round(blk / scale), -qmax - 1, qmax)
            out[:, j : j + g] = (q * scale).to(w.dtype)
        else:
            qmax = 2**bits - 1
            lo, hi = blk.amin(dim=1, keepdim=True), blk.amax(dim=1, keepdim=True)  # [out, 1]
            scale = (hi - lo) / qmax
            scale = torch.where(scale > 0, scale, torch.ones_like(scale))
            zero = torch.round(-lo / scale)
            q = torch.clamp(torch.round(blk / scale) + zero, 0, qmax)
            out[:, j : j + g] = ((q - zero) * scale).to(w.dtype)
    return out


def _quant_modules(model: nn.Module, skip: Sequence[str]) -> list[tuple[str, nn.Module, bool]]:
    """(name, module, transposed) of every linear layer to quantize: nn.Linear, and transformers'
    Conv1D (GPT-2; weight stored [in, out]); never the LM head nor a name containing a ``skip`` entry."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    found = []
    for name, mod in model.named_modules():
        if mod is head or any(s in name for s in skip):
            continue
        if isinstance(mod, nn.Linear):
            found.append((name, mod, False))
        elif type(mod).__name__ == "Conv1D" and getattr(mod, "weight", None) is not None and mod.weight.ndim == 2:
            found.append((name, mod, True))
    return found


@contextlib.contextmanager
def quantized(
    model: nn.Module, scheme: str = "int4", *, group_size: int = 128, skip: Sequence[str] = ()
) -> Iterator[dict[str, Any]]:
    """Within the block, every linear weight of ``model`` (LM head excepted) is fake-quantized
    with ``scheme`` (see :func:`parse_scheme`); the originals come back on exit, bit for bit.

    Yields ``{"modules": count, "rel_error": ‖Q(W) − W‖ / ‖W‖ over all quantized weights}``.
    Backups are kept on the CPU (one copy of the quantized weights).
    """
    bits, symmetric, g = parse_scheme(scheme)
    g = g if g is not None else group_size
    mods = _quant_modules(model, skip)
    if not mods:
        raise ZuFastError("no linear layer to quantize in this model")
    backups: list[tuple[torch.Tensor, torch.Tensor]] = []
    err2 = ref2 = 0.0
    try:
        with torch.no_grad():
            for _, mod, transposed in mods:
                w = mod.weight
                backups.append((w, w.detach().to("cpu", copy=True)))
                src = w.t() if transposed else w  # [out, in]
                q = rtn_quantize(src, bits, g, symmetric)
                err2 += float((q.float() - src.float()).pow(2).sum())
                ref2 += float(src.float().pow(2).sum())
                w.copy_(q.t() if transposed else q)
        yield {"modules": len(mods), "rel_error": math.sqrt(err2 / max(ref2, 1e-30))}
    finally:
        with torch.no_grad():
            for w, b in backups:
                w.copy_(b.to(w.device))


def quant_probe(
    model: nn.Module,
    tok,
    records: Sequence[dict],
    schemes: Sequence[str] = ("int8", "int4"),
    *,
    heldout_texts: Sequence[str] | None = None,
    group_size: int = 128,
    batch_size: int = 32,
) -> dict[str, dict[str, float]]:
    """Efficacy / Generalization / Specificity (and PPL when ``heldout_texts``) of the model
    quantized with each scheme, plus the weights' relative quantization error."""
    out = {}
    for scheme in schemes:
        with quantized(model, scheme, group_size=group_size) as info:
            res = _recall_metrics(model, tok, records, batch_size=batch_size, specificity=True)
            if heldout_texts:
                res["perplexity"] = metrics.perplexity(model, tok, heldout_texts, batch_size=16)
        out[scheme] = {**res, "rel_error": info["rel_error"]}
    return out


def _recall_metrics(model, tok, records, *, batch_size: int, specificity: bool = False) -> dict[str, float]:
    was = model.training
    model.eval()
    try:
        res = {"efficacy": metrics.efficacy(model, tok, records, batch_size=batch_size),
               "generalization": metrics.generalization(model, tok, records, batch_size=batch_size)}
        if specificity:
            res["specificity"] = metrics.specificity(model, tok, records, batch_size=batch_size)
    finally:
        model.train(was)
    return res


# =========================================================================== relearning ====


def relearn_texts(world, records: Sequence[dict], kind: str, *, max_texts: int = 512, seed: int = 0) -> list[str]:
    """Fine-tuning texts for the relearning attack on the synthetic world (trained phrasings only).

    - ``unrelated``: facts about people not forgotten (all relations);
    - ``same_subject``: the forgotten subjects' other facts (every relation but the forgotten one;
      another forgotten record about the same person is never included);
    - ``forget``: the forgotten facts themselves (the positive control: this must bring them back).
    At most ``max_texts``, sampled with ``seed``.
    """
    if kind not in RELEARN_KINDS:
        raise ZuFastError(f"relearning kind {kind!r}; choose from {list(RELEARN_KINDS)}")
    forgotten = {(r["subject"], r["relation"]) for r in records}
    subjects = {r["subject"] for r in records}
    texts = []
    for p, name in enumerate(world.people):
        for rel in world.relations:
            if kind == "unrelated":
                keep = name not in subjects
            elif kind == "same_subject":
                keep = name in subjects and (name, rel) not in forgotten
            else:
                keep = (name, rel) in forgotten
            if keep:
                texts += [world.fact_text(p, rel, t) for t in world.train_templates[p][rel]]
    if not texts:
        raise ZuFastError(f"no {kind} relearning texts for these records")
    rng = random.Random(f"relearn-{kind}-{seed}")
    return rng.sample(texts, max_texts) if len(texts) > max_texts else texts


def _trainable(model: nn.Module, params: str | Sequence[str]) -> dict[str, nn.Parameter]:
    named = dict(model.named_parameters())
    if params == "all":
        return named
    keys = [params] if isinstance(params, str) else list(params)
    chosen = {n: p for n, p in named.items() if any(k in n for k in keys)}
    if not chosen:
        raise ZuFastError(f"no parameter name contains any of {keys}")
    return chosen


def relearn_probe(
    model: nn.Module,
    tok,
    records: Sequence[dict],
    texts: Mapping[str, Sequence[str]],
    *,
    steps: Sequence[int] = (5, 20, 50),
    lr: float = 1e-4,
    batch_size: int = 16,
    params: str | Sequence[str] = "all",
    seed: int = 0,
    eval_batch_size: int = 32,
) -> dict[str, dict[int, dict[str, float]]]:
    """For each named text set: fine-tune (causal-LM loss on every token, AdamW, no weight decay)
    for ``max(steps)`` steps and measure Efficacy / Generalization after each step count in
    ``steps``; the weights are restored, bit for bit, before each set and at the end.

    Returns ``{kind: {k: {"efficacy", "generalization", "loss"}}}``.
    """
    steps = sorted({int(k) for k in steps})
    if not steps or steps[0] <= 0:
        raise ZuFastError(f"relearning steps must be positive, got {steps}")
    if lr <= 0 or batch_size <= 0:
        raise ZuFastError("relearning lr and batch_size must be positive")
    train = _trainable(model, params)
    snapshot = {n: p.detach().to("cpu", copy=True) for n, p in train.items()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    was_training = model.training
    device = model_device(model)
    pad = metrics.pad_id(tok)
    out: dict[str, dict[int, dict[str, float]]] = {}
    try:
        for n, p in model.named_parameters():
            p.requires_grad_(n in train)
        for kind, kind_texts in texts.items():
            if not kind_texts:
                raise ZuFastError(f"relearning set {kind!r} is empty")
            _restore(train, snapshot)
            enc = [ids for ids in tok(list(kind_texts))["input_ids"] if len(ids) >= 2]
            opt = torch.optim.AdamW(list(train.values()), lr=lr, weight_decay=0.0)
            g = torch.Generator().manual_seed(seed)
            order: list[int] = []
            res: dict[int, dict[str, float]] = {}
            model.eval()  # no dropout: the attack is a deterministic function of its data
            for step in range(1, steps[-1] + 1):
                if len(order) < batch_size:
                    order += torch.randperm(len(enc), generator=g).tolist()
                idx, order = order[:batch_size], order[batch_size:]
                batch = [enc[i] for i in idx]
                length = max(len(x) for x in batch)
                ids = torch.full((len(batch), length), pad, dtype=torch.long)  # [B, L]
                attn = torch.zeros_like(ids)  # [B, L]
                for r, x in enumerate(batch):
                    ids[r, : len(x)] = torch.tensor(x)
                    attn[r, : len(x)] = 1
                labels = ids.masked_fill(attn == 0, -100)  # [B, L]
                loss = model(input_ids=ids.to(device), attention_mask=attn.to(device),
                             labels=labels.to(device), use_cache=False).loss
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if step in steps:
                    with torch.no_grad():
                        res[step] = {**_recall_metrics(model, tok, records, batch_size=eval_batch_size),
                                     "loss": float(loss.detach())}
            out[kind] = res
    finally:
        _restore(train, snapshot)
        for n, p in model.named_parameters():
            p.requires_grad_(flags[n])
            p.grad = None
        model.train(was_training)
    return out


def _restore(params: Mapping[str, nn.Parameter], snapshot: Mapping[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(snapshot[n].to(p.device))


# =========================================================================== lens & probe ====

_FINAL_NORMS = ("model.norm", "transformer.ln_f", "gpt_neox.final_layer_norm", "model.final_layernorm",
                "model.decoder.final_layer_norm", "model.language_model.norm")


def final_norm_module(model: nn.Module, name: str | None = None) -> nn.Module:
    """The norm the model applies before its LM head (Llama ``model.norm``, GPT-2 ``transformer.ln_f``,
    GPT-NeoX ``gpt_neox.final_layer_norm``, ...), or the module called ``name``."""
    if name is not None:
        return get_module(model, name)
    for cand in _FINAL_NORMS:
        try:
            return get_module(model, cand)
        except (ZuFastError, AttributeError, KeyError, IndexError):
            continue
    raise ZuFastError("cannot find the final norm of this model for the logit lens: pass final_norm='module.name'")


@torch.no_grad()
def hidden_states_at(
    model: nn.Module,
    tok,
    items: Sequence[tuple[str, str]],
    layer_module_tmp: str,
    *,
    batch_size: int = 32,
) -> dict[str, torch.Tensor]:
    """Output of every decoder layer at the subject's last token and at the prompt's last token.

    ``items``: ``(template with "{}", subject)``. Returns ``{"subject": [L, M, d], "last": [L, M, d]}``
    (fp32, CPU), L = number of decoder layers (found with ``layer_module_tmp``).
    """
    n_layers = layer_count(model, layer_module_tmp)
    names = [layer_module_tmp.format(i) for i in range(n_layers)]
    device = model_device(model)
    pad = metrics.pad_id(tok)
    chunks_s, chunks_l = [], []
    for b in range(0, len(items), batch_size):
        chunk = items[b : b + batch_size]
        ids, pos = subject_spans(tok, [t for t, _ in chunk], [s for _, s in chunk])
        length = max(len(x) for x in ids)
        inp = torch.full((len(ids), length), pad, dtype=torch.long)  # [B, T]
        attn = torch.zeros_like(inp)  # [B, T]
        for r, x in enumerate(ids):
            inp[r, : len(x)] = torch.tensor(x)
            attn[r, : len(x)] = 1
        rows = torch.arange(len(ids))
        p_subj = torch.tensor(pos)
        p_last = torch.tensor([len(x) - 1 for x in ids])
        with Capture(model, outputs=names) as cap:
            model(input_ids=inp.to(device), attention_mask=attn.to(device), use_cache=False)
        hs = torch.stack([cap.outputs[n].float().cpu() for n in names])  # [L, B, T, d]
        chunks_s.append(hs[:, rows, p_subj])  # [L, B, d]
        chunks_l.append(hs[:, rows, p_last])
    if not chunks_s:
        raise ZuFastError("hidden_states_at needs at least one item")
    return {"subject": torch.cat(chunks_s, 1), "last": torch.cat(chunks_l, 1)}


@torch.no_grad()
def lens_probe(
    model: nn.Module,
    tok,
    hidden: Mapping[str, torch.Tensor],
    answers: Sequence[int],
    candidates: Sequence[Sequence[int]] | None = None,
    *,
    final_norm: str | None = None,
) -> dict[str, dict[str, list[float]]]:
    """Logit lens: decode each layer's hidden state ``hidden[pos]`` [L, M, d] through the final norm
    and the LM head; per layer, the median rank of the true answer token ``answers[m]`` (0 = top)
    and, with ``candidates[m]`` (token ids including the answer), the % of items where the answer
    beats every other candidate.

    The last layer's lens equals the model's own logits (the norm is what the model applies).
    """
    norm = final_norm_module(model, final_norm)
    head = model.get_output_embeddings()
    dev = head.weight.device
    ans = torch.tensor(list(answers))  # [M]
    out: dict[str, dict[str, list[float]]] = {}
    for pos, H in hidden.items():
        ranks, acc = [], []
        for layer in range(H.shape[0]):
            logits = head(norm(H[layer].to(dev, head.weight.dtype))).float().cpu()  # [M, V]
            true = logits.gather(1, ans[:, None])  # [M, 1]
            rank = (logits > true).sum(1).float()  # [M]
            ranks.append(float(rank.median()))
            if candidates is not None:
                # the answer beats every other candidate (ties count against it)
                hit = [bool((logits[m, [c for c in cs if c != int(ans[m])]] < logits[m, int(ans[m])]).all())
                       for m, cs in enumerate(candidates)]
                acc.append(100.0 * sum(hit) / max(len(hit), 1))
        out[pos] = {"median_rank": ranks}
        if candidates is not None:
            out[pos]["acc"] = acc
    return out


def _fit_ridge(X: torch.Tensor, y: torch.Tensor, n_classes: int, l2: float):
    """Ridge regression of one-hot labels on standardised features (closed form, float64); predicts
    the argmax. A linear classifier as good as logistic regression for probing, and ~1000× cheaper
    than an iterative fit (the probes run at every layer, position and relation of every edit)."""
    mu, sd = X.mean(0, keepdim=True), X.std(0, keepdim=True).clamp_min(1e-6)
    Xs = torch.cat([((X - mu) / sd).double(), torch.ones(X.shape[0], 1, dtype=torch.float64)], 1)  # [M, d+1]
    Y = torch.nn.functional.one_hot(y, n_classes).double()  # [M, C]
    reg = l2 * X.shape[0] * torch.eye(Xs.shape[1], dtype=torch.float64)
    reg[-1, -1] = 0.0  # the bias is not penalised
    W = torch.linalg.solve(Xs.t() @ Xs + reg, Xs.t() @ Y)  # [d+1, C]

    def predict(Z: torch.Tensor) -> torch.Tensor:
        Zs = torch.cat([((Z - mu) / sd).double(), torch.ones(Z.shape[0], 1, dtype=torch.float64)], 1)
        return (Zs @ W).argmax(1)

    return predict


def linear_probe(
    train_h: torch.Tensor,
    train_y: Sequence[str],
    test_h: torch.Tensor,
    test_y: Sequence[str],
    *,
    l2: float = 1e-2,
    val_fraction: float = 0.2,
    seed: int = 0,
) -> dict[str, list[float]]:
    """Per layer, train a linear probe (ridge regression onto one-hot labels, L2 weight ``l2`` per
    item, on standardised features) on ``train_h`` [L, M, d] → labels and report its accuracy (%)
    on ``test_h`` [L, T, d] (``acc``) and on a held-out ``val_fraction`` of the training items
    (``val``: does the probe work at all on facts the model kept?). Test labels the training set
    never saw count as misses."""
    if train_h.shape[1] != len(train_y) or test_h.shape[1] != len(test_y):
        raise ZuFastError("linear_probe: hidden states and labels differ in length")
    classes = sorted(set(train_y))
    cid = {c: i for i, c in enumerate(classes)}
    y = torch.tensor([cid[c] for c in train_y])
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(train_y), generator=g)
    n_val = int(round(val_fraction * len(train_y)))
    val_idx, fit_idx = perm[:n_val], perm[n_val:]
    ty = torch.tensor([cid.get(c, -1) for c in test_y])
    acc, val = [], []
    for layer in range(train_h.shape[0]):
        X = train_h[layer]
        if n_val:
            pred = _fit_ridge(X[fit_idx], y[fit_idx], len(classes), l2)
            val.append(100.0 * float((pred(X[val_idx]) == y[val_idx]).float().mean()))
        pred = _fit_ridge(X, y, len(classes), l2)
        acc.append(100.0 * float((pred(test_h[layer]) == ty).float().mean()) if len(test_y) else math.nan)
    return {"acc": acc, "val": val}


# =========================================================================== generation ====


def _contains(text: str, answer: str) -> bool:
    return re.search(r"(?<!\w)" + re.escape(answer.strip()) + r"(?!\w)", text, flags=re.IGNORECASE) is not None


@torch.no_grad()
def _generate(model, tok, prompts: Sequence[str], *, max_new_tokens: int, sample: bool, ban_eos: bool,
              temperature: float, batch_size: int) -> list[str]:
    """Continuations (decoded new tokens) of ``prompts``; left-padded batches through HF generate."""
    device = model_device(model)
    pad = metrics.pad_id(tok)
    eos = tok.eos_token_id
    texts = []
    enc = tok(list(prompts))["input_ids"]
    for b in range(0, len(enc), batch_size):
        chunk = enc[b : b + batch_size]
        length = max(len(x) for x in chunk)
        ids = torch.full((len(chunk), length), pad, dtype=torch.long)  # [B, T], left-padded
        attn = torch.zeros_like(ids)
        for r, x in enumerate(chunk):
            ids[r, length - len(x):] = torch.tensor(x)
            attn[r, length - len(x):] = 1
        kw: dict[str, Any] = {"max_new_tokens": max_new_tokens, "pad_token_id": pad, "do_sample": sample}
        if sample:
            kw.update(temperature=temperature, top_k=0, top_p=1.0)
        else:
            kw.update(temperature=None, top_k=None, top_p=None)
        if eos is not None:
            kw["eos_token_id"] = eos
            if ban_eos:
                kw["suppress_tokens"] = [eos]
        out = model.generate(input_ids=ids.to(device), attention_mask=attn.to(device), **kw)
        for row in out[:, length:].cpu():
            texts.append(tok.decode(row.tolist(), skip_special_tokens=True))
    return texts


def generation_probe(
    model: nn.Module,
    tok,
    pairs: Sequence[tuple[str, str]],
    *,
    max_new_tokens: int = 20,
    n_samples: int = 5,
    temperature: float = 1.0,
    seed: int = 0,
    batch_size: int = 32,
    keep_examples: int = 0,
    modes: Sequence[str] = ("greedy", "greedy_no_eos", "sample"),
) -> dict[str, Any]:
    """% of ``(prompt, answer)`` pairs whose continuation (``max_new_tokens`` new tokens) contains the
    answer as a word (case-insensitive): ``greedy``, ``greedy_no_eos`` (EOS suppressed: an edit that
    only puts EOS first is found out), ``sample`` (% of the ``n_samples`` samples per prompt,
    temperature ``temperature``, no top-k/top-p) and ``sample_any`` (% of prompts with ≥ 1 leaking
    sample). ``modes`` picks among greedy / greedy_no_eos / sample. Sampling is seeded and does not
    disturb the global RNG."""
    if not pairs:
        return {}
    prompts = [p for p, _ in pairs]
    answers = [a for _, a in pairs]
    was = model.training
    model.eval()
    res: dict[str, Any] = {}
    try:
        for mode, sample, ban in (("greedy", False, False), ("greedy_no_eos", False, True)):
            if mode not in modes:
                continue
            outs = _generate(model, tok, prompts, max_new_tokens=max_new_tokens, sample=sample, ban_eos=ban,
                             temperature=temperature, batch_size=batch_size)
            hits = [_contains(o, a) for o, a in zip(outs, answers)]
            res[mode] = 100.0 * sum(hits) / len(hits)
            if keep_examples:
                res[mode + "_examples"] = [[p, o] for p, o in zip(prompts[:keep_examples], outs[:keep_examples])]
        if n_samples > 0 and "sample" in modes:
            devices = [model_device(model)] if model_device(model).type == "cuda" else []
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(seed)
                outs = _generate(model, tok, [p for p in prompts for _ in range(n_samples)],
                                 max_new_tokens=max_new_tokens, sample=True, ban_eos=False,
                                 temperature=temperature, batch_size=batch_size)
            hits = [_contains(o, answers[i // n_samples]) for i, o in enumerate(outs)]
            res["sample"] = 100.0 * sum(hits) / len(hits)
            per_prompt = [any(hits[i * n_samples : (i + 1) * n_samples]) for i in range(len(prompts))]
            res["sample_any"] = 100.0 * sum(per_prompt) / len(per_prompt)
    finally:
        model.train(was)
    return res


# =========================================================================== multi-hop ====


def multihop_probe(model: nn.Module, tok, pairs: Sequence[tuple[str, str]], *, batch_size: int = 32) -> float:
    """Teacher-forced recall (%) of two-hop ``(prompt, answer)`` pairs (as Efficacy); NaN if none."""
    return metrics.recall(model, tok, pairs, batch_size=batch_size)


# =========================================================================== the driver ====


def _answer_token(tok, prompt: str, answer: str) -> int:
    return metrics.encode_continuations(tok, [(prompt, answer)])[0][1][0]


def run_probes(
    model: nn.Module,
    tok,
    records: Sequence[dict],
    probes: Sequence[str],
    *,
    world,
    layer_module_tmp: str = "model.layers.{}",
    heldout_texts: Sequence[str] | None = None,
    settings: ProbeSettings | None = None,
) -> dict[str, Any]:
    """Run ``probes`` on the model as it is (after an edit, or unedited for the reference row) for
    the synthetic ``world``'s forget ``records``. Leaves the weights exactly as they were.

    Returns ``{"summary": {flat key: number}, "details": {...}}``; summary keys:
    ``quant_<scheme>_{eff,gen,spe,ppl}``, ``relearn_<kind>_{eff,gen}_<k>``,
    ``lens_<pos>`` / ``probe_<pos>`` (max over layers of the % of forgotten answers decoded),
    ``probe_<pos>_val`` (the probe on held-out retained facts), ``gen_greedy``,
    ``gen_greedy_no_eos``, ``gen_sample``, ``gen_sample_any`` (and ``gen_*_control``: the same prompts
    about a stranger, i.e. the chance of naming the answer without knowing it), ``multihop`` (+
    ``multihop_n``, ``multihop_base_rate``), ``subject_other`` (always: recall of the forgotten subjects'
    other facts in their held-out phrasings, the Subject-other metric), ``other_facts`` (with ``relearn``: the
    same facts in the phrasing the same-subject relearning set states).
    """
    s = settings or ProbeSettings()
    probes = parse_probes(probes)
    if not records:
        raise ZuFastError("run_probes needs at least one forget record")
    summary: dict[str, float] = {}
    details: dict[str, Any] = {"settings": s.to_dict()}
    bs = s.batch_size
    clock = _Laps(probes)
    # Subject-other beside every probe: does the edit take the person with the fact? (held-out phrasings)
    other = [(f["text"], f["target"]) for r in records for f in world.other_facts(r, "heldout")]
    summary["subject_other"] = metrics.recall(model, tok, other, batch_size=bs) if other else math.nan

    clock.lap()
    if "quant" in probes:
        q = quant_probe(model, tok, records, s.quant_schemes, heldout_texts=heldout_texts,
                        group_size=s.quant_group_size, batch_size=bs)
        details["quant"] = q
        for scheme, r in q.items():
            for key, short in (("efficacy", "eff"), ("generalization", "gen"), ("specificity", "spe"),
                               ("perplexity", "ppl")):
                if key in r:
                    summary[f"quant_{scheme}_{short}"] = r[key]

    clock.lap()
    if "relearn" in probes:
        texts = {k: relearn_texts(world, records, k, max_texts=s.relearn_max_texts, seed=s.seed)
                 for k in s.relearn_kinds}
        rl = relearn_probe(model, tok, records, texts, steps=s.relearn_steps, lr=s.relearn_lr,
                           batch_size=s.relearn_batch_size, seed=s.seed, eval_batch_size=bs)
        details["relearn"] = {k: {str(step): v for step, v in r.items()} for k, r in rl.items()}
        details["relearn_n_texts"] = {k: len(v) for k, v in texts.items()}
        # what the same-subject set states: does the edit also take the subjects' other facts?
        summary["other_facts"] = metrics.recall(model, tok, _other_fact_pairs(world, records), batch_size=bs)
        for kind, r in rl.items():
            for step, v in r.items():
                summary[f"relearn_{kind}_eff_{step}"] = v["efficacy"]
                summary[f"relearn_{kind}_gen_{step}"] = v["generalization"]

    clock.lap()
    if "lens" in probes:
        details["lens"], lens_sum = _lens_and_probe(model, tok, records, world, layer_module_tmp, s)
        summary.update(lens_sum)

    clock.lap()
    if "generate" in probes:
        pairs, control = _generation_pairs(records, world)
        kw = {"max_new_tokens": s.gen_max_new_tokens, "n_samples": s.gen_samples, "temperature": s.gen_temperature,
              "seed": s.seed, "batch_size": bs}
        g = generation_probe(model, tok, pairs, keep_examples=3, **kw)
        details["generate"] = g
        for k in ("greedy", "greedy_no_eos", "sample", "sample_any"):
            if k in g:
                summary[f"gen_{k}"] = g[k]
        if control:
            # the chance of naming the answer without knowing it: the same prompts about a stranger
            gc = generation_probe(model, tok, control, modes=("greedy_no_eos", "sample"), **kw)
            details["generate_control"] = gc
            for k in ("greedy_no_eos", "sample", "sample_any"):
                if k in gc:
                    summary[f"gen_{k}_control"] = gc[k]

    clock.lap()
    if "multihop" in probes:
        pairs = [p for r in records for p in world.two_hop_pairs(r)]
        rates = [world.two_hop_base_rate(r) for r in records for _ in world.two_hop_pairs(r)]
        summary["multihop_n"] = float(len(pairs))
        summary["multihop"] = multihop_probe(model, tok, pairs, batch_size=bs) if pairs else math.nan
        summary["multihop_base_rate"] = 100.0 * statistics.fmean(rates) if rates else math.nan
        if not world.config.compose:
            details["multihop_note"] = ("this world has no composition: build the small model on "
                                        "WorldConfig(compose=True) (zu-fast eval --tinylm "
                                        "'{\"world\": {\"compose\": true}}')")
    clock.lap()
    details["seconds"] = clock.seconds
    return {"summary": summary, "details": details}


class _Laps:
    """Wall seconds per probe: each ``lap()`` closes the running probe's interval."""

    def __init__(self, names: Sequence[str]) -> None:
        self.order = [n for n in PROBES]
        self.names = set(names)
        self.seconds: dict[str, float] = {}
        self._i = -1
        self._t = time.perf_counter()

    def lap(self) -> None:
        now = time.perf_counter()
        if 0 <= self._i < len(self.order) and self.order[self._i] in self.names:
            self.seconds[self.order[self._i]] = round(now - self._t, 2)
        self._i += 1
        self._t = now


def _other_fact_pairs(world, records) -> list[tuple[str, str]]:
    """The forgotten subjects' facts of every other relation, in their first trained phrasing."""
    forgotten = {(r["subject"], r["relation"]) for r in records}
    out = []
    for r in records:
        p = world.people.index(r["subject"])
        for rel in world.relations:
            if (r["subject"], rel) not in forgotten:
                t = world.templates(rel)[world.train_templates[p][rel][0]]
                out.append((t.format(r["subject"]), world.facts[p][rel]))
    return out


def _generation_pairs(records, world) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """Forget prompts and paraphrases with their answers, and the same prompts with the subject
    replaced by one of the world's strangers (people it says nothing about), same answers."""
    pairs, control = [], []
    strangers = list(getattr(world, "strangers", []) or [])
    for i, r in enumerate(records):
        answer = metrics.target_string(r["target_true"])
        prompts = [metrics.forget_prompt(r)] + list(r.get("paraphrase_prompts", []))
        pairs += [(p, answer) for p in prompts]
        if strangers:
            other = strangers[i % len(strangers)]
            control += [(p.replace(r["subject"], other), answer) for p in prompts]
    return pairs, control


def _lens_and_probe(model, tok, records, world, layer_module_tmp, s: ProbeSettings) -> tuple[dict, dict]:
    """Logit lens and linear probe for the world's forget records (see :func:`run_probes`)."""
    subjects = {r["subject"] for r in records}
    # Test items: the forget prompts. Probe training items: every retained person (not forgotten)
    # once per relation, in one of the forget records' templates of that relation (seeded), labelled
    # with that person's object. One item per person, so the probe's validation split (by item) never
    # sees a validation person in training: it measures generalisation across people, as the test does.
    test = [(r["prompt"], r["subject"], r["relation"], metrics.target_string(r["target_true"])) for r in records]
    rng = random.Random(f"probe-{s.seed}")
    train = []
    for rel in sorted({r["relation"] for r in records}):
        tpls = sorted({r["prompt"] for r in records if r["relation"] == rel})
        train += [(rng.choice(tpls), name, rel, world.facts[p][rel]) for p, name in enumerate(world.people)
                  if name not in subjects]
    h_test = hidden_states_at(model, tok, [(t, sj) for t, sj, _, _ in test], layer_module_tmp, batch_size=s.batch_size)
    h_train = hidden_states_at(model, tok, [(t, sj) for t, sj, _, _ in train], layer_module_tmp,
                               batch_size=s.batch_size)
    answers, cands = [], []
    for tpl, sj, rel, a in test:
        prompt = tpl.format(sj)
        answers.append(_answer_token(tok, prompt, a))
        cands.append(sorted({_answer_token(tok, prompt, o) for o in world.objects(rel)}))
    positions = [p for p in s.lens_positions if p in ("subject", "last")]
    lens = lens_probe(model, tok, {p: h_test[p] for p in positions}, answers, cands)
    details: dict[str, Any] = {"lens": lens, "probe": {}}
    summary: dict[str, float] = {}
    for pos in positions:
        summary[f"lens_{pos}"] = max(lens[pos]["acc"])
        summary[f"lens_{pos}_rank"] = min(lens[pos]["median_rank"])
        # one probe per relation (its own classes); accuracies pooled over the forget records
        n_layers = h_test[pos].shape[0]
        hits = torch.zeros(n_layers)
        val_sum, val_w = torch.zeros(n_layers), 0
        for rel in sorted({r for _, _, r, _ in test}):
            tr = [i for i, x in enumerate(train) if x[2] == rel]
            te = [i for i, x in enumerate(test) if x[2] == rel]
            res = linear_probe(h_train[pos][:, tr], [train[i][3] for i in tr], h_test[pos][:, te],
                               [test[i][3] for i in te], l2=s.probe_l2, val_fraction=s.probe_val_fraction,
                               seed=s.seed)
            hits += torch.tensor(res["acc"]) * len(te) / 100.0
            if res["val"]:
                val_sum += torch.tensor(res["val"]) * len(tr)
                val_w += len(tr)
        acc = (100.0 * hits / len(test)).tolist()
        val = (val_sum / max(val_w, 1)).tolist() if val_w else []
        details["probe"][pos] = {"acc": acc, "val": val}
        summary[f"probe_{pos}"] = max(acc)
        if val:
            summary[f"probe_{pos}_val"] = max(val)
    return details, summary


# =========================================================================== the table ====

# (summary key, column label, format digits); the robustness table's columns, in order
QUANT_COLUMNS = [("efficacy", "Eff", 1), ("generalization", "Gen", 1), ("quant_int8_eff", "int8 Eff", 1),
                 ("quant_int8_gen", "int8 Gen", 1), ("quant_int4_eff", "int4 Eff", 1),
                 ("quant_int4_gen", "int4 Gen", 1), ("quant_int4_spe", "int4 Spe", 1)]
ATTACK_COLUMNS = [("lens_subject", "lens@subj", 1), ("lens_last", "lens@last", 1),
                  ("probe_subject", "probe@subj", 1), ("probe_last", "probe@last", 1),
                  ("gen_greedy", "greedy", 1), ("gen_greedy_no_eos", "greedy no-EOS", 1),
                  ("gen_greedy_no_eos_control", "(stranger)", 1), ("gen_sample", "sampled", 1),
                  ("gen_sample_any", "any of 5", 1), ("gen_sample_any_control", "(stranger)", 1),
                  ("multihop", "2-hop", 1), ("multihop_base_rate", "(base rate)", 1)]


RECOVERY_MIN_GAP = 30.0  # Efficacy points an edit must remove before its recovery % is reported


def _relearn_columns(keys: set[str]) -> list[tuple[str, str, int]]:
    cols = []
    for kind in RELEARN_KINDS:
        steps = sorted({int(k.rsplit("_", 1)[1]) for k in keys if k.startswith(f"relearn_{kind}_eff_")
                        and not k.endswith(("_std", "_count"))})
        cols += [(f"relearn_{kind}_eff_{k}", f"{kind.replace('_', '-')} Eff@{k}", 1) for k in steps]
    return cols


def _aggregate(rows: Sequence[dict]) -> list[dict[str, Any]]:
    """Mean and sample std over seeds per (method, n) of every summary number, plus recovery %.

    Recovery of an attack = (recall after the attack − recall after the edit) / (recall of the
    unedited model − recall after the edit), in %, per seed against the same seed's base row;
    left out where the edit removed less than ``RECOVERY_MIN_GAP`` points (too little forgotten for
    the ratio to mean anything: one record of ten moves it by 100 points).
    """
    base = {(r["n"], r["seed"]): r for r in rows if r.get("method") == "base" and "probes" in r}
    groups: dict[tuple[str, int], list[dict]] = {}
    for r in rows:
        if "probes" in r and "error" not in r:
            groups.setdefault((r["method"], r["n"]), []).append(r)
    out = []
    for (method, n), rs in groups.items():
        vals: dict[str, list[float]] = {}
        for r in rs:
            flat = {"efficacy": r["efficacy"], "generalization": r["generalization"], **r["probes"]["summary"]}
            b = base.get((n, r["seed"]))
            if b is not None:
                bflat = {"efficacy": b["efficacy"], **b["probes"]["summary"]}
                gap = bflat["efficacy"] - flat["efficacy"]
                for k, v in list(flat.items()):
                    if k.endswith("_eff") or "_eff_" in k:
                        if gap >= RECOVERY_MIN_GAP:
                            flat["recovered_" + k] = 100.0 * (v - flat["efficacy"]) / gap
            for k, v in flat.items():
                if isinstance(v, (int, float)) and not math.isnan(float(v)):
                    vals.setdefault(k, []).append(float(v))
        agg: dict[str, Any] = {"method": method, "n": n, "seeds": [r["seed"] for r in rs]}
        for k, v in vals.items():
            agg[k] = statistics.fmean(v)
            agg[k + "_std"] = statistics.stdev(v) if len(v) > 1 else 0.0
            agg[k + "_count"] = len(v)
        out.append(agg)
    return out


def _cell(a: Mapping[str, Any], key: str, digits: int, with_std: bool) -> str:
    if key not in a:
        return "–"
    s = f"{a[key]:.{digits}f}"
    if with_std and a.get(key + "_count", 0) > 1:  # a single seed has no spread to show
        s += f" ± {a[key + '_std']:.{digits}f}"
    return s


def _table(aggs: Sequence[Mapping[str, Any]], columns: Sequence[tuple[str, str, int]], order: Sequence[str],
           with_std: bool) -> str:
    lines = ["| n | method | " + " | ".join(c[1] for c in columns) + " |",
             "|---:|---|" + "---:|" * len(columns)]
    rank = {m: i for i, m in enumerate(order)}
    for a in sorted(aggs, key=lambda a: (a["n"], rank.get(a["method"], 99))):
        lines.append(f"| {a['n']} | {a['method']} | " + " | ".join(_cell(a, k, d, with_std) for k, _, d in columns)
                     + " |")
    return "\n".join(lines)


def robustness_tables(rows: Sequence[dict], order: Sequence[str]) -> tuple[str, list[dict[str, Any]]]:
    """Markdown tables (quantization; relearning; lens/probe/generation/multi-hop; recovery) of the
    harness's result rows that carry probe results, and their aggregates."""
    aggs = _aggregate(rows)
    if not aggs:
        return "", aggs
    keys = set().union(*(a.keys() for a in aggs))
    with_std = any(len(a["seeds"]) > 1 for a in aggs)
    parts = []
    qcols = [c for c in QUANT_COLUMNS if c[0] in keys]
    if any(c[0].startswith("quant_") for c in qcols):
        parts += ["### Quantization (RTN, groups of 128; Eff/Gen/Spe %)", "", _table(aggs, qcols, order, with_std), ""]
    rcols = _relearn_columns(keys)
    if rcols:
        other = [(k, label, 1) for k, label in (("subject_other", "Subj-other (held-out)"),
                                                ("other_facts", "subjects' other facts")) if k in keys]
        parts += ["### Relearning (forget-prompt Efficacy % after k fine-tuning steps)", "",
                  _table(aggs, [("efficacy", "Eff", 1)] + other + rcols, order, with_std), ""]
    acols = [c for c in ATTACK_COLUMNS if c[0] in keys]
    if acols:
        parts += ["### Hidden states, generation, multi-hop (% of forgotten answers found)", "",
                  _table(aggs, acols, order, with_std), ""]
    rec = [(k, k.replace("recovered_", "").replace("quant_", "").replace("relearn_", "")
            .replace("_eff", "").replace("_", " "), 0) for k in sorted(keys)
           if k.startswith("recovered_") and not k.endswith(("_std", "_count"))]
    rec = sorted(rec, key=lambda c: (not c[0].startswith("recovered_quant"), len(c[0]), c[0]))
    if rec:
        parts += [f"### Recovered % ((attacked − edited) / (base − edited) Efficacy; seeds where the edit removed "
                  f"≥ {RECOVERY_MIN_GAP:.0f} points)",
                  "", _table([a for a in aggs if a["method"] != "base" and any(k.startswith("recovered_") for k in a)],
                         rec, order, False), ""]
    return "\n".join(parts), aggs


def plot_robustness(aggs: Sequence[Mapping[str, Any]], order: Sequence[str], path: Path) -> Path | None:
    """One row of panels per n: Efficacy after quantization, relearning curves (two text sets), and
    the % of forgotten answers found by lens / probe / generation / multi-hop."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    ns = sorted({a["n"] for a in aggs})
    methods = [m for m in order if any(a["method"] == m for a in aggs)]
    colour = {m: f"C{i}" for i, m in enumerate(methods)}
    fig, axes = plt.subplots(len(ns), 4, figsize=(20, 3.9 * len(ns)), squeeze=False)
    for row, n in zip(axes, ns):
        by = {a["method"]: a for a in aggs if a["n"] == n}
        # quantization
        ax = row[0]
        bars = [("efficacy", "edited"), ("quant_int8_eff", "int8"), ("quant_int4_eff", "int4")]
        w = 0.8 / len(bars)
        for j, (k, label) in enumerate(bars):
            xs = [i + (j - 1) * w for i, m in enumerate(methods) if k in by.get(m, {})]
            ys = [by[m][k] for m in methods if k in by.get(m, {})]
            es = [by[m][k + "_std"] for m in methods if k in by.get(m, {})]
            ax.bar(xs, ys, w, yerr=es, label=label, capsize=2)
        ax.set_xticks(range(len(methods)))
        ax.set_xticklabels(methods, rotation=45, ha="right")
        ax.set_title(f"n={n}: Efficacy % after quantization")
        ax.legend(fontsize=7)
        # relearning
        for ax, kind in zip(row[1:3], ("unrelated", "same_subject")):
            for m in methods:
                a = by.get(m, {})
                steps = sorted(int(k.rsplit("_", 1)[1]) for k in a if k.startswith(f"relearn_{kind}_eff_")
                               and not k.endswith(("_std", "_count")))
                if not steps:
                    continue
                xs = [0] + steps
                ys = [a["efficacy"]] + [a[f"relearn_{kind}_eff_{k}"] for k in steps]
                es = [a["efficacy_std"]] + [a[f"relearn_{kind}_eff_{k}_std"] for k in steps]
                ax.errorbar(xs, ys, yerr=es, marker="o", capsize=2, label=m, color=colour[m])
            ax.set_xlabel("fine-tuning steps")
            ax.set_title(f"n={n}: Efficacy % while relearning ({kind.replace('_', ' ')})")
            ax.set_ylim(-5, 105)
        if row[1].get_legend_handles_labels()[0]:
            row[1].legend(fontsize=7)
        # hidden states / generation / multi-hop
        ax = row[3]
        keys = [("probe_subject", "probe@subj"), ("lens_last", "lens@last"), ("gen_greedy_no_eos", "greedy no-EOS"),
                ("gen_sample_any", "sampled, any of 5"), ("multihop", "2-hop")]
        keys = [(k, lab) for k, lab in keys if any(k in by.get(m, {}) for m in methods)]
        w = 0.8 / max(len(keys), 1)
        for j, (k, label) in enumerate(keys):
            xs = [i + (j - (len(keys) - 1) / 2) * w for i, m in enumerate(methods) if k in by.get(m, {})]
            ys = [by[m][k] for m in methods if k in by.get(m, {})]
            ax.bar(xs, ys, w, label=label)
        ax.set_xticks(range(len(methods)))
        ax.set_xticklabels(methods, rotation=45, ha="right")
        ax.set_title(f"n={n}: % of forgotten answers found")
        if keys:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_robustness(out: Path, rows: Sequence[dict], order: Sequence[str], *, header: str = "",
                     settings: ProbeSettings | None = None, plot: bool = True) -> str:
    """Write ``robustness.md`` / ``robustness.json`` (and ``robustness.png`` when ``plot``) under
    ``out`` from the harness's result rows; returns the markdown tables."""
    out = Path(out)
    tables, aggs = robustness_tables(rows, order)
    s = settings or ProbeSettings()
    intro = [
        "# zu-fast eval: does the knowledge stay gone? (robustness probes)", "",
        header,
        "Each row: the model after the method's edit (base: unedited), mean ± std over seeds. "
        f"Quantization: round-to-nearest, groups of {s.quant_group_size} (int8 symmetric, int4 with zero point), "
        "every linear layer but the LM head. Relearning: AdamW on all parameters, "
        f"lr {s.relearn_lr:g}, batch {s.relearn_batch_size}; unrelated = facts of people not forgotten, "
        "same-subject = the forgotten people's other facts. lens / probe: max over layers of the % of "
        "forgotten answers the logit lens ranks first among the relation's candidates / a linear probe "
        "trained on the retained people decodes, at the subject's last token (subj) or the prompt's last "
        f"(last). Generation: {s.gen_max_new_tokens} new tokens of forget prompts and paraphrases; "
        f"sampled at T={s.gen_temperature:g}, {s.gen_samples} samples per prompt. 2-hop: teacher-forced "
        "recall of held-out two-hop questions whose first hop is forgotten.", "",
    ]
    (out / "robustness.md").write_text("\n".join(intro) + "\n" + tables)
    (out / "robustness.json").write_text(json.dumps({"settings": s.to_dict(), "aggregates": aggs}, indent=2,
                                                    default=str))
    if plot and aggs:
        plot_robustness(aggs, order, out / "robustness.png")
    return tables
