"""Step 2 (and the optimised form of step 3): batched optimisation of δ added at a layer's output.

For request i, δ_i ∈ R^d is added to the output of decoder layer ``layer`` at the subject's last
token of every context-template prompt (and of the KL prompt "{subject} is a"), so that the model
continues each prompt with the target tokens. Loss per request (ALGORITHM.md step 2):

    mean NLL of the target tokens + kl_factor · KL(initial ‖ current) + v_weight_decay · ‖δ‖ / ‖h_init‖²

Requests are independent, so δ is a matrix [N, d] optimised by one Adam: Adam is element-wise, so
each row follows exactly the trajectory of a separate run. A row that converges (loss < 0.05) is
frozen; every row is clamped to ‖δ_i‖ ≤ clamp_norm_factor · ‖h_init,i‖ after each step.

Cost: the layers up to ``layer`` run once without grad; each step runs only the layers above
(inject_at_layer(skip_below=True)) and the LM head only at the positions the loss reads. A step
forwards only the prompts of requests still running (a converged request's rows would get a zero
gradient and be restored anyway), padded per length bucket rather than to the longest prompt of the
chunk (``length_buckets``). Both change which rows share a padded batch, not any row's maths.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ..config import UnlearnConfig
from ..errors import ZuFastError
from ..model import (
    Capture,
    StopForward,
    forward_until,
    get_module,
    inject_at_layer,
    model_device,
    padded_batch,
    subject_spans,
)
from ..requests import UnlearnRequest

# Prompts are padded per length bucket (at most cfg.targets_length_buckets forwards per step); one more
# bucket only if it saves at least this share of the padded tokens (the prompts of one request differ
# in length by the context templates, so one padded batch wastes ~40% of its tokens on the small model).
BUCKET_MIN_GAIN = 0.1


@dataclass
class DeltaResult:
    """Optimised δ per request at one layer's output."""

    delta: torch.Tensor  # [N, d] fp32
    h_init: torch.Tensor  # [N, d] fp32: clean layer output at the subject's last token, bare prompt
    initial_loss: torch.Tensor  # [N]
    final_loss: torch.Tensor  # [N]
    steps: torch.Tensor  # [N] Adam steps taken per request

    @property
    def target(self) -> torch.Tensor:
        """z = h_init + δ   # [N, d]"""
        return self.h_init + self.delta


