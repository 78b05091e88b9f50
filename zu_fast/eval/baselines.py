"""Baselines in the same harness as ZeroUnlearn: GA, NPO, FT (fine-tuning) and MEMIT/AlphaEdit-style edits.

Every baseline has the signature ``fn(model, tok, requests, cfg, stats, *, hparams=None)``, edits the
model in place and returns a :class:`BaselineEdit` whose ``restore()`` puts back, bit for bit, every
parameter it touched (copies taken before the first change).

Fine-tuning baselines (GA, NPO, FT) train the MLP weights (gate/up/down projections: the parent
module of ``cfg.locate.rewrite_module``) of the SAME layers ZeroUnlearn edits; everything else is
frozen. Data: each request's prompt (subject filled in) followed by an answer, tokenised exactly as
the metrics score it (``metrics.encode_continuations``). Hyper-parameters (:class:`BaselineHParams`)
follow the unlearning literature (TOFU / NPO: AdamW, lr 1e-5 for 7B models, 10 epochs, NPO β = 0.1)
transferred to the small model by keeping the ratio of fine-tuning to pre-training learning rate:
7B models pre-train at ~3e-4 and unlearn at 1e-5 (1/30); the small model pre-trains at 3e-3, so it
unlearns at 1e-4. They are fixed a priori and were not tuned on the benchmark.

- GA  (gradient ascent): maximise the NLL of the true answer.
- NPO (negative preference optimisation, Zhang et al. 2024): minimise
  −(2/β) · mean log σ(−β (log π_θ(a|x) − log π_ref(a|x))) with sequence log-probabilities; π_ref is
  the model before unlearning (frozen: its log-probabilities are computed once, before training).
- FT  (fine-tune toward the neutral target): minimise the NLL of ``cfg.neutral_target`` (EOS by default).

Editing baselines use ZeroUnlearn's own targets z (batched optimisation toward the neutral target at
the z layer, the same context templates), keys read at the subject's last token, the per-layer
residual spreading r = (z − h)/(m − j + 1), and the covariance C from the SAME statistics cache:
- MEMIT-style: ΔW = R Kᵀ (λ C + K Kᵀ)⁻¹, λ = cfg.closed_form.corpus_weight_k (15000; MEMIT's value).
- AlphaEdit: ΔW = R Kᵀ P (K Kᵀ P + λ₂ I)⁻¹ with P the projector onto C's null space (eigenvalue
  ≤ ``null_threshold``; by default the same null space as ZeroUnlearn-GD: cfg.gd.null_energy if set,
  else cfg.gd.null_threshold) and λ₂ = 10 (AlphaEdit's L2 for Llama3-8B);
  ΔW lies in the null space of C by construction (ΔW P = ΔW), so it leaves generic keys untouched.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from ..config import UnlearnConfig
from ..edit import apply_additive_
from ..errors import ZuFastError
from ..metrics import encode_continuations
from ..model import edit_targets, get_module
from ..requests import UnlearnRequest, normalize_requests


@dataclass
class BaselineHParams:
    """Hyper-parameters of the baselines (fixed a priori; see the module docstring)."""

    lr: float = 1e-4  # AdamW learning rate for GA / NPO / FT
    epochs: int = 10  # passes over the forget set
    batch_size: int = 32
    weight_decay: float = 0.0
    npo_beta: float = 0.1
    train_params: str = "mlp"  # "mlp": gate/up/down of the edited layers; "down": only the edited module
    grad_clip: float = 1.0
    alphaedit_l2: float = 10.0
    null_threshold: float | None = None  # AlphaEdit's null-space threshold; None: GD's rule from the config
    seed: int = 0


@dataclass
class BaselineEdit:
    """What a baseline changed: backups of the touched parameters (restore bit for bit) and a report."""

    method: str
    backups: dict[str, torch.Tensor]
    params: dict[str, torch.nn.Parameter]
    report: dict[str, Any] = field(default_factory=dict)

    def restore(self) -> None:
        """Put the original parameters back, bit for bit."""
        with torch.no_grad():
            for name, p in self.params.items():
                p.copy_(self.backups[name])


def _backup(method: str, model: torch.nn.Module, names: Sequence[str]) -> BaselineEdit:
    params = dict(model.named_parameters())
    chosen = {n: params[n] for n in names}
    return BaselineEdit(method, {n: p.detach().clone() for n, p in chosen.items()}, chosen)


# --------------------------------------------------------------------------- fine-tuning ------


def _trainable_names(model: torch.nn.Module, cfg: UnlearnConfig, which: str) -> list[str]:
    """Parameter names of the edited layers' MLP (or only the edited module)."""
    names = []
    for layer in cfg.layers:
        mod_name = cfg.locate.rewrite_module.format(layer)
        if which == "down":
            prefix = mod_name
        elif which == "mlp":
            prefix = mod_name.rsplit(".", 1)[0]  # the MLP block that holds the edited module
        else:
            raise ZuFastError(f"train_params={which!r}; choose 'mlp' or 'down'")
        get_module(model, prefix)  # clear error if absent
        names += [n for n, _ in model.named_parameters() if n.startswith(prefix + ".")]
    if not names:
        raise ZuFastError("no trainable parameters found for the baseline")
    return names


