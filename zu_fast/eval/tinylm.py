"""Train (once, cached) a small Llama on the synthetic world: the offline benchmark's test subject.

:func:`load_or_train` returns ``(model, tokenizer, world)``. The tokenizer is a byte-level BPE
trained with the ``tokenizers`` library on the world's text, wrapped as
``transformers.PreTrainedTokenizerFast``; it prepends ``<s>`` (BOS) like Llama tokenizers, has
``</s>`` as EOS (ZeroUnlearn's default neutral target) and a *distinct* ``<pad>`` token. It uses
``add_prefix_space=True`` (like SentencePiece Llama tokenizers) so a name is the same tokens at
the start of a sentence and in the middle.

The model is a ``transformers.LlamaForCausalLM`` (6 layers by default, so the method's usual
"3 consecutive layers + layers above z" shape exists: the preset edits [1, 2, 3], z at 3).
``model.config.zu_fast_model == "zu-tiny-llama"`` lets presets recognise it.

The same trainer trains on the species world (:mod:`zu_fast.eval.species`, for checking only): pass
``TinyLMConfig(world=SpeciesWorldConfig(), ...)`` (the named setups are in :mod:`zu_fast.eval.worlds`).
``tag_as_tiny=False`` leaves the ``zu_fast_model`` tag off, so ``for_model`` gives the generic family
defaults as on any model the project never saw; ``single_token_answers=False`` lets the BPE split the
answers as it learnt them. Both enter the cache key only when not at their default (True).

``TinyLMConfig(moe_experts=E)`` (off by default) trains a mixture-of-experts model instead: a
``transformers.MixtralForCausalLM`` with E experts of width ``moe_intermediate_size`` per layer, top
``moe_top_k`` routing and Mixtral's load-balancing loss, tagged ``"zu-tiny-mixtral"`` (the MoE
benchmark of issue 15). The MoE fields enter the cache key only when set, so the default model's key
and weights are what they were.

Cache: ``$ZU_FAST_CACHE`` or ``$XDG_CACHE_HOME/zu_fast`` or ``~/.cache/zu_fast``, then
``tinylm/<key>`` where key = sha256 of (world config, model/training config, CODE_VERSION).
Training writes into a temporary sibling directory which is renamed into place, so a crash or a
concurrent trainer never leaves a half-written model under the key.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..stats.store import cache_root
from .fact_world import FactWorld
from .species import SpeciesWorldConfig, make_species_world
from .synthetic import WorldConfig, make_world

# Bump when training code or data generation changes in a way that changes the weights.
CODE_VERSION = "tinylm-1"
MODEL_TAG = "zu-tiny-llama"
META_FILE = "zu_fast_tinylm.json"

BOS, EOS, PAD = "<s>", "</s>", "<pad>"


@dataclass
class TinyLMConfig:
    """World, architecture and training recipe of the tiny model. Part of the cache key."""

    world: WorldConfig | SpeciesWorldConfig = field(default_factory=WorldConfig)
    vocab_size: int = 1280
    hidden_size: int = 128
    num_layers: int = 6
    num_heads: int = 4
    # d_ff = 6·d (Llama uses ~3.5·d). The edit acts on down_proj's d_ff-wide keys: at 384 the keys
    # of different people overlapped enough that forgetting 10 facts cost 3–7 neighbour prompts;
    # at 768 the GD preset of the time met the acceptance on 16 of 16 record seeds, for +25% training time
    # (benchmarks/results/history.md, "A wider MLP", 2026-11-24; today's preset, with the target retry: 15 of 16).
    intermediate_size: int = 768
    max_position_embeddings: int = 256
    steps: int = 400
    batch_size: int = 32
    lr: float = 5e-3
    warmup_steps: int = 50
    weight_decay: float = 0.01
    # Training rows pack whole sentences up to this many tokens (see _batches).
    seq_len: int = 64
    seed: int = 0
    # Mixture of experts (0: the dense Llama above). E > 0: Mixtral, E experts per layer of width
    # moe_intermediate_size (0: intermediate_size), top-k routing, load-balancing loss weight moe_aux_loss.
    moe_experts: int = 0
    moe_top_k: int = 2
    moe_intermediate_size: int = 0
    moe_aux_loss: float = 0.01
    # Tag the model (config.zu_fast_model) as the project's small model, so UnlearnConfig.for_model
    # picks the zu-tiny preset. False: untagged, for_model gives the generic family defaults (the
    # species world's model: a check of the defaults on a model they were not tuned on).
    tag_as_tiny: bool = True
    # The tokenizer makes every answer of the world one token (the people world's " Lisbon"). False:
    # answers are tokenised as the BPE learnt them (mostly several tokens).
    single_token_answers: bool = True

    def to_dict(self) -> dict:
        d = asdict(self)
        d["world"] = self.world.to_dict()
        if not self.moe_experts:  # the dense model's cache key is the one it always had
            for k in _MOE_FIELDS:
                d.pop(k)
        for k in _DEFAULT_TRUE_FIELDS:  # absent = True: keys (and cached models) from before the option stay valid
            if d[k]:
                d.pop(k)
        return d

    def cache_key(self) -> str:
        blob = json.dumps({"config": self.to_dict(), "code": CODE_VERSION}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


_MOE_FIELDS = ("moe_experts", "moe_top_k", "moe_intermediate_size", "moe_aux_loss")
_DEFAULT_TRUE_FIELDS = ("tag_as_tiny", "single_token_answers")
MOE_MODEL_TAG = "zu-tiny-mixtral"


def model_dir(config: TinyLMConfig | None = None, cache_dir: str | os.PathLike | None = None) -> Path:
    """Where the model for ``config`` is (or will be) cached."""
    config = config or TinyLMConfig()
    return Path(cache_dir or cache_root()) / "tinylm" / config.cache_key()


# ---------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------


def train_tokenizer(texts: list[str], vocab_size: int, whole_words: Sequence[str] = ()):
    """Byte-level BPE on ``texts``, wrapped as a PreTrainedTokenizerFast (BOS prepended; pad != eos).

    ``whole_words`` (the world's answers) are made frequent in the tokenizer's corpus so that
    each becomes one token (" Lisbon"), while a small vocabulary keeps names multi-token.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD, BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    boost = [" ".join(whole_words)] * (500 if whole_words else 0)
    tk.train_from_iterator(list(texts) + boost, trainer=trainer)
    bos_id = tk.token_to_id(BOS)
    tk.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token=BOS, eos_token=EOS, pad_token=PAD, padding_side="right",
        model_max_length=1 << 30,
    )


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------


