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

The clean forward (δ = 0, every prompt, one padded batch) also keeps the keys and values of the layers that run
in a step, so a step forwards each prompt only from δ's token on, the positions before it coming from that
cache (``prefix_cache``; checked at the first step against the clean forward, full-length steps otherwise). In
step 3, where the edited module's output is a plain addition to its layer's output (probed), δ is added to the
layer's output and the layer itself is skipped too. A request whose clean loss is already below stop_loss takes
no step (``benchmarks/results/perf_issue25.md`` measures the work each of these saves).
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
from . import prefix_cache
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
    (seq_req, tgt_req, kl_req) to rows of δ. A suffix view (``suffix_take``) holds only the positions from
    each prompt's subject last token on, with ``position_ids`` and the cached ``prefix`` keys and values.
    """

    batch: dict  # input_ids, attention_mask  [S', T'] (a suffix view: attention_mask [S', P + T'])
    base: torch.Tensor  # the stand-in layer's clean output  [S', T', d]
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
    position_ids: torch.Tensor | None = None  # [S', T'] (suffix views only)
    prefix: dict | None = None  # layer → (K, V) [S', kv_heads, P, head_dim] (suffix views only)

    @property
    def seq(self) -> torch.Tensor:
        return torch.arange(self.seq_req.numel(), device=self.seq_req.device)

    def _remap(self, sel: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """New row index of every old row (−1: dropped), and which target tokens / KL rows stay."""
        n = self.seq_req.numel()
        new_index = torch.full((n,), -1, dtype=torch.long, device=sel.device)
        new_index[sel] = torch.arange(sel.numel(), device=sel.device)
        inside = new_index >= 0  # [S]
        return new_index, inside[self.tgt_seq], inside[self.kl_seq]

    def take(self, sel: torch.Tensor) -> _Rows:
        """The prompts ``sel`` [S'] (indices into this batch), padded to the longest of them only
        (right padding: dropping trailing columns moves no position)."""
        new_index, p, k = self._remap(sel)
        t = int(self.lengths[sel].max())
        return _Rows({key: v[sel, :t] for key, v in self.batch.items()}, self.base[sel, :t], self.lengths[sel],
                     self.seq_req[sel], self.subj_pos[sel], new_index[self.tgt_seq[p]], self.tgt_pos[p],
                     self.tgt_tok[p], self.tgt_w[p], self.tgt_req[p], new_index[self.kl_seq[k]], self.kl_pos[k],
                     self.kl_req[k])

    def suffix_take(self, sel: torch.Tensor, prefix: prefix_cache.PrefixKV) -> _Rows:
        """The prompts ``sel`` from their subject last token on (δ's position becomes 0), right-padded to the
        longest suffix; the positions before it come as cached keys and values (``prefix_cache``)."""
        new_index, p, k = self._remap(sel)
        split = self.subj_pos[sel]  # [B] the first position that depends on δ
        suffix = self.lengths[sel] - split  # [B]
        m, pre = int(suffix.max()), max(int(split.max()), 1)
        col = torch.arange(m, device=sel.device)  # [M]
        src = (split[:, None] + col[None]).clamp_max(self.batch["input_ids"].shape[1] - 1)  # [B, M] full positions
        valid = col[None] < suffix[:, None]  # [B, M]
        ids = self.batch["input_ids"][sel[:, None], src]
        slot = torch.arange(pre, device=sel.device)[None]  # [1, P]
        mask = torch.cat([slot >= pre - split[:, None], valid], 1).to(self.batch["attention_mask"].dtype)
        base = self.base[sel[:, None], src] if self.base.shape[-1] else self.base[sel, :m]
        tgt_shift = split[new_index[self.tgt_seq[p]]]
        kl_shift = split[new_index[self.kl_seq[k]]]
        return _Rows({"input_ids": ids, "attention_mask": mask}, base, suffix, self.seq_req[sel],
                     torch.zeros_like(split), new_index[self.tgt_seq[p]], self.tgt_pos[p] - tgt_shift,
                     self.tgt_tok[p], self.tgt_w[p], self.tgt_req[p], new_index[self.kl_seq[k]],
                     self.kl_pos[k] - kl_shift, self.kl_req[k], position_ids=split[:, None] + col[None],
                     prefix=prefix.rows(sel, split))

    def bucket_rows(self, active: torch.Tensor, max_buckets: int, by_suffix: bool = False) -> list[torch.Tensor]:
        """The prompts [S'] of the requests where ``active`` [n_req] is set, split by length (of the suffix from
        the subject's last token on, ``by_suffix``) into at most ``max_buckets`` groups (``length_buckets``)."""
        sel = active.to(self.seq_req.device)[self.seq_req].nonzero().squeeze(1)  # [S']
        lengths = (self.lengths - self.subj_pos if by_suffix else self.lengths)[sel]
        order = torch.argsort(lengths, stable=True)
        sel, lengths = sel[order], lengths[order]
        bounds = length_buckets(lengths.tolist(), max_buckets)
        return [sel[i:j] for i, j in zip([0, *bounds[:-1]], bounds)]

    def buckets(self, active: torch.Tensor, max_buckets: int,
                prefix: prefix_cache.PrefixKV | None = None) -> list[_Rows]:
        """``bucket_rows`` as batches: whole prompts, or with a ``prefix`` their suffixes (``suffix_take``)."""
        cut = self.bucket_rows(active, max_buckets, by_suffix=prefix is not None)
        return [self.suffix_take(c, prefix) if prefix is not None else self.take(c) for c in cut]


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
    init: torch.Tensor | None = None,
    suffix_cache: bool = True,
    skip_module_layer: bool = True,
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
    and the KL term compares with the clean model (δ = 0). None: the reference's free δ.

    ``init``  # [N, d]: start δ (its free part) there (clamped) instead of at 0 — a warm start, which changes the
    trajectory (the reference starts at 0). ``suffix_cache`` and ``skip_module_layer`` turn off two savings that
    leave each row's maths as it is (the cached prefix, ``prefix_cache``; running the edited layer itself in step 3
    only where its module output does not reach the layer output as a plain addition); for measurements.
    """
    progress = cfg.runtime.progress if progress is None else progress
    position = cfg.templates.fact_token if position is None else position
    parts = []
    n_chunks = (len(requests) + cfg.targets.batch_size - 1) // cfg.targets.batch_size
    for c in range(n_chunks):
        sl = slice(c * cfg.targets.batch_size, (c + 1) * cfg.targets.batch_size)
        label = desc if n_chunks == 1 else f"{desc} [{c + 1}/{n_chunks}]"
        parts.append(_optimize_chunk(model, tok, requests[sl], cfg, templates, layer, target_ids[sl], label,
                                     progress, at_module, None if init is None else init[sl], suffix_cache,
                                     skip_module_layer, offset[sl] if offset is not None else None, free_basis,
                                     position))
    return DeltaResult(*(torch.cat([getattr(p, f.name) for p in parts]) for f in dataclasses.fields(DeltaResult)))


def _agree(nll: torch.Tensor, logp_kl: torch.Tensor, nll0: torch.Tensor, logp_kl0: torch.Tensor,
           dtype: torch.dtype, rows: torch.Tensor) -> bool:
    """Whether a step at δ = 0 through the cached prefix reproduced the clean forward (round-off aside) on the
    requests ``rows``  # [n_req] bool that it forwarded."""
    tol = 1e-3 if dtype in (torch.float32, torch.float64) else 3e-2
    nll0, logp_kl0 = nll0.to(nll.device)[rows.to(nll.device)], logp_kl0.to(logp_kl.device)[rows.to(logp_kl.device)]
    nll, logp_kl = nll.detach()[rows.to(nll.device)], logp_kl.detach()[rows.to(logp_kl.device)]
    return bool(((nll - nll0).abs() <= tol * (1 + nll0.abs())).all()
                and ((logp_kl.exp() - logp_kl0.exp()).abs() <= tol).all())


def _module_adds_to_layer_output(model, cfg: UnlearnConfig, batch: dict, layer: int, inject: str,
                                 below: torch.Tensor | None, below_tuple_len: int, layer_out: torch.Tensor,
                                 module_out: torch.Tensor, subj_pos: torch.Tensor) -> bool:
    """Whether adding v to the edited module's output at one token adds exactly v to decoder layer ``layer``'s
    output there and changes nothing else (a pre-norm residual block: Llama, Mistral, Qwen, GPT-2, GPT-J, …),
    probed with a random v on a few prompts. Then step 3 may add δ to the layer's output and skip the layer."""
    sel = torch.arange(min(4, batch["input_ids"].shape[0]), device=batch["input_ids"].device)
    t = int(batch["attention_mask"][sel].sum(1).max())
    small = {k: v[sel, :t] for k, v in batch.items()}
    pos = subj_pos[sel]
    g = torch.Generator().manual_seed(0)
    scale = float(module_out[sel].float().norm(dim=1).mean()) + 1e-6  # module_out: [S, d] at the subjects
    v = (torch.randn(sel.numel(), module_out.shape[-1], generator=g) * scale / module_out.shape[-1] ** 0.5)
    v = v.to(module_out.device)
    name = cfg.locate.layer_module.format(layer)
    with torch.no_grad(), contextlib.ExitStack() as stack:
        if layer > 0:
            stack.enter_context(inject_at_layer(model, cfg.locate.layer_module, layer - 1, below[sel, :t],
                                                lambda: 0.0, below_tuple_len, True))
        stack.enter_context(_add_at_module_output(model, inject, lambda out: _scatter_rows(out, sel, pos, v)))
        cap = stack.enter_context(Capture(model, outputs=[name], stop_after=name))
        forward_until(model, small)
    y = cap.outputs[name].float()  # [4, t, d]
    expected = layer_out[sel, :t].float() + _scatter_rows(y, sel, pos, v.float())
    real = small["attention_mask"].bool()
    err = float((y - expected)[real].abs().max())
    tol = 1e-4 if layer_out.dtype in (torch.float32, torch.float64) else 2e-2
    return err <= tol * (float(layer_out[sel, :t].float()[real].abs().max()) + float(v.abs().max()))


@dataclass
class _Clean:
    """What the clean forward (δ = 0) of all the prompts leaves for the optimisation."""

    full: dict[str, torch.Tensor]  # module → its output  [S, T, d] (right-padded like the prompts)
    tuple_len: dict[str, int]  # module → length of its output tuple (0: a bare tensor)
    subj_out: torch.Tensor  # the injected module's output at each prompt's key position  [S, d]
    kv: dict[int, tuple[torch.Tensor, torch.Tensor]] | None  # layer → (K, V)  [S, kv_heads, T, head_dim]
    nll0: torch.Tensor  # [n_req] mean target NLL
    logp_kl0: torch.Tensor  # [n_req, vocab] the KL prompts' log-probabilities


def _clean_forward(model, cfg: UnlearnConfig, full: _Rows, n_req: int, outputs: list[str], inject: str,
                   loss_name: str | None, kv_layers: range, kv_kwarg: str | None) -> _Clean:
    """One forward of every prompt without δ, as one padded batch (it runs once; the steps are the ones that run
    in length buckets)."""
    t = full.batch["input_ids"].shape[1]
    cache = prefix_cache.new_cache(model) if kv_kwarg else None
    with torch.no_grad(), contextlib.ExitStack() as stack:
        cap = stack.enter_context(Capture(model, outputs=list(dict.fromkeys(outputs + [inject]))))
        loss_out = stack.enter_context(_KeepOutput(model, loss_name)) if loss_name else None
        head = stack.enter_context(_HeadInput(model, cfg.locate.lm_head))
        extra = {kv_kwarg: cache, "use_cache": True} if cache is not None else {"use_cache": False}
        with contextlib.suppress(StopForward):
            model(**full.batch, **extra)
        if head.hidden is None:
            raise ZuFastError(f"LM head {cfg.locate.lm_head!r} was not called by the forward")
        logp_t, logp_kl = _head_logprobs(model, cfg, head, loss_out, full.tgt_seq, full.tgt_pos, full.kl_seq,
                                         full.kl_pos)
    x = cap.outputs[inject]
    kv = None
    if cache is not None:
        kv = {}
        for i in kv_layers:
            k, v = prefix_cache.read_kv(cache, i)
            if k.shape[2] != t:
                raise prefix_cache.CacheUnsupported(f"layer {i} cached {k.shape[2]} of {t} positions")
            kv[i] = (k, v)
    nll_tok = -logp_t.gather(1, full.tgt_tok[:, None].to(logp_t.device)).squeeze(1)  # [P']
    nll0 = torch.zeros(n_req, device=logp_t.device)
    nll0.index_add_(0, full.tgt_req.to(logp_t.device), nll_tok * full.tgt_w.to(logp_t.device))
    logp_kl0 = torch.zeros(n_req, logp_kl.shape[1], device=logp_kl.device)
    logp_kl0[full.kl_req.to(logp_kl.device)] = logp_kl
    return _Clean({name: cap.outputs[name] for name in outputs}, {name: cap.output_tuple_len[name] for name in outputs},
                  x[full.seq.to(x.device), full.subj_pos.to(x.device)], kv, nll0, logp_kl0)


def _optimize_chunk(model, tok, requests, cfg: UnlearnConfig, templates, layer, target_ids, desc, progress,
                    at_module: bool = False, init: torch.Tensor | None = None, suffix_cache: bool = True,
                    skip_module_layer: bool = True, offset: torch.Tensor | None = None,
                    free_basis: torch.Tensor | None = None, position: str = "subject_last") -> DeltaResult:
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
    # δ is added at the output of ``inject``: decoder layer ``layer`` (step 2), or the edited module inside it
    # (step 3). Each step runs only the layers above a stand-in that outputs the clean value (docs/algorithm.md).
    layer_tmp = cfg.locate.layer_module
    inject = cfg.locate.rewrite_module.format(layer) if at_module else layer_tmp.format(layer)
    layer_name = layer_tmp.format(layer)
    below_name = layer_tmp.format(layer - 1) if at_module and layer > 0 else None
    n_layers = layer_count(model, layer_tmp)
    loss_layer = max(cfg.targets.loss_layer, layer) if cfg.targets.loss_layer is not None else n_layers - 1
    loss_name = layer_tmp.format(loss_layer) if loss_layer < n_layers - 1 else None
    lengths = batch["attention_mask"].sum(1)  # [S] (right-padded)
    bare = torch.arange(0, n_req * n_tpl, n_tpl, device=device)  # first template of each request: bare "{}"
    no_base = torch.zeros(*batch["input_ids"].shape, 0, device=device)  # [S, T, 0] until the clean forward
    full = _Rows(batch, no_base, lengths, seq_req, subj_pos, tgt_seq, tgt_pos, tgt_tok, tgt_w, tgt_req, kl_seq,
                 kl_pos, torch.arange(n_req, device=device))

    with frozen_params(model):
        # ---- one clean forward of the full prompts (δ = 0): the clean outputs at and below the injection, the
        # log-probabilities the first step must reproduce, and the keys and values of the layers that run in a
        # step (prefix_cache)
        kv_kwarg = None
        if suffix_cache:
            with contextlib.suppress(prefix_cache.CacheUnsupported):
                kv_kwarg = prefix_cache.cache_kwarg(model)
        outputs = [layer_name] + ([below_name] if below_name else [])
        kv_from = layer if at_module else layer + 1
        clean = None
        if kv_kwarg is not None and kv_from < n_layers:
            with contextlib.suppress(Exception):  # a model that refuses the cache: the clean forward without it
                clean = _clean_forward(model, cfg, full, n_req, outputs, inject, loss_name, range(kv_from, n_layers),
                                       kv_kwarg)
        if clean is None:
            clean = _clean_forward(model, cfg, full, n_req, outputs, inject, loss_name, range(0), None)
        h_init = clean.subj_out[bare].float()  # [n_req, d]
        h_norm = h_init.norm(dim=1).clamp_min(1e-12)  # [n_req]
        layer_out = clean.full[layer_name]  # [S, T, d]
        # Where δ goes in a step: at the output of decoder layer `layer` (step 2; step 3 where the module's output
        # is a plain addition to it), the layers up to `layer` replaced by stand-ins; or, in step 3 otherwise, at
        # the module's output with the layers below `layer` replaced and `layer` itself running.
        # At δ = 0 (no warm start, no offset) the first step's loss is the clean forward's NLL (the KL and the decay
        # vanish): a request already below stop_loss there takes no step (as in the reference, which stops at its
        # first step) and is not forwarded again; when none is left, no step runs at all.
        done0 = torch.zeros(n_req, dtype=torch.bool, device=device)
        if init is None and offset is None:
            done0 = (clean.nll0 < cfg.targets.stop_loss).to(device)
        at_layer_out = not at_module
        if at_module and skip_module_layer and not bool(done0.all()):
            with contextlib.suppress(Exception):  # a layer that cannot be probed this way runs every step
                at_layer_out = _module_adds_to_layer_output(
                    model, cfg, batch, layer, inject, clean.full.get(below_name),
                    clean.tuple_len.get(below_name, 0), layer_out, clean.subj_out, subj_pos)
        if at_layer_out:
            stand_in, base, tuple_len = layer, layer_out, clean.tuple_len[layer_name]
        elif below_name is not None:
            stand_in, base, tuple_len = layer - 1, clean.full[below_name], clean.tuple_len[below_name]
        else:  # δ inside layer 0: only the embeddings lie below; nothing to stand in for
            stand_in, tuple_len = -1, 0
            base = torch.zeros(layer_out.shape[0], layer_out.shape[1], 0, device=layer_out.device)
        full.base = base
        prefix = None
        if clean.kv is not None:
            prefix = prefix_cache.PrefixKV({i: kv for i, kv in clean.kv.items() if i > stand_in}, n_layers, kv_kwarg)
        nll0, logp_kl0 = clean.nll0, clean.logp_kl0
        del clean, layer_out

        max_norm = cfg.targets.clamp * h_norm
        start = torch.zeros(n_req, h_init.shape[-1], dtype=torch.float32)
        if init is not None:  # a warm start, inside the ball
            start = init.detach().float().cpu().clone()
            start.mul_((max_norm.cpu() / start.norm(dim=1).clamp_min(1e-12)).clamp(max=1.0)[:, None])
        delta = start.to(base.device).requires_grad_(True)
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
        active = ~done0.to(base.device)
        steps = torch.zeros(n_req, dtype=torch.long, device=base.device)
        init_loss = final_loss = final_nll = final_kl = None
        if bool(done0.any()):  # the requests done at δ = 0: their first (and last) loss is the clean one
            init_loss = nll0.detach().to(base.device).clone()
            final_loss, final_nll = init_loss.clone(), init_loss.clone()
            final_kl = torch.zeros_like(init_loss)
        kl_init = None  # [n_req, vocab]
        max_norm = max_norm.to(base.device)
        # Each step forwards the active requests' prompts in length buckets (less padding); converged
        # requests leave the batch (their prompts are no longer forwarded). With the prefix cache a prompt is
        # forwarded from its subject's last token on.
        try:
            buckets = full.buckets(active, cfg.targets.length_buckets, prefix) if bool(active.any()) else []
        except Exception:  # cached keys and values of a shape the suffix views cannot take: full prompts
            prefix = None
            buckets = full.buckets(active, cfg.targets.length_buckets)

        def forward(rows: _Rows, skip_below: bool) -> tuple[torch.Tensor, torch.Tensor]:
            def add_to(out: torch.Tensor) -> torch.Tensor:
                rows_delta = delta + shift if use_shift[0] else delta
                return _scatter_rows(out, rows.seq, rows.subj_pos, rows_delta[rows.seq_req])

            with contextlib.ExitStack() as stack:
                if at_layer_out:
                    stack.enter_context(inject_at_layer(model, layer_tmp, layer, rows.base, lambda: add_to(rows.base),
                                                        tuple_len, skip_below))
                else:
                    if stand_in >= 0 and skip_below:  # layers below `layer` replaced by their output
                        stack.enter_context(inject_at_layer(model, layer_tmp, stand_in, rows.base, lambda: 0.0,
                                                            tuple_len, True))
                    stack.enter_context(_add_at_module_output(model, inject, add_to))
                loss_out = stack.enter_context(_KeepOutput(model, loss_name)) if loss_name else None
                head = stack.enter_context(_HeadInput(model, cfg.locate.lm_head))
                if rows.prefix is not None:
                    n, p = rows.batch["input_ids"].shape[0], rows.batch["attention_mask"].shape[1] - \
                        rows.batch["input_ids"].shape[1]
                    cache = prefix.fresh(model, rows.prefix, n, p)
                    with contextlib.suppress(StopForward):
                        model(**rows.batch, position_ids=rows.position_ids, **{prefix.kwarg: cache}, use_cache=True)
                else:
                    forward_until(model, rows.batch)
                if head.hidden is None:
                    raise ZuFastError(f"LM head {cfg.locate.lm_head!r} was not called by the forward")
                return _head_logprobs(model, cfg, head, loss_out, rows.tgt_seq, rows.tgt_pos, rows.kl_seq,
                                      rows.kl_pos)

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

        def cached_agrees() -> bool:
            """With a warm start or an offset the first step is not at δ = 0: check the cached path at δ = 0 on its
            own."""
            keep = delta.detach().clone()
            with torch.no_grad():
                delta.zero_()
                use_shift[0] = False
                try:
                    nll, logp_kl = losses(True)
                finally:
                    delta.copy_(keep)
                    use_shift[0] = shift is not None
            return _agree(nll, logp_kl, nll0, logp_kl0, base.dtype, active)

        def first_losses() -> tuple[torch.Tensor, torch.Tensor]:
            """The first step's losses, checking that the cached prefix reproduces the clean forward; on a
            mismatch or an error, full prompts, then (for a model whose layer loop cannot take stand-ins) full
            forwards."""
            nonlocal prefix, buckets, skip_below
            at_zero = init is None and shift is None
            while True:
                try:
                    if prefix is not None and not at_zero and not cached_agrees():
                        raise _CacheMismatch
                    nll, logp_kl = losses(skip_below)
                    if prefix is not None and at_zero and not _agree(nll, logp_kl, nll0, logp_kl0, base.dtype,
                                                                                active):
                        raise _CacheMismatch
                    return nll, logp_kl
                except ZuFastError:
                    raise
                except Exception as e:
                    if prefix is not None:  # the model does not run from a cached prefix as assumed: full prompts
                        prefix = None
                        buckets = full.buckets(active, cfg.targets.length_buckets)
                    elif skip_below:
                        warnings.warn(f"skipping the layers below {layer} failed ({e!r}); running full forwards",
                                      stacklevel=2)
                        skip_below = False
                    else:
                        raise

        skip_below = True
        bar = tqdm(total=cfg.targets.steps, desc=f"zu_fast {desc}", disable=not progress, leave=False)
        try:
            for it in range(cfg.targets.steps if bool(active.any()) else 0):
                nll, logp_kl = first_losses() if it == 0 else losses(skip_below)
                if kl_init is None and shift is not None:
                    # the KL term compares with the clean model (δ = 0): the clean forward's distribution
                    kl_init = logp_kl0.to(logp_kl.device)
                if kl_init is None:
                    kl_init = logp_kl.detach()  # the first step forwards every active request
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
                    buckets = full.buckets(active, cfg.targets.length_buckets, prefix)  # converged requests leave
        finally:
            bar.close()
    if init_loss is None:
        raise ZuFastError("the target optimisation ran no step (v_num_grad_steps must be ≥ 1)")
    total = delta.detach() + shift if shift is not None else delta.detach()
    return DeltaResult(total, h_init, init_loss.cpu(), final_loss.cpu(), steps.cpu(), final_nll.cpu(),
                       final_kl.cpu())


class _CacheMismatch(Exception):
    """The first step through the cached prefix did not reproduce the clean forward."""


def _head_logprobs(model, cfg: UnlearnConfig, head: _HeadInput, loss_out: _KeepOutput | None, tgt_seq, tgt_pos,
                   kl_seq, kl_pos) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probabilities at the target positions  # [P', vocab] (from the model's logits, or from ln_f of the
    loss layer's output: the reference's v_loss_layer below the top) and at the KL prompts' subjects [n', vocab]."""
    if loss_out is None:
        logits_t = head.logits_at(tgt_seq, tgt_pos)  # [P', vocab]
    else:
        h = loss_out.value[tgt_seq, tgt_pos]
        logits_t = head.head(get_module(model, cfg.locate.final_norm)(h)).float()
    return torch.log_softmax(logits_t, -1), torch.log_softmax(head.logits_at(kl_seq, kl_pos), -1)


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