@contextlib.contextmanager
def frozen_params(model: torch.nn.Module) -> Iterator[None]:
    """No parameter gradients (memory: no .grad buffers for the model), eval mode."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    was_training = model.training
    for p, _ in flags:
        p.requires_grad_(False)
    model.eval()
    try:
        yield
    finally:
        for p, f in flags:
            p.requires_grad_(f)
        model.train(was_training)


class _HeadInput:
    """Pre-hook on the LM head: keep its input (final hidden states) and stop the forward, so the
    vocabulary projection runs only at the positions the loss reads."""

    def __init__(self, model, name: str) -> None:
        self.head = get_module(model, name)
        self.hidden: torch.Tensor | None = None

    def __enter__(self) -> _HeadInput:
        def pre_hook(module, args):
            if self.hidden is None:  # the model's own call: keep the input, skip the projection
                self.hidden = args[0]
                raise StopForward

        self.handle = self.head.register_forward_pre_hook(pre_hook)
        return self

    def __exit__(self, *exc) -> None:
        self.handle.remove()

    def logits_at(self, seq: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        return self.head(self.hidden[seq, pos]).float()  # [P, vocab]


@dataclass
class _Rows:
    """Some of the prompts, as one padded batch: what one forward of a step runs.

    Sequence indices (seq, tgt_seq, kl_seq) refer to rows of ``batch``/``base``; request indices
    (seq_req, tgt_req, kl_req) to rows of δ.
    """

    batch: dict  # input_ids, attention_mask  [S', T']
    base: torch.Tensor  # the layer's clean output  [S', T', d]
    lengths: torch.Tensor  # [S'] tokens per prompt (right padding)
    seq_req: torch.Tensor  # [S'] request of each prompt
    subj_pos: torch.Tensor  # [S'] subject's last token
    tgt_seq: torch.Tensor  # [P'] prompt of each target token
    tgt_pos: torch.Tensor  # [P'] position predicting it
    tgt_tok: torch.Tensor  # [P']
    tgt_w: torch.Tensor  # [P'] its weight in the request's mean NLL
    tgt_req: torch.Tensor  # [P'] its request
    kl_seq: torch.Tensor  # [n'] the KL prompts in this batch
    kl_pos: torch.Tensor  # [n']
    kl_req: torch.Tensor  # [n'] their requests

    @property
    def seq(self) -> torch.Tensor:
        return torch.arange(self.seq_req.numel(), device=self.seq_req.device)

    def take(self, sel: torch.Tensor) -> _Rows:
        """The prompts ``sel`` [S'] (indices into this batch), padded to the longest of them only
        (right padding: dropping trailing columns moves no position)."""
        n = self.seq_req.numel()
        new_index = torch.full((n,), -1, dtype=torch.long, device=sel.device)
        new_index[sel] = torch.arange(sel.numel(), device=sel.device)
        inside = new_index >= 0  # [S]
        p, k = inside[self.tgt_seq], inside[self.kl_seq]
        t = int(self.lengths[sel].max())
        return _Rows({key: v[sel, :t] for key, v in self.batch.items()}, self.base[sel, :t], self.lengths[sel],
                     self.seq_req[sel], self.subj_pos[sel], new_index[self.tgt_seq[p]], self.tgt_pos[p],
                     self.tgt_tok[p], self.tgt_w[p], self.tgt_req[p], new_index[self.kl_seq[k]], self.kl_pos[k],
                     self.kl_req[k])

    def buckets(self, active: torch.Tensor, max_buckets: int) -> list[_Rows]:
        """The prompts of the requests where ``active`` [n_req] is set, split by length into at most
        ``max_buckets`` batches (see ``length_buckets``)."""
        sel = active.to(self.seq_req.device)[self.seq_req].nonzero().squeeze(1)  # [S']
        lengths = self.lengths[sel]
        order = torch.argsort(lengths, stable=True)
        sel, lengths = sel[order], lengths[order]
        bounds = length_buckets(lengths.tolist(), max_buckets)
        return [self.take(sel[i:j]) for i, j in zip([0, *bounds[:-1]], bounds)]


def length_buckets(sorted_lengths: Sequence[int], max_buckets: int, min_gain: float = BUCKET_MIN_GAIN) -> list[int]:
    """Split points (exclusive ends) of ascending ``sorted_lengths`` into contiguous buckets, each padded
    to its own longest prompt, minimising the padded tokens Σ count·max_len.

    An optimal partition into k buckets by dynamic programming over the distinct lengths; more buckets
    are taken only while one more saves at least ``min_gain`` of the tokens (each bucket is one more
    forward per step, which costs launch and Python overhead)."""
    n = len(sorted_lengths)
    if n == 0:
        return []
    distinct, ends = [], []  # distinct lengths and, for each, the end index of its run
    for i, x in enumerate(sorted_lengths):
        if distinct and distinct[-1] == x:
            ends[-1] = i + 1
        else:
            distinct.append(x)
            ends.append(i + 1)
    m = len(distinct)
    inf = float("inf")
    # cost[k][j]: fewest padded tokens for the first j distinct lengths in k buckets; arg for the split
    cost = [[inf] * (m + 1) for _ in range(max_buckets + 1)]
    arg = [[0] * (m + 1) for _ in range(max_buckets + 1)]
    cost[0][0] = 0.0
    for k in range(1, max_buckets + 1):
        for j in range(1, m + 1):
            for i in range(k - 1, j):  # bucket = distinct lengths i..j-1
                start = ends[i - 1] if i else 0
                c = cost[k - 1][i] + (ends[j - 1] - start) * distinct[j - 1]
                if c < cost[k][j]:
                    cost[k][j], arg[k][j] = c, i
    best = 1
    for k in range(2, max_buckets + 1):
        if cost[k][m] <= (1.0 - min_gain) * cost[best][m]:
            best = k
        else:
            break
    bounds, j = [], m
    for k in range(best, 0, -1):
        bounds.append(ends[j - 1])
        j = arg[k][j]
    return bounds[::-1]


def _flatten(templates: Sequence[Sequence[str]]) -> list[str]:
    return [t for group in templates for t in group]


def optimize_deltas(
    model,
    tok,
    requests: Sequence[UnlearnRequest],
    cfg: UnlearnConfig,
    templates: Sequence[Sequence[str]],
    layer: int,
    target_ids: Sequence[Sequence[int]],
    *,
    desc: str = "targets",
    progress: bool | None = None,
) -> DeltaResult:
    """Optimise δ at the output of decoder layer ``layer`` toward ``target_ids[i]`` for request i."""
    progress = cfg.progress if progress is None else progress
    parts = []
    n_chunks = (len(requests) + cfg.targets_batch_size - 1) // cfg.targets_batch_size
    for c in range(n_chunks):
        sl = slice(c * cfg.targets_batch_size, (c + 1) * cfg.targets_batch_size)
        label = desc if n_chunks == 1 else f"{desc} [{c + 1}/{n_chunks}]"
        parts.append(_optimize_chunk(model, tok, requests[sl], cfg, templates, layer, target_ids[sl],
                                     label, progress))
    return DeltaResult(*(torch.cat([getattr(p, f) for p in parts]) for f in
                         ("delta", "h_init", "initial_loss", "final_loss", "steps")))


def _optimize_chunk(model, tok, requests, cfg: UnlearnConfig, templates, layer, target_ids, desc, progress):
    device = model_device(model)
    flat = _flatten(templates)
    n_req, n_tpl = len(requests), len(flat)
    # ---- the prompts: every context template per request, then one KL prompt per request
    tpls, subjects, names = [], [], []
    for r in requests:
        for c in flat:
            tpls.append(c.format(r.prompt))
            subjects.append(r.subject)
            names.append(r.describe())
    for r in requests:
        tpls.append("{} is a")
        subjects.append(r.subject)
        names.append(r.describe())
    ids, subj_idx = subject_spans(tok, tpls, subjects, names)
    seq_req = torch.tensor([i for i in range(n_req) for _ in range(n_tpl)] + list(range(n_req)), device=device)
    # teacher forcing: append target[:-1]; the loss reads the positions predicting each target token
    tgt_seq, tgt_pos, tgt_tok, tgt_w = [], [], [], []
    for s in range(n_req * n_tpl):
        t_ids = list(target_ids[s // n_tpl])
        if not t_ids:
            raise ZuFastError(f"{names[s]}: empty target")
        start = len(ids[s]) - 1
        ids[s] = ids[s] + t_ids[:-1]
        for j, t in enumerate(t_ids):
            tgt_seq.append(s)
            tgt_pos.append(start + j)
            tgt_tok.append(t)
            tgt_w.append(1.0 / (len(t_ids) * n_tpl))  # mean over tokens, then over templates
    tgt_seq = torch.tensor(tgt_seq, device=device)
    tgt_pos = torch.tensor(tgt_pos, device=device)
    tgt_tok = torch.tensor(tgt_tok, device=device)
    tgt_w = torch.tensor(tgt_w, device=device)
    tgt_req = seq_req[tgt_seq]
    kl_seq = torch.arange(n_req * n_tpl, n_req * (n_tpl + 1), device=device)
    subj_pos = torch.tensor(subj_idx, device=device)
    kl_pos = subj_pos[kl_seq]
    batch = padded_batch(tok, ids, device)
    layer_name = cfg.layer_module_tmp.format(layer)

    lengths = batch["attention_mask"].sum(1)  # [S] (right-padded)

    with frozen_params(model):
        # ---- one clean pass up to the layer: its output is fixed for the whole optimisation
        with torch.no_grad(), Capture(model, outputs=[layer_name], stop_after=layer_name) as cap:
            forward_until(model, batch)
        base = cap.outputs[layer_name]  # [S, T, d]
        tuple_len = cap.output_tuple_len[layer_name]
        bare = torch.arange(0, n_req * n_tpl, n_tpl, device=device)  # first template of each request: bare "{}"
        h_init = base[bare, subj_pos[bare]].float()  # [n_req, d]
        h_norm = h_init.norm(dim=1).clamp_min(1e-12)  # [n_req]

        delta = torch.zeros(n_req, base.shape[-1], device=base.device, dtype=torch.float32, requires_grad=True)
        opt = torch.optim.Adam([delta], lr=cfg.v_lr)
        active = torch.ones(n_req, dtype=torch.bool, device=base.device)
        steps = torch.zeros(n_req, dtype=torch.long, device=base.device)
        init_loss = final_loss = None
        kl_init = None  # [n_req, vocab]
        max_norm = cfg.clamp_norm_factor * h_norm
        full = _Rows(batch, base, lengths, seq_req, subj_pos, tgt_seq, tgt_pos, tgt_tok, tgt_w, tgt_req,
                     kl_seq, kl_pos, torch.arange(n_req, device=device))
        # Each step forwards the active requests' prompts in length buckets (less padding); converged
        # requests leave the batch (their prompts are no longer forwarded).
        buckets = full.buckets(active, cfg.targets_length_buckets)

        def forward(rows: _Rows, skip_below: bool) -> tuple[torch.Tensor, torch.Tensor]:
            def add_fn() -> torch.Tensor:
                z = torch.zeros_like(rows.base)
                return z.index_put((rows.seq, rows.subj_pos), delta[rows.seq_req].to(rows.base.dtype),
                                   accumulate=True)

            with inject_at_layer(model, cfg.layer_module_tmp, layer, rows.base, add_fn, tuple_len, skip_below), \
                    _HeadInput(model, cfg.lm_head_module) as head:
                forward_until(model, rows.batch)
                if head.hidden is None:
                    raise ZuFastError(f"LM head {cfg.lm_head_module!r} was not called by the forward")
                logp_t = torch.log_softmax(head.logits_at(rows.tgt_seq, rows.tgt_pos), -1)  # [P', vocab]
                logp_kl = torch.log_softmax(head.logits_at(rows.kl_seq, rows.kl_pos), -1)  # [n', vocab]
            return logp_t, logp_kl

        def losses(skip_below: bool) -> tuple[torch.Tensor, torch.Tensor]:
            """Mean target NLL [n_req] and the KL prompts' log-probabilities [n_req, vocab] (zero rows for
            the requests not forwarded)."""
            nll = logp_kl_all = None
            for rows in buckets:
                logp_t, logp_kl = forward(rows, skip_below)
                nll_tok = -logp_t.gather(1, rows.tgt_tok[:, None].to(logp_t.device)).squeeze(1)  # [P']
                if nll is None:
                    nll = torch.zeros(n_req, device=logp_t.device)
                    logp_kl_all = torch.zeros(n_req, logp_kl.shape[1], device=logp_kl.device)
                nll = nll.index_add(0, rows.tgt_req.to(nll.device), nll_tok * rows.tgt_w.to(nll.device))
                logp_kl_all = logp_kl_all.index_put((rows.kl_req.to(logp_kl.device),), logp_kl)
            return nll, logp_kl_all

        skip_below = True
        bar = tqdm(total=cfg.v_num_grad_steps, desc=f"zu_fast {desc}", disable=not progress, leave=False)
        try:
            for it in range(cfg.v_num_grad_steps):
                try:
                    nll, logp_kl = losses(skip_below)
                except ZuFastError:
                    raise
                except Exception as e:  # a model whose layer loop cannot take stand-ins
                    if not skip_below:
                        raise
                    warnings.warn(f"skipping the layers below {layer} failed ({e!r}); running full forwards",
                                  stacklevel=2)
                    skip_below = False
                    nll, logp_kl = losses(skip_below)
                if kl_init is None:
                    kl_init = logp_kl.detach()  # the first step forwards every request
                kl = (kl_init.exp() * (kl_init - logp_kl)).sum(-1)  # KL(initial ‖ current)   [n_req]
                wd = cfg.v_weight_decay * delta.norm(dim=1) / h_norm**2
                loss = nll + cfg.kl_factor * kl + wd  # [n_req]; meaningful on the active rows only
                ld = loss.detach()
                if init_loss is None:
                    init_loss = ld.clone()
                    final_loss = ld.clone()
                final_loss = torch.where(active, ld, final_loss)
                active = active & (ld >= cfg.v_early_stop_loss)
                bar.set_postfix(loss=f"{final_loss.mean().item():.3f}", active=int(active.sum()))
                bar.update(1)
                if not bool(active.any()) or it == cfg.v_num_grad_steps - 1:
                    break
                opt.zero_grad(set_to_none=True)
                loss[active].sum().backward()  # row i's gradient = its own run's gradient
                keep = delta.detach().clone()
                opt.step()
                with torch.no_grad():
                    delta[~active] = keep[~active]  # converged rows stay where they stopped
                    norms = delta.norm(dim=1)
                    scale = torch.where(norms > max_norm, max_norm / norms.clamp_min(1e-12), torch.ones_like(norms))
                    delta.mul_(scale[:, None])
                steps += active.long()
                if int(active.sum()) < sum(r.kl_req.numel() for r in buckets):
                    buckets = full.buckets(active, cfg.targets_length_buckets)  # the converged requests leave the batch
        finally:
            bar.close()
    if init_loss is None:
        raise ZuFastError("the target optimisation ran no step (v_num_grad_steps must be ≥ 1)")
    return DeltaResult(delta.detach(), h_init, init_loss.cpu(), final_loss.cpu(), steps.cpu())