def _build_model(config: TinyLMConfig, vocab_size: int, tok):
    from transformers import LlamaConfig, LlamaForCausalLM

    if config.moe_experts:
        return _build_moe_model(config, vocab_size, tok)
    mc = LlamaConfig(**_shape(config, vocab_size, tok), intermediate_size=config.intermediate_size)
    torch.manual_seed(config.seed)
    model = LlamaForCausalLM(mc)
    if config.tag_as_tiny:
        model.config.zu_fast_model = MODEL_TAG
    return model


def _shape(config: TinyLMConfig, vocab_size: int, tok) -> dict:
    """The transformers config fields the dense model and its Mixtral variant share."""
    return dict(vocab_size=vocab_size, hidden_size=config.hidden_size, num_hidden_layers=config.num_layers,
                num_attention_heads=config.num_heads, num_key_value_heads=config.num_heads,
                max_position_embeddings=config.max_position_embeddings, bos_token_id=tok.bos_token_id,
                eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, tie_word_embeddings=False,
                attention_dropout=0.0)


def _build_moe_model(config: TinyLMConfig, vocab_size: int, tok):
    """The Mixtral variant: the dense model's shape with each MLP replaced by ``moe_experts`` experts."""
    from transformers import MixtralConfig, MixtralForCausalLM

    if not 1 <= config.moe_top_k <= config.moe_experts:
        raise ValueError(f"moe_top_k={config.moe_top_k} must be in 1..moe_experts={config.moe_experts}")
    mc = MixtralConfig(
        **_shape(config, vocab_size, tok),
        intermediate_size=config.moe_intermediate_size or config.intermediate_size,
        num_local_experts=config.moe_experts,
        num_experts_per_tok=config.moe_top_k,
        router_aux_loss_coef=config.moe_aux_loss,
        output_router_logits=True,  # training adds the load-balancing loss (off again once trained)
        sliding_window=None,
    )
    torch.manual_seed(config.seed)
    model = MixtralForCausalLM(mc)
    if config.tag_as_tiny:
        model.config.zu_fast_model = MOE_MODEL_TAG
    return model


