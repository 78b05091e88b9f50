"""Optimisation steps over the suffix only: what lies before δ's token is computed once (docs/algorithm.md, Costs).

Steps 2 and 3 add δ at each prompt's subject last token s_i. By causality nothing at a position < s_i depends
on δ, in any layer: not the hidden states, not the attention keys and values. So one clean forward of the full
prompts keeps every layer's keys and values (the model's own KV cache), and each optimisation step runs only
the positions ≥ s_i — the **suffix**: the subject's last token, the rest of the prompt, the teacher-forced target.
On the small model that is 22% of the prompts' tokens (context templates sit in front of the subject).

Rows of one batch have different s_i. Their prefixes are right-aligned in one cache of length P = max s_i, the
slots in front masked out (left padding, as HF's batched generation does), and every suffix token gets its
position id s_i + k explicitly. The queries then see exactly the keys they saw in the full forward, at the same
rotary phases.

Nothing here assumes a model supports it: ``optimize_deltas`` compares its first step (δ = 0) computed this
way with the clean forward's log-probabilities and goes back to full-length steps when they differ or when
the model refuses a cache (``CacheUnsupported``).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch


class CacheUnsupported(Exception):
    """The model's forward takes no KV cache we know how to fill."""


def cache_kwarg(model) -> str:
    """The name under which ``model``'s forward takes a KV cache (``cache`` in recent transformers,
    ``past_key_values`` before)."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError) as e:
        raise CacheUnsupported(f"cannot read the forward's signature: {e}") from e
    for name in ("cache", "past_key_values"):
        if name in params:
            return name
    raise CacheUnsupported("the model's forward takes neither `cache` nor `past_key_values`")


def new_cache(model):
    """An empty dynamic KV cache for ``model`` (its layer types from the config where the class reads them)."""
    try:
        from transformers import DynamicCache
    except ImportError as e:  # pragma: no cover - transformers is a dependency
        raise CacheUnsupported(str(e)) from e
    try:
        return DynamicCache(config=model.config)
    except TypeError:  # older transformers: no config argument
        return DynamicCache()


def read_kv(cache, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values  # [batch, kv_heads, seq, head_dim] each, of ``layer`` in a filled dynamic cache."""
    layers = getattr(cache, "layers", None)
    if layers is not None:
        entry = layers[layer]
        k, v = getattr(entry, "keys", None), getattr(entry, "values", None)
    else:  # transformers < 4.56: parallel lists
        k, v = cache.key_cache[layer], cache.value_cache[layer]
    if not isinstance(k, torch.Tensor) or not isinstance(v, torch.Tensor) or k.dim() != 4:
        raise CacheUnsupported(f"layer {layer}'s cache entry is not a [batch, heads, seq, dim] tensor pair")
    return k, v


@dataclass
class PrefixKV:
    """Every running layer's keys and values from the clean forward of the full prompts."""

    kv: dict[int, tuple[torch.Tensor, torch.Tensor]]  # layer → (K, V)  # [S, kv_heads, T, head_dim]
    n_layers: int
    kwarg: str  # the forward's cache argument

    @classmethod
    def from_cache(cls, model, cache, layers: range, n_layers: int) -> PrefixKV:
        kv = {}
        for i in layers:
            k, v = read_kv(cache, i)
            kv[i] = (k.detach(), v.detach())
        return cls(kv, n_layers, cache_kwarg(model))

    def rows(self, sel: torch.Tensor, split: torch.Tensor) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """The prefixes of rows ``sel`` [B] (positions < ``split`` [B]), right-aligned in P = max(split) slots:
        layer → (K, V) # [B, kv_heads, P, head_dim]. The slots in front of a shorter prefix hold copies of
        real entries; the attention mask hides them."""
        p = max(int(split.max()), 1)
        slot = torch.arange(p, device=split.device)[None, :]  # [1, P]
        src = (slot - (p - split)[:, None]).clamp_min(0)  # [B, P] position in the full row; masked where < 0
        out = {}
        for i, (k, v) in self.kv.items():
            rows, at = sel.to(k.device), src.to(k.device)[:, None, :, None]
            # keys and values may differ in heads and width (MLA)
            out[i] = tuple(x[rows].gather(2, at.expand(-1, x.shape[1], -1, x.shape[3])) for x in (k, v))
        return out

    def fresh(self, model, prefix: dict[int, tuple[torch.Tensor, torch.Tensor]], batch: int, p: int):
        """A new cache holding ``prefix`` (from ``rows``) for the layers that run; a placeholder of the same
        length for the others (replaced by stand-ins, they never read it, but the mask is sized from the cache)."""
        cache = new_cache(model)
        for i in range(self.n_layers):
            if i in prefix:
                k, v = prefix[i]
            else:
                ref = next(iter(prefix.values()))[0]
                k = v = torch.zeros(batch, 1, p, 1, dtype=ref.dtype, device=ref.device)
            cache.update(k, v, i)
        return cache
