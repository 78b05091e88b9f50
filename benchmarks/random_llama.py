"""Random-initialised Llama-shaped models for the speed and memory benchmarks (quality is meaningless on
them): the shapes, and a builder that initialises in the target dtype on the target device.
Used by e2e_unlearn.py and stats_overhead.py (run from benchmarks/ or with it on sys.path).
"""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from zu_fast.eval import synthetic, tinylm

SHAPES = {
    # name: (layers, d, d_ff, heads, kv_heads, vocab, edit layers)
    "tiny": (6, 128, 512, 4, 2, 2048, [2, 3, 4]),
    "llama-3.2-1b": (16, 2048, 8192, 32, 8, 128256, [8, 9, 10]),
    "llama-3.2-3b": (28, 3072, 8192, 24, 8, 128256, [16, 17, 18]),
    "llama-3.1-8b": (32, 4096, 14336, 32, 8, 128256, [19, 20, 21]),
}


def build(shape: str, device: str, dtype: torch.dtype):
    layers, d, d_ff, heads, kv, vocab, edit_layers = SHAPES[shape]
    world = synthetic.make_world()
    tok = tinylm.train_tokenizer(world.training_texts(), 1280)
    cfg = LlamaConfig(vocab_size=max(vocab, len(tok)), hidden_size=d, intermediate_size=d_ff, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=4096,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # initialise in the target dtype: no fp32 copy of an 8B model
    try:
        with torch.device(device):
            torch.manual_seed(0)
            model = LlamaForCausalLM(cfg).to(dtype).eval()
    finally:
        torch.set_default_dtype(default)
    return model, tok, world, edit_layers
