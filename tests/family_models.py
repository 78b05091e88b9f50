"""Small random models of every family zu_fast supports (and of a few it refuses), built from configs.

Hidden size 32, 3 decoder layers (the preset then edits [0, 1] with z at 1 and one layer above),
the shared locally trained tokenizer of ``tiny_models``. MoE families: 4 experts, top-2, experts
narrower than the hidden size (d_ff 24 < d 32, as in fine-grained MoEs), so the closed form's
narrow-expert path runs; DeepSeek keeps its first layer dense (a mixed dense + MoE edit).
"""

from __future__ import annotations

import torch
import transformers as T
from tiny_models import tokenizer

H, LAYERS, FF, EXPERT_FF = 32, 3, 64, 24

# family → the edited module template the preset must choose
DENSE = {
    "llama": "model.layers.{}.mlp.down_proj", "mistral": "model.layers.{}.mlp.down_proj",
    "qwen2": "model.layers.{}.mlp.down_proj", "qwen3": "model.layers.{}.mlp.down_proj",
    "gemma": "model.layers.{}.mlp.down_proj", "gemma2": "model.layers.{}.mlp.down_proj",
    "gemma3_text": "model.layers.{}.mlp.down_proj", "phi3": "model.layers.{}.mlp.down_proj",
    "olmo2": "model.layers.{}.mlp.down_proj", "gpt2": "transformer.h.{}.mlp.c_proj",
    "gptj": "transformer.h.{}.mlp.fc_out", "gpt_neox": "gpt_neox.layers.{}.mlp.dense_4h_to_h",
    "opt": "model.decoder.layers.{}.fc2", "falcon": "transformer.h.{}.mlp.dense_4h_to_h",
    "phi": "model.layers.{}.mlp.fc2",
}
MOE = {k: "model.layers.{}.mlp" for k in ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "gpt_oss", "deepseek_v3")}
NOT_CAUSAL = ("t5", "bart", "bert")


def _common() -> dict:
    tok = tokenizer()
    return dict(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id)


def build(family: str, layers: int = LAYERS, seed: int = 0, **kw) -> torch.nn.Module:
    """A randomly initialised model of ``family`` (eval mode, float32)."""
    c = _common()

    def cfg(cls, **defaults):  # the defaults below, overridden by build(..., **kw)
        return cls(**{**defaults, **c, **kw})
    attn = dict(num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    llama_like = dict(hidden_size=H, intermediate_size=FF, num_hidden_layers=layers, **attn)
    moe = dict(hidden_size=H, num_hidden_layers=layers, **attn)
    makers = {
        "llama": lambda: T.LlamaForCausalLM(cfg(T.LlamaConfig, **llama_like)),
        "mistral": lambda: T.MistralForCausalLM(cfg(T.MistralConfig, **llama_like)),
        "qwen2": lambda: T.Qwen2ForCausalLM(cfg(T.Qwen2Config, **llama_like)),
        "qwen3": lambda: T.Qwen3ForCausalLM(cfg(T.Qwen3Config, **llama_like, head_dim=8)),
        "gemma": lambda: T.GemmaForCausalLM(cfg(T.GemmaConfig, **llama_like, head_dim=8)),
        "gemma2": lambda: T.Gemma2ForCausalLM(cfg(T.Gemma2Config, **llama_like, head_dim=8)),
        "gemma3_text": lambda: T.Gemma3ForCausalLM(cfg(T.Gemma3TextConfig, **llama_like, head_dim=8)),
        "phi3": lambda: T.Phi3ForCausalLM(cfg(T.Phi3Config, **llama_like)),
        "olmo2": lambda: T.Olmo2ForCausalLM(cfg(T.Olmo2Config, **llama_like)),
        "gpt2": lambda: T.GPT2LMHeadModel(cfg(T.GPT2Config, n_embd=H, n_layer=layers, n_head=4, n_positions=256)),
        "gptj": lambda: T.GPTJForCausalLM(cfg(T.GPTJConfig, n_embd=H, n_layer=layers, n_head=4, rotary_dim=4,
                                                       n_positions=256)),
        "gpt_neox": lambda: T.GPTNeoXForCausalLM(cfg(T.GPTNeoXConfig, hidden_size=H, num_hidden_layers=layers,
                                                                 num_attention_heads=4, intermediate_size=FF,
                                                                 max_position_embeddings=256)),
        "opt": lambda: T.OPTForCausalLM(cfg(T.OPTConfig, hidden_size=H, num_hidden_layers=layers, num_attention_heads=4,
                                                    ffn_dim=FF, word_embed_proj_dim=H, max_position_embeddings=256)),
        "falcon": lambda: T.FalconForCausalLM(cfg(T.FalconConfig, hidden_size=H, num_hidden_layers=layers,
                                                             num_attention_heads=4)),
        "phi": lambda: T.PhiForCausalLM(cfg(T.PhiConfig, hidden_size=H, num_hidden_layers=layers, num_attention_heads=4,
                                                    intermediate_size=FF, max_position_embeddings=256)),
        "mixtral": lambda: T.MixtralForCausalLM(cfg(T.MixtralConfig, **moe, intermediate_size=EXPERT_FF,
                                                                num_local_experts=4, num_experts_per_tok=2)),
        "qwen2_moe": lambda: T.Qwen2MoeForCausalLM(cfg(T.Qwen2MoeConfig,
            **moe, intermediate_size=FF, moe_intermediate_size=EXPERT_FF, shared_expert_intermediate_size=48,
            num_experts=4, num_experts_per_tok=2)),
        "qwen3_moe": lambda: T.Qwen3MoeForCausalLM(cfg(T.Qwen3MoeConfig,
            **moe, head_dim=8, intermediate_size=FF, moe_intermediate_size=EXPERT_FF, num_experts=4,
            num_experts_per_tok=2)),
        "olmoe": lambda: T.OlmoeForCausalLM(cfg(T.OlmoeConfig, **moe, intermediate_size=EXPERT_FF, num_experts=4,
                                                          num_experts_per_tok=2)),
        "gpt_oss": lambda: T.GptOssForCausalLM(cfg(T.GptOssConfig,
            **moe, head_dim=8, intermediate_size=EXPERT_FF, num_local_experts=4, num_experts_per_tok=2,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0})),
        "deepseek_v3": lambda: T.DeepseekV3ForCausalLM(cfg(T.DeepseekV3Config,
            hidden_size=H, num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=4,
            max_position_embeddings=256, intermediate_size=FF, moe_intermediate_size=EXPERT_FF, n_routed_experts=4,
            num_experts_per_tok=2, n_shared_experts=1, n_group=1, topk_group=1, first_k_dense_replace=1,
            q_lora_rank=None, kv_lora_rank=16, qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=8,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0})),
        "t5": lambda: T.T5ForConditionalGeneration(cfg(T.T5Config, d_model=H, d_ff=FF, num_layers=2, num_heads=4,
                                                              d_kv=8, decoder_start_token_id=0)),
        "bart": lambda: T.BartForConditionalGeneration(cfg(T.BartConfig,
            d_model=H, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
            encoder_ffn_dim=FF, decoder_ffn_dim=FF, max_position_embeddings=256)),
        "bert": lambda: T.BertForMaskedLM(cfg(T.BertConfig, hidden_size=H, num_hidden_layers=2, num_attention_heads=4,
                                                       intermediate_size=FF, max_position_embeddings=256)),
    }
    torch.manual_seed(seed)
    return makers[family]().eval()
