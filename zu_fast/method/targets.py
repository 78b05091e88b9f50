"""Step 2 (and the optimised form of step 3): batched optimisation of δ added at the subject's last token.

For request i, δ_i ∈ R^d is added at the subject's last token of every context-template prompt (and
of the KL prompt "{subject} is a") to the output of either
- decoder layer ``layer`` (step 2: the target hidden state z at the z layer), or
- the edited module of layer ``layer`` (``at_module=True``; step 3: the reference optimises the
  original representation at ``down_proj``'s output, so its clamp and decay are relative to that
  module output's norm, about 5× smaller than the decoder layer's),
so that the model continues each prompt with the target tokens. Loss per request (docs/algorithm.md, step 2):

    mean NLL of the target tokens + kl_factor · KL(current ‖ initial) + v_weight_decay · ‖δ‖ / ‖h_init‖²

(KL(current ‖ initial) = Σ p_cur (log p_cur − log p_init), the reference's (and ROME's)
``kl_div(log p_init, log p_cur, log_target=True)``.) The NLL is read from the model's own logits, or,
when ``v_loss_layer`` names a lower layer (the reference's Qwen3-4B file), from ln_f(output of that
layer) through the LM head, as the reference does.

Requests are independent, so δ is a matrix [N, d] optimised by one Adam: Adam is element-wise, so
each row follows exactly the trajectory of a separate run. A row that converges (loss < 0.05) is
frozen; every row is clamped to ‖δ_i‖ ≤ clamp_norm_factor · ‖h_init,i‖ after each step.

Cost: the layers below the injection run once without grad; each step runs only the layers from there
up (inject_at_layer(skip_below=True)) and the LM head only at the positions the loss reads. A step
forwards only the prompts of requests still running (a converged request's rows would get a zero
gradient and be restored anyway), padded per length bucket rather than to the longest prompt of the
chunk (``length_buckets``). Both change which rows share a padded batch, not any row's maths.
"""

from __future__ import annotations

import contextlib
import dataclasses
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
    layer_count,
    model_device,
    padded_batch,
)
from ..requests import UnlearnRequest
from .keys import key_positions

# Prompts are padded per length bucket (at most cfg.targets.length_buckets forwards per step); one more
# bucket only if it saves at least this share of the padded tokens (the prompts of one request differ
# in length by the context templates, so one padded batch wastes ~40% of its tokens on the small model).
BUCKET_MIN_GAIN = 0.1


@dataclass
class DeltaResult:
    """Optimised δ per request at one layer's output."""

    delta: torch.Tensor  # [N, d] fp32
    h_init: torch.Tensor  # [N, d] fp32: clean output (layer's or module's) at the subject's last token, bare prompt
    initial_loss: torch.Tensor  # [N]
    final_loss: torch.Tensor  # [N]
    steps: torch.Tensor  # [N] Adam steps taken per request
    final_nll: torch.Tensor  # [N] the target NLL part of final_loss
    final_kl: torch.Tensor  # [N] KL(current ‖ initial) at "{subject} is a" (unweighted) at the end

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


class _KeepOutput:
    """Keep a module's output during a forward, WITH its autograd graph (Capture detaches)."""

    def __init__(self, model, name: str) -> None:
        self.module = get_module(model, name)
        self.value: torch.Tensor | None = None

    def __enter__(self) -> _KeepOutput:
        def hook(module, args, output):
            self.value = output[0] if isinstance(output, (tuple, list)) else output

        self.handle = self.module.register_forward_hook(hook)
        return self

    def __exit__(self, *exc) -> None:
        self.handle.remove()