def _batches(encoded: list[list[int]], config: TinyLMConfig, bos: int, eos: int, pad: int):
    """Endless stream of (input_ids [B, L], attention_mask [B, L], labels [B, L]); epochs reshuffle.

    Whole sentences are packed greedily into rows of at most ``seq_len`` tokens, each row
    ``<s> s1 s2 ... </s>``: almost no padding (CPU time is the budget), and facts are seen both
    right after BOS and after other text (ZeroUnlearn prefixes prompts with context templates).
    """
    rng = random.Random(f"tinylm-data-{config.seed}")
    while True:
        order = list(range(len(encoded)))
        rng.shuffle(order)
        rows: list[list[int]] = []
        cur = [bos]
        for j in order:
            s = encoded[j][: config.seq_len - 2]
            if len(cur) + len(s) + 1 > config.seq_len:
                rows.append(cur + [eos])
                cur = [bos]
            cur.extend(s)
        rows.append(cur + [eos])
        rng.shuffle(rows)
        for s in range(0, len(rows) - config.batch_size + 1, config.batch_size):
            chunk = rows[s : s + config.batch_size]
            length = max(len(x) for x in chunk)
            ids = torch.full((len(chunk), length), pad, dtype=torch.long)
            attn = torch.zeros_like(ids)
            for r, x in enumerate(chunk):
                ids[r, : len(x)] = torch.tensor(x)
                attn[r, : len(x)] = 1
            labels = ids.masked_fill(attn == 0, -100)
            yield ids, attn, labels


def build_world(config: WorldConfig | SpeciesWorldConfig) -> FactWorld:
    """The world a world config describes (people or species)."""
    if isinstance(config, SpeciesWorldConfig):
        return make_species_world(config)
    return make_world(config)


def encode_training_texts(tok, world: FactWorld) -> list[list[int]]:
    """Token ids of ``world.training_texts()`` (no BOS); the strangers' cut-off documents
    (``world.fragments()``) end with EOS, as a document that stops there would."""
    texts = world.training_texts()
    cut_off = set(world.fragments())
    encoded = tok(texts, add_special_tokens=False)["input_ids"]
    return [e + [tok.eos_token_id] if t in cut_off else e for t, e in zip(texts, encoded)]


