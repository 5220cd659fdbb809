"""Shape-only models: random weights in the exact shapes of real checkpoints, built offline from dimensions kept here.

``sol.models.load("shape:llama-3.1-8b")`` builds a frozen, seeded, randomly initialised model with that checkpoint's
architecture and sizes, directly on the requested device and dtype (no download, no CPU copy of an 8B model). Its
outputs are meaningless; its step cost is the real model's, which is all ``sol bench`` measures — e.g. on a GPU
machine that cannot hold or fetch the weights. The tokenizer is the offline byte tokenizer (ids < 259).

The dimensions are those of each model's published ``config.json``; ``tests/test_models.py`` checks the embedded
ones against the packaged checkpoints' own configs.
"""
from __future__ import annotations

_LLAMA3_ROPE = dict(rope_type="llama3", low_freq_factor=1.0, high_freq_factor=4.0,
                    original_max_position_embeddings=8192)

SHAPES: dict[str, dict] = {
    "smollm2-135m": dict(model_type="llama", hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, vocab_size=49152, rope_theta=100000.0,
                         rms_norm_eps=1e-5, max_position_embeddings=8192, tie_word_embeddings=True),
    "qwen2.5-coder-0.5b": dict(model_type="qwen2", hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                               num_attention_heads=14, num_key_value_heads=2, vocab_size=151936, rope_theta=1e6,
                               rms_norm_eps=1e-6, max_position_embeddings=32768, tie_word_embeddings=True),
    "qwen2.5-coder-1.5b": dict(model_type="qwen2", hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                               num_attention_heads=12, num_key_value_heads=2, vocab_size=151936, rope_theta=1e6,
                               rms_norm_eps=1e-6, max_position_embeddings=32768, tie_word_embeddings=True),
    "llama-3.2-1b": dict(model_type="llama", hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=64, vocab_size=128256,
                         rope_theta=500000.0, rope_scaling=dict(factor=32.0, **_LLAMA3_ROPE), rms_norm_eps=1e-5,
                         max_position_embeddings=131072, tie_word_embeddings=True),
    "llama-3.2-3b": dict(model_type="llama", hidden_size=3072, intermediate_size=8192, num_hidden_layers=28,
                         num_attention_heads=24, num_key_value_heads=8, head_dim=128, vocab_size=128256,
                         rope_theta=500000.0, rope_scaling=dict(factor=32.0, **_LLAMA3_ROPE), rms_norm_eps=1e-5,
                         max_position_embeddings=131072, tie_word_embeddings=True),
    "llama-3.1-8b": dict(model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=128256,
                         rope_theta=500000.0, rope_scaling=dict(factor=8.0, **_LLAMA3_ROPE), rms_norm_eps=1e-5,
                         max_position_embeddings=131072, tie_word_embeddings=False),
}


def config(name: str):
    """The HF config of a shape (``SHAPES`` key), eager attention."""
    from transformers import LlamaConfig, Qwen2Config

    dims = dict(SHAPES[name])
    cls = {"llama": LlamaConfig, "qwen2": Qwen2Config}[dims.pop("model_type")]
    cfg = cls(**dims, bos_token_id=257, eos_token_id=258, pad_token_id=256)
    cfg._attn_implementation = "eager"
    return cfg


def build(name: str, dtype, device, seed: int = 0):
    """A randomly initialised model of shape ``name`` on ``device`` in ``dtype`` (weights ~ N(0, 0.02), norms 1)."""
    import torch
    from transformers import LlamaForCausalLM, Qwen2ForCausalLM

    cfg = config(name)
    cls = {"llama": LlamaForCausalLM, "qwen2": Qwen2ForCausalLM}[cfg.model_type]
    torch.manual_seed(seed)
    with torch.device(device):
        model = cls._from_config(cfg, dtype=dtype)
    return model