@contextlib.contextmanager
def _add_at_module_output(model, name: str, add_fn) -> Iterator[None]:
    """Add ``add_fn(output)`` to the output of module ``name`` in every forward of the block."""
    mod = get_module(model, name)

    def hook(module, args, output):
        if isinstance(output, (tuple, list)):
            return (output[0] + add_fn(output[0]),) + tuple(output[1:])
        return output + add_fn(output)

    handle = mod.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def _scatter_rows(out: torch.Tensor, seq: torch.Tensor, pos: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Zeros shaped like ``out`` [S, T, d] (or flattened [S·T, d]) with ``rows`` [S, d] at (seq, pos)."""
    z = torch.zeros_like(out)
    if out.dim() == 3:
        return z.index_put((seq, pos), rows.to(out.dtype), accumulate=True)
    raise ZuFastError(f"cannot place δ in a module output of shape {tuple(out.shape)} (expected [batch, seq, d])")


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
    at_module: bool = False,
    desc: str = "targets",
    progress: bool | None = None,
    offset: torch.Tensor | None = None,
    free_basis: torch.Tensor | None = None,
    position: str | None = None,
) -> DeltaResult:
    """Optimise δ toward ``target_ids[i]`` for request i, added at the output of decoder layer ``layer``,
    or (``at_module``) at the output of the edited module ``cfg.locate.rewrite_module.format(layer)``, at each
    prompt's key position ``position`` (default ``cfg.templates.fact_token``: the subject's last token, or the
    prompt's last; the KL prompt "{subject} is a" by the same rule, as ROME does).

    ``offset``  # [N, d] and ``free_basis``  # [d, r] (``targets.orthogonal``, docs/algorithm.md step 2): δ_i is
    offset_i plus a free part kept orthogonal to the basis; the clamp and the weight decay act on the free part,
    and the KL term compares with the clean model (δ = 0). None: the reference's free δ."""
    progress = cfg.runtime.progress if progress is None else progress
    position = cfg.templates.fact_token if position is None else position
    parts = []
    n_chunks = (len(requests) + cfg.targets.batch_size - 1) // cfg.targets.batch_size
    for c in range(n_chunks):
        sl = slice(c * cfg.targets.batch_size, (c + 1) * cfg.targets.batch_size)
        label = desc if n_chunks == 1 else f"{desc} [{c + 1}/{n_chunks}]"
        parts.append(_optimize_chunk(model, tok, requests[sl], cfg, templates, layer, target_ids[sl],
                                     label, progress, at_module,
                                     offset[sl] if offset is not None else None, free_basis, position))
    return DeltaResult(*(torch.cat([getattr(p, f.name) for p in parts]) for f in dataclasses.fields(DeltaResult)))


def _optimize_chunk(model, tok, requests, cfg: UnlearnConfig, templates, layer, target_ids, desc, progress,
                    at_module: bool = False, offset: torch.Tensor | None = None,
                    free_basis: torch.Tensor | None = None, position: str = "subject_last"):
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
    ids, subj_idx = key_positions(tok, tpls, subjects, names, position)  # before the target is appended
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
    # δ is added at the output of ``inject`` (a decoder layer, or the edited module inside layer ``layer``);
    # everything below ``fixed_layer`` (a decoder layer index, −1: none) is the same at every step.
    inject = cfg.locate.rewrite_module.format(layer) if at_module else cfg.locate.layer_module.format(layer)
    fixed_layer = layer - 1 if at_module else layer
    fixed_name = cfg.locate.layer_module.format(fixed_layer) if fixed_layer >= 0 else None
    n_layers = layer_count(model, cfg.locate.layer_module)
    loss_layer = max(cfg.targets.loss_layer, layer) if cfg.targets.loss_layer is not None else n_layers - 1
    loss_name = cfg.locate.layer_module.format(loss_layer) if loss_layer < n_layers - 1 else None

    lengths = batch["attention_mask"].sum(1)  # [S] (right-padded)

    with frozen_params(model):
        # ---- one clean pass up to the injection: what lies below it is fixed for the whole optimisation
        outs = [inject] + ([fixed_name] if fixed_name and fixed_name != inject else [])
        with torch.no_grad(), Capture(model, outputs=outs, stop_after=inject) as cap:
            forward_until(model, batch)
        clean = cap.outputs[inject]  # [S, T, d] the injected output, clean
        bare = torch.arange(0, n_req * n_tpl, n_tpl, device=device)  # first template of each request: bare "{}"
        h_init = clean[bare, subj_pos[bare]].float()  # [n_req, d]
        h_norm = h_init.norm(dim=1).clamp_min(1e-12)  # [n_req]
        if fixed_name is not None:
            base = cap.outputs[fixed_name]  # [S, T, d] output of the last layer that never changes
            tuple_len = cap.output_tuple_len[fixed_name]
        else:  # δ inside layer 0: only the embeddings lie below; nothing to skip
            base, tuple_len = torch.zeros(clean.shape[0], clean.shape[1], 0, device=clean.device), 0
        del clean

        delta = torch.zeros(n_req, h_init.shape[-1], device=base.device, dtype=torch.float32, requires_grad=True)
        # the fixed part of δ (None: the reference) and the directions its free part must avoid
        shift = offset.to(base.device, torch.float32) if offset is not None else None  # [n_req, d]
        U_free = free_basis.to(base.device, torch.float32) if free_basis is not None else None  # [d, r]
        use_shift = [shift is not None]
        if cfg.targets.lr_relative:
            # Scale-free steps: Adam's step is about lr per coordinate (sign-like), i.e. lr·√d in norm; scaled per
            # row by ‖h_init,i‖/√d it moves δ_i by about lr·‖h_init,i‖, whatever the model's hidden-state scale.
            opt = torch.optim.Adam([delta], lr=1.0)
            row_lr = (cfg.targets.lr * h_norm / h_init.shape[-1] ** 0.5)[:, None].to(delta.device)  # [n_req, 1]
        else:  # the reference: one absolute learning rate in the units of the hidden state
            opt = torch.optim.Adam([delta], lr=cfg.targets.lr)
            row_lr = None
        active = torch.ones(n_req, dtype=torch.bool, device=base.device)
        steps = torch.zeros(n_req, dtype=torch.long, device=base.device)
        init_loss = final_loss = final_nll = final_kl = None
        kl_init = None  # [n_req, vocab]
        max_norm = cfg.targets.clamp * h_norm
        full = _Rows(batch, base, lengths, seq_req, subj_pos, tgt_seq, tgt_pos, tgt_tok, tgt_w, tgt_req,
                     kl_seq, kl_pos, torch.arange(n_req, device=device))
        # Each step forwards the active requests' prompts in length buckets (less padding); converged
        # requests leave the batch (their prompts are no longer forwarded).
        buckets = full.buckets(active, cfg.targets.length_buckets)

        def forward(rows: _Rows, skip_below: bool) -> tuple[torch.Tensor, torch.Tensor]:
            def add_to(out: torch.Tensor) -> torch.Tensor:
                rows_delta = delta + shift if use_shift[0] else delta
                return _scatter_rows(out, rows.seq, rows.subj_pos, rows_delta[rows.seq_req])

            with contextlib.ExitStack() as stack:
                if at_module:
                    if fixed_name is not None and skip_below:  # layers below `layer` replaced by their output
                        stack.enter_context(inject_at_layer(model, cfg.locate.layer_module, fixed_layer, rows.base,
                                                            lambda: 0.0, tuple_len, True))
                    stack.enter_context(_add_at_module_output(model, inject, add_to))
                else:
                    stack.enter_context(inject_at_layer(model, cfg.locate.layer_module, layer, rows.base,
                                                        lambda: add_to(rows.base), tuple_len, skip_below))
                loss_out = stack.enter_context(_KeepOutput(model, loss_name)) if loss_name else None
                head = stack.enter_context(_HeadInput(model, cfg.locate.lm_head))
                forward_until(model, rows.batch)
                if head.hidden is None:
                    raise ZuFastError(f"LM head {cfg.locate.lm_head!r} was not called by the forward")
                if loss_name is None:
                    logits_t = head.logits_at(rows.tgt_seq, rows.tgt_pos)  # [P', vocab]
                else:  # the reference's v_loss_layer below the top: ln_f(h_loss) through the LM head
                    h = loss_out.value[rows.tgt_seq, rows.tgt_pos]
                    logits_t = head.head(get_module(model, cfg.locate.final_norm)(h)).float()
                logp_t = torch.log_softmax(logits_t, -1)  # [P', vocab]
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
        bar = tqdm(total=cfg.targets.steps, desc=f"zu_fast {desc}", disable=not progress, leave=False)
        try:
            for it in range(cfg.targets.steps):
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
                if kl_init is None and shift is not None:  # the KL term compares with the clean model (δ = 0)
                    use_shift[0] = False
                    with torch.no_grad():
                        kl_init = losses(skip_below)[1].detach()
                    use_shift[0] = True
                if kl_init is None:
                    kl_init = logp_kl.detach()  # the first step forwards every request
                kl = (logp_kl.exp() * (logp_kl - kl_init)).sum(-1)  # KL(current ‖ initial)   [n_req]
                wd = cfg.targets.weight_decay * delta.norm(dim=1) / h_norm**2
                loss = nll + cfg.targets.kl_factor * kl + wd  # [n_req]; meaningful on the active rows only
                ld = loss.detach()
                if init_loss is None:
                    init_loss = ld.clone()
                    final_loss = ld.clone()
                final_loss = torch.where(active, ld, final_loss)
                if final_nll is None:
                    final_nll, final_kl = nll.detach().clone(), kl.detach().clone()
                final_nll = torch.where(active, nll.detach(), final_nll)
                final_kl = torch.where(active, kl.detach(), final_kl)
                active = active & (ld >= cfg.targets.stop_loss)
                bar.set_postfix(loss=f"{final_loss.mean().item():.3f}", active=int(active.sum()))
                bar.update(1)
                if not bool(active.any()) or it == cfg.targets.steps - 1:
                    break
                opt.zero_grad(set_to_none=True)
                loss[active].sum().backward()  # row i's gradient = its own run's gradient
                keep = delta.detach().clone()
                opt.step()
                with torch.no_grad():
                    if row_lr is not None:  # Adam ran with lr 1: scale each row's step by its own lr
                        delta.copy_(keep + row_lr * (delta - keep))
                    delta[~active] = keep[~active]  # converged rows stay where they stopped
                    if U_free is not None:  # the free part stays orthogonal to the basis
                        delta.sub_((delta @ U_free) @ U_free.t())
                    norms = delta.norm(dim=1)
                    scale = torch.where(norms > max_norm, max_norm / norms.clamp_min(1e-12), torch.ones_like(norms))
                    delta.mul_(scale[:, None])
                steps += active.long()
                if int(active.sum()) < sum(r.kl_req.numel() for r in buckets):
                    buckets = full.buckets(active, cfg.targets.length_buckets)  # the converged requests leave the batch
        finally:
            bar.close()
    if init_loss is None:
        raise ZuFastError("the target optimisation ran no step (v_num_grad_steps must be ≥ 1)")
    total = delta.detach() + shift if shift is not None else delta.detach()
    return DeltaResult(total, h_init, init_loss.cpu(), final_loss.cpu(), steps.cpu(), final_nll.cpu(),
                       final_kl.cpu())


def retry_unreached(
    model,
    tok,
    requests: Sequence[UnlearnRequest],
    cfg: UnlearnConfig,
    templates: Sequence[Sequence[str]],
    layer: int,
    target_ids: Sequence[Sequence[int]],
    res: DeltaResult,
    *,
    desc: str = "targets",
    offset: torch.Tensor | None = None,
    free_basis: torch.Tensor | None = None,
) -> tuple[DeltaResult, int, int]:
    """Give the requests whose target loss stayed above ``cfg.targets.warn_loss`` a second optimisation, from
    scratch, with the clamp radius widened ``cfg.targets.retry_clamp`` times and twice the steps; keep a row's
    retry when its loss is lower. Returns (result, retried, improved).

    Why: on the small models a few subjects' neutral target lies outside the ball ‖δ‖ ≤ clamp·‖h‖ (their
    loss stalls at 4–7 while the rest reach 0.05), and those are most of what the edit fails to forget
    (benchmarks/RESULTS.md); widening the ball for those rows only leaves every other row as it was.
    """
    factor = cfg.targets.retry_clamp
    bad = (res.final_loss > cfg.targets.warn_loss).nonzero().flatten().tolist()
    if not factor or factor <= 1.0 or not bad:
        return res, 0, 0
    wide = cfg.replace(clamp_norm_factor=cfg.targets.clamp * factor, v_num_grad_steps=2 * cfg.targets.steps)
    again = optimize_deltas(model, tok, [requests[i] for i in bad], wide, templates, layer,
                            [target_ids[i] for i in bad], desc=f"{desc} (retry: clamp ×{factor:g}, steps ×2)",
                            offset=offset[bad] if offset is not None else None, free_basis=free_basis)
    delta, final, steps = res.delta.clone(), res.final_loss.clone(), res.steps.clone()
    nll, kl = res.final_nll.clone(), res.final_kl.clone()
    improved = 0
    for j, i in enumerate(bad):
        steps[i] += again.steps[j]
        if again.final_loss[j] < final[i]:
            delta[i], final[i] = again.delta[j].to(delta.device), again.final_loss[j]
            nll[i], kl[i] = again.final_nll[j], again.final_kl[j]
            improved += 1
    return DeltaResult(delta, res.h_init, res.initial_loss, final, steps, nll, kl), len(bad), improved