def train(config: TinyLMConfig, world: FactWorld | None = None, *, progress: bool = True):
    """Train tokenizer and model from scratch (no caching). Returns ``(model, tok, world, info)``."""
    from tqdm.auto import tqdm

    world = world or build_world(config.world)
    texts = world.training_texts()
    t0, c0 = time.perf_counter(), time.process_time()
    # Tokenizer sees training texts only; held-out text may still use any byte (byte-level BPE).
    answers = sorted({o for r in world.relations for o in world.objects(r)}) if config.single_token_answers else []
    tok = train_tokenizer(texts, config.vocab_size, whole_words=answers)
    vocab = len(tok)
    model = _build_model(config, vocab, tok)
    model.train()
    encoded = encode_training_texts(tok, world)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=config.lr, betas=(0.9, 0.98),
    )

    def lr_at(step: int) -> float:  # linear warmup, cosine decay to 5%
        if step < config.warmup_steps:
            return (step + 1) / config.warmup_steps
        frac = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * frac))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    stream = _batches(encoded, config, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)
    old_threads = torch.get_num_threads()
    torch.set_num_threads(min(2, old_threads) if old_threads > 0 else 2)
    losses: list[float] = []
    seen_tokens = 0
    try:
        bar = tqdm(range(config.steps), desc=f"training tiny {'Mixtral' if config.moe_experts else 'Llama'}",
                   disable=not progress, leave=False)
        for _step in bar:
            ids, attn, labels = next(stream)
            seen_tokens += int(attn.sum())
            loss = model(input_ids=ids, attention_mask=attn, labels=labels, use_cache=False).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            losses.append(loss.item())
            if _step % 25 == 0:
                bar.set_postfix(loss=f"{sum(losses[-25:]) / len(losses[-25:]):.3f}")
    finally:
        torch.set_num_threads(old_threads)
    model.eval()
    if config.moe_experts:
        model.config.output_router_logits = False  # the load-balancing loss is for training only
    info = {
        "train_seconds": round(time.perf_counter() - t0, 1),
        # CPU time of this process: comparable across runs on a busy shared machine (wall ~ cpu/2
        # on 2 idle cores).
        "train_cpu_seconds": round(time.process_time() - c0, 1),
        "final_loss": round(sum(losses[-50:]) / max(1, len(losses[-50:])), 4),
        "n_params": sum(p.numel() for p in model.parameters()),
        "vocab_size": vocab,
        "n_training_texts": len(texts),
        "epochs": round(seen_tokens / max(1, sum(len(e) + 1 for e in encoded)), 2),
    }
    return model, tok, world, info


def _load(path: Path, config: TinyLMConfig):
    from transformers import LlamaForCausalLM, MixtralForCausalLM, PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast.from_pretrained(path)
    cls = MixtralForCausalLM if config.moe_experts else LlamaForCausalLM
    model = cls.from_pretrained(path, dtype=torch.float32)
    model.eval()
    return model, tok


def load_or_train(
    config: TinyLMConfig | None = None,
    *,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
):
    """The tiny model for ``config``: loaded from the cache, or trained (minutes on CPU) and cached.

    Returns ``(model, tokenizer, world)``; the model is float32, on CPU, in eval mode.
    """
    config = config or TinyLMConfig()
    world = build_world(config.world)
    final = model_dir(config, cache_dir)
    if not (final / META_FILE).exists():
        model, tok, world, info = train(config, world, progress=progress)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
        try:
            model.save_pretrained(tmp, safe_serialization=True)
            tok.save_pretrained(tmp)
            meta = {"config": config.to_dict(), "code_version": CODE_VERSION, "key": final.name, **info}
            try:  # record how well it learnt, for the report (cheap: a few hundred prompts)
                from ..metrics import evaluate

                meta["eval_records50"] = evaluate(model, tok, world.records(50), world.heldout_texts())
            except Exception as e:  # never lose a trained model over a report
                meta["eval_error"] = repr(e)
            # The meta file is written last: its presence marks a complete directory.
            (tmp / META_FILE).write_text(json.dumps(meta, indent=2))
            if final.exists() and not (final / META_FILE).exists():
                shutil.rmtree(final, ignore_errors=True)  # an incomplete leftover (never ours)
            try:
                os.rename(tmp, final)
            except OSError:
                # Another process finished first (same key = same weights): keep theirs.
                if not (final / META_FILE).exists():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    model, tok = _load(final, config)
    return model, tok, world


def load_meta(config: TinyLMConfig | None = None, cache_dir: str | os.PathLike | None = None) -> dict | None:
    """The cached model's metadata (config, training time, loss, eval), or None if not cached."""
    p = model_dir(config, cache_dir) / META_FILE
    return json.loads(p.read_text()) if p.exists() else None
