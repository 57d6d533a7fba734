"""Random-weight model presets for the benchmark: real public shapes, no weights to download.

    config = presets.preset_config("llama3-8b")   # a transformers LlamaConfig (alias: get_preset)
    preset_names()                            # ["llama3-8b", "llama3.2-1b", "qwen3-0.6b"]

The numbers are those of the public config.json of each model (Meta-Llama-3-8B, Llama-3.2-1B,
Qwen3-0.6B), so FLOPs, KV-cache bytes per token and memory traffic match the real thing; only the
weights are random (the engine creates them on the device). Rope settings are passed the way
config.json spells them (rope_theta, rope_scaling); transformers 5 folds them into
`config.rope_parameters`.
"""
_LLAMA3_VOCAB = 128256

_PRESETS = {
    # meta-llama/Meta-Llama-3-8B: Llama 3.0, 8k context, plain RoPE (3.1 added the llama3 scaling).
    "llama3-8b": ("llama", dict(
        vocab_size=_LLAMA3_VOCAB, hidden_size=4096, intermediate_size=14336,
        num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
        max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=500000.0, rope_scaling=None,
        tie_word_embeddings=False, bos_token_id=128000, eos_token_id=128001,
        attention_bias=False, mlp_bias=False, hidden_act="silu",
    )),
    # meta-llama/Llama-3.2-1B: 128k context through llama3 rope scaling; tied embeddings.
    "llama3.2-1b": ("llama", dict(
        vocab_size=_LLAMA3_VOCAB, hidden_size=2048, intermediate_size=8192,
        num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8, head_dim=64,
        max_position_embeddings=131072, rms_norm_eps=1e-5, rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
        tie_word_embeddings=True, bos_token_id=128000, eos_token_id=128001,
        attention_bias=False, mlp_bias=False, hidden_act="silu",
    )),
    # Qwen/Qwen3-0.6B: head_dim 128 though hidden/heads = 64; q/k RMSNorm; tied embeddings.
    "qwen3-0.6b": ("qwen3", dict(
        vocab_size=151936, hidden_size=1024, intermediate_size=3072,
        num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8, head_dim=128,
        max_position_embeddings=40960, rms_norm_eps=1e-6, rope_theta=1000000.0, rope_scaling=None,
        tie_word_embeddings=True, bos_token_id=151643, eos_token_id=151645,
        attention_bias=False, hidden_act="silu", use_sliding_window=False, sliding_window=None,
        max_window_layers=28,
    )),
}


def preset_names() -> list[str]:
    return sorted(_PRESETS)


def get_preset(name: str):
    """The transformers config of preset `name`; ValueError naming the valid ones otherwise."""
    if name not in _PRESETS:
        raise ValueError(f"unknown preset {name!r}; valid: {', '.join(preset_names())}")
    model_type, kwargs = _PRESETS[name]
    if model_type == "qwen3":
        from transformers import Qwen3Config as cls
    else:
        from transformers import LlamaConfig as cls
    config = cls(**kwargs)
    config.architectures = ["Qwen3ForCausalLM" if model_type == "qwen3" else "LlamaForCausalLM"]
    config.name_or_path = f"preset:{name}"  # model_key for prefix-cache hashing, too
    return config


# The name the engine calls (batchllm/engine/llm.py); get_preset reads better elsewhere.
preset_config = get_preset
