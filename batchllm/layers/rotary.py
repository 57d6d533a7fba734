"""Rotary position embedding (HF's rotate-half layout) with a precomputed cos/sin cache.

Frequencies come from transformers' own rope functions for scaled variants (llama3, yarn, linear, ...), so
they match the reference exactly.
"""
import torch
from torch import nn


def rope_parameters(config) -> dict:
    params = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    params.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    params.setdefault("rope_type", params.get("type", "default"))
    return params


def inv_freq_and_scaling(config, head_dim: int) -> tuple[torch.Tensor, float]:
    params = rope_parameters(config)
    if params["rope_type"] == "default":
        base = params["rope_theta"]
        exps = torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim
        return 1.0 / (base**exps), 1.0
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    inv_freq, scaling = ROPE_INIT_FUNCTIONS[params["rope_type"]](config, "cpu")
    return inv_freq.float(), float(scaling)


class RotaryEmbedding(nn.Module):
    def __init__(self, config, head_dim: int, max_positions: int):
        super().__init__()
        # inv_freq on the CPU (as HF does); the table on the model's device (as HF's forward does)
        inv_freq, scaling = inv_freq_and_scaling(config, head_dim)
        device = torch.get_default_device()
        inv_freq = inv_freq.to(device)
        freqs = torch.arange(max_positions, dtype=torch.float32, device=device)[:, None] * inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)  # [max_positions, head_dim]
        self.register_buffer("cos", emb.cos() * scaling, persistent=False)
        self.register_buffer("sin", emb.sin() * scaling, persistent=False)

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype):
        """positions: [num_tokens] -> cos, sin: [num_tokens, 1, head_dim], looked up once per step for all layers.

        sin carries rotate-half's sign (-sin on the first half), so that apply() needs one roll, no cat/neg.
        """
        cos = self.cos[positions].to(dtype).unsqueeze(1)
        sin = self.sin[positions].to(dtype).unsqueeze(1)
        half = sin.shape[-1] // 2
        sin = torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)
        return cos, sin