def _pad_id(tok) -> int:
    # any id works: padded positions are masked out of attention and of the loss
    for t in (tok.pad_token_id, tok.eos_token_id):
        if t is not None:
            return int(t)
    return 0


def _batch(seqs: Sequence[tuple[list[int], list[int]]], pad_id: int, device) -> tuple[torch.Tensor, ...]:
    """Right-padded prompt+answer[:-1] inputs and labels at the answer positions."""
    inputs = [p + a[:-1] for p, a in seqs]
    length = max(len(x) for x in inputs)
    ids = torch.full((len(seqs), length), pad_id, dtype=torch.long)  # [B, L]
    attn = torch.zeros_like(ids)  # [B, L]
    labels = torch.full_like(ids, -100)  # [B, L]
    for r, ((p, a), x) in enumerate(zip(seqs, inputs)):
        ids[r, : len(x)] = torch.tensor(x)
        attn[r, : len(x)] = 1
        labels[r, len(p) - 1 : len(p) - 1 + len(a)] = torch.tensor(a)
    return ids.to(device), attn.to(device), labels.to(device)


def _seq_logprob(model, ids, attn, labels) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of answer-token log-probabilities per sequence [B] and answer lengths [B]."""
    logits = model(input_ids=ids, attention_mask=attn, use_cache=False).logits  # [B, L, V]
    mask = labels != -100  # [B, L]
    lp = torch.log_softmax(logits.float(), dim=-1)  # [B, L, V]
    tok_lp = lp.gather(-1, labels.clamp_min(0)[..., None])[..., 0] * mask  # [B, L]
    return tok_lp.sum(1), mask.sum(1)


def _finetune(method: str, model, tok, requests, cfg: UnlearnConfig, hp: BaselineHParams) -> BaselineEdit:
    reqs = normalize_requests(requests)
    if method == "ft":
        pairs = [(r.text, cfg.neutral_target) for r in reqs]
    else:
        pairs = [(r.text, r.target_true) for r in reqs]
    seqs = encode_continuations(tok, pairs)
    pad = _pad_id(tok)
    device = model.get_input_embeddings().weight.device
    names = _trainable_names(model, cfg, hp.train_params)
    edit = _backup(method, model, names)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    was_training = model.training
    t0 = time.perf_counter()
    try:
        for n, p in model.named_parameters():
            p.requires_grad_(n in edit.params)
        model.eval()  # no dropout: the update is the same function of the data for every method
        ref_lp = None
        if method == "npo":  # π_ref is frozen: its sequence log-probs are constants, computed once
            with torch.no_grad():
                ref_lp = torch.cat([_seq_logprob(model, *_batch(seqs[i : i + hp.batch_size], pad, device))[0]
                                    for i in range(0, len(seqs), hp.batch_size)])
        opt = torch.optim.AdamW(list(edit.params.values()), lr=hp.lr, weight_decay=hp.weight_decay)
        g = torch.Generator().manual_seed(hp.seed)
        losses = []
        for _ in range(hp.epochs):
            order = torch.randperm(len(seqs), generator=g).tolist()
            for s in range(0, len(order), hp.batch_size):
                idx = order[s : s + hp.batch_size]
                lp, n_tok = _seq_logprob(model, *_batch([seqs[i] for i in idx], pad, device))
                if method == "ga":  # ascend the mean per-token NLL of the true answer
                    loss = (lp / n_tok).mean()
                elif method == "ft":  # descend the NLL of the neutral target
                    loss = -(lp / n_tok).mean()
                else:  # npo
                    ratio = lp - ref_lp[idx].to(lp.device)
                    loss = -(2.0 / hp.npo_beta) * torch.nn.functional.logsigmoid(-hp.npo_beta * ratio).mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if hp.grad_clip:
                    torch.nn.utils.clip_grad_norm_(list(edit.params.values()), hp.grad_clip)
                opt.step()
                losses.append(float(loss.detach()))
    except BaseException:
        edit.restore()
        raise
    finally:
        for n, p in model.named_parameters():
            p.requires_grad_(flags[n])
            p.grad = None
        model.train(was_training)
    edit.report = {"seconds": time.perf_counter() - t0, "steps": len(losses),
                   "loss_first": losses[0] if losses else float("nan"),
                   "loss_last": losses[-1] if losses else float("nan"), "hparams": asdict(hp)}
    return edit


def gradient_ascent(model, tok, requests, cfg: UnlearnConfig, stats=None, *,
                    hparams: BaselineHParams | None = None) -> BaselineEdit:
    """GA: maximise the true answer's NLL on the forget prompts (edited layers' MLP weights)."""
    return _finetune("ga", model, tok, requests, cfg, hparams or BaselineHParams())


def npo(model, tok, requests, cfg: UnlearnConfig, stats=None, *,
        hparams: BaselineHParams | None = None) -> BaselineEdit:
    """NPO with β = hparams.npo_beta against the frozen pre-unlearning model."""
    return _finetune("npo", model, tok, requests, cfg, hparams or BaselineHParams())


def finetune_neutral(model, tok, requests, cfg: UnlearnConfig, stats=None, *,
                     hparams: BaselineHParams | None = None) -> BaselineEdit:
    """FT: maximise the likelihood of the neutral target after the forget prompts."""
    return _finetune("ft", model, tok, requests, cfg, hparams or BaselineHParams())


# --------------------------------------------------------------------------- key-value edits ------


def _kv_edit(method: str, model, tok, requests, cfg: UnlearnConfig, stats, hp: BaselineHParams) -> BaselineEdit:
    from ..method.gd import null_basis, null_basis_for
    from ..method.keys import read_at_subject
    from ..method.targets import optimize_deltas
    from ..method.templates import context_templates
    from ..model import continuation_ids

    if stats is None:
        raise ZuFastError(f"{method} needs the corpus statistics (stats=zu_fast.collect_stats(...))")
    reqs: list[UnlearnRequest] = normalize_requests(requests)
    targets = edit_targets(model, cfg.layers, cfg.locate)
    edit = _backup(method, model, [n for t in targets for n, p in model.named_parameters()
                                   if p is t.module.weight])
    t0 = time.perf_counter()
    rows = {}
    try:
        templates = context_templates(model, tok, cfg)
        readings = read_at_subject(model, tok, reqs, cfg, templates, targets)
        neutral = continuation_ids(tok, cfg.neutral_target)
        z = optimize_deltas(model, tok, reqs, cfg, templates, cfg.z_layer, [neutral] * len(reqs),
                            desc=f"{method} targets").target  # [N, d]
        m = len(targets)
        for j, t in enumerate(targets):
            if j > 0:  # keys and z-layer outputs after the earlier layers were edited
                readings = read_at_subject(model, tok, reqs, cfg, templates, targets[j:])
            K = readings.keys[t.layer].t().to(t.device, torch.float64)  # [d_in, N]
            R = ((z - readings.z_out.to(z.device)) / (m - j)).t().to(t.device, torch.float64)  # [d, N]
            st = stats[t.layer]
            C = st.second_moment(torch.float64).to(t.device)  # [d_in, d_in]
            KKt = K @ K.t()  # [d_in, d_in]
            if method == "memit":
                A = cfg.closed_form.corpus_weight_k * C + KKt  # SPD  [d_in, d_in]
                X = torch.linalg.solve(A, K)  # [d_in, N]
                dW = R @ X.t()  # R Kᵀ A⁻¹  [d, d_in]
            else:
                if hp.null_threshold is not None:
                    nb, _ = null_basis(st, hp.null_threshold, device=t.device, dtype=torch.float64)
                else:  # the same null space as ZeroUnlearn-GD (gd_null_energy if set, else the threshold)
                    nb, _ = null_basis_for(st, cfg, device=t.device, dtype=torch.float64)
                P = nb.dense()  # [d_in, d_in]
                A = P @ KKt + hp.alphaedit_l2 * torch.eye(K.shape[0], dtype=torch.float64, device=t.device)
                X = torch.linalg.solve(A, P @ K @ R.t())  # [d_in, d]
                dW = X.t()  # [d, d_in]
                rows[f"null_rank_{t.layer}"] = nb.null_rank
            apply_additive_(t.weight, dW.float())
            rows[f"dW_norm_{t.layer}"] = float(dW.norm())
    except BaseException:
        edit.restore()
        raise
    edit.report = {"seconds": time.perf_counter() - t0, **rows, "hparams": asdict(hp)}
    return edit


def memit(model, tok, requests, cfg: UnlearnConfig, stats=None, *,
          hparams: BaselineHParams | None = None) -> BaselineEdit:
    """MEMIT-style least-squares key→value edit toward zu_fast's neutral targets z."""
    return _kv_edit("memit", model, tok, requests, cfg, stats, hparams or BaselineHParams())


def alphaedit(model, tok, requests, cfg: UnlearnConfig, stats=None, *,
              hparams: BaselineHParams | None = None) -> BaselineEdit:
    """AlphaEdit: the MEMIT-style edit projected onto the null space of the corpus keys."""
    return _kv_edit("alphaedit", model, tok, requests, cfg, stats, hparams or BaselineHParams())


METHODS: Mapping[str, Any] = {
    "ga": gradient_ascent,
    "npo": npo,
    "ft": finetune_neutral,
    "memit": memit,
    "alphaedit": alphaedit,
}


def run_baseline(name: str, model, tok, requests, cfg: UnlearnConfig, stats=None, **kw: Any) -> BaselineEdit:
    """Run baseline ``name`` (one of METHODS)."""
    try:
        fn = METHODS[name]
    except KeyError:
        raise ZuFastError(f"unknown baseline {name!r}; choose one of {sorted(METHODS)}") from None
    return fn(model, tok, requests, cfg, stats, **kw)


__all__ = ["METHODS", "BaselineEdit", "BaselineHParams", "alphaedit", "finetune_neutral", "gradient_ascent",
           "memit", "npo", "run_baseline"]
