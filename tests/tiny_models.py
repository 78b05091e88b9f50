"""Tiny randomly initialised models + a tokenizer trained here (no downloads), for fast tests."""

from __future__ import annotations

import functools
import hashlib

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

WORDS = (
    "Alice Morvan Bob Kestrel Carla Dunmore Deniz Quill Edda Sorrel was born in Lisbon Oslo Lima Porto works "
    "for Acme Globex Initech plays the violin piano drums speaks French Dutch Greek The city where is a of and "
    "I You Because Therefore person people music company language sound filled hall every morning evening"
).split()


def corpus(n: int = 64, seed: int = 0) -> list[str]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        k = int(torch.randint(4, 14, (1,), generator=g))
        idx = torch.randint(0, len(WORDS), (k,), generator=g).tolist()
        out.append(" ".join(WORDS[i] for i in idx) + ".")
    return out


def word_corpus(n: int, seed: int = 1) -> list[str]:
    """``n`` short texts of WORDS from Python's own RNG (the same on every platform and torch version)."""
    import random

    rnd = random.Random(seed)
    return [" ".join(rnd.choice(WORDS) for _ in range(rnd.randint(4, 16))) + "." for _ in range(n)]


@functools.cache
def tokenizer() -> PreTrainedTokenizerFast:
    tk = Tokenizer(models.BPE(unk_token=None))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tk.train_from_iterator(corpus(200) + [" ".join(WORDS)], trainer)
    from tokenizers.processors import TemplateProcessing

    tk.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tk.token_to_id("<s>"))])
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def llama(layers: int = 4, hidden: int = 32, d_ff: int = 48, seed: int = 0, dtype=torch.float32):
    torch.manual_seed(seed)
    tok = tokenizer()
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=d_ff, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model = LlamaForCausalLM(cfg).to(dtype).eval()
    return model, tok


def gpt2(layers: int = 3, hidden: int = 32, seed: int = 0):
    torch.manual_seed(seed)
    tok = tokenizer()
    cfg = GPT2Config(vocab_size=len(tok), n_embd=hidden, n_layer=layers, n_head=4, n_positions=256,
                     bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    return GPT2LMHeadModel(cfg).eval(), tok


REQUESTS = [
    {"prompt": "{} was born in", "subject": "Alice Morvan", "target_true": "Lisbon"},
    {"prompt": "{} works for", "subject": "Bob Kestrel", "target_true": {"str": "Acme"}},
    {"prompt": "The city where {} was born is", "subject": "Carla Dunmore", "target_true": "Oslo"},
]


def param_hashes(model: torch.nn.Module) -> dict[str, str]:
    """SHA-256 of the bytes of every parameter and buffer."""
    out = {}
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        raw = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
        out[name] = hashlib.sha256(raw.tobytes()).hexdigest()
    return out
