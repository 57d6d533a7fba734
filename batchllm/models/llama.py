"""One decoder for the Llama family, keyed by the HF config: Llama 2/3/3.1 (rope scaling), Mistral, SmolLM2,
Qwen2/2.5 (q/k/v bias, tied embeddings) and Qwen3 (per-head q/k RMSNorm). GQA throughout.

Inputs are flat (all tokens of all scheduled sequences): input_ids/positions [num_tokens]. Weights use HF
names; q/k/v and gate/up are packed into one matmul each at load.
"""
import torch
from torch import nn

from batchllm.layers import fused
from batchllm.layers.attention import AttentionMetadata, PagedAttention
from batchllm.layers.linear import MergedLinear, can_pack, pack_weight, packed_linear
from batchllm.layers.norm import RMSNorm
from batchllm.layers.rotary import RotaryEmbedding
from batchllm.quant.awq import layer_group_size


class Attention(nn.Module):
    def __init__(self, config):
        super().__init__()
        h = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = getattr(config, "num_key_value_heads", None) or self.num_heads
        self.head_dim = getattr(config, "head_dim", None) or h // self.num_heads
        qkv_bias = config.model_type == "qwen2" or bool(getattr(config, "attention_bias", False))
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        awq = layer_group_size(config)
        self.qkv_proj = MergedLinear(h, {"q_proj": self.q_size, "k_proj": self.kv_size, "v_proj": self.kv_size},
                                     bias=qkv_bias, awq_group_size=awq)
        self.o_proj = MergedLinear(self.q_size, {"o_proj": h}, bias=bool(getattr(config, "attention_bias", False)),
                                   awq_group_size=awq)
        self.qk_norm = config.model_type == "qwen3"
        if self.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.attn = PagedAttention(self.num_heads, self.num_kv_heads, self.head_dim, self.head_dim**-0.5)

    def project(self, rope, x):
        """x: [n, hidden] -> (qk: [n, num_heads + num_kv_heads, head_dim] with rotary applied, v: [n, num_kv_heads,
        head_dim]): everything before the attention kernel."""
        qkv = self.qkv_proj(x)
        n = qkv.shape[0]
        qk = qkv[:, : self.q_size + self.kv_size].view(n, self.num_heads + self.num_kv_heads, self.head_dim)
        v = qkv[:, self.q_size + self.kv_size :].view(n, self.num_kv_heads, self.head_dim)
        if self.qk_norm:
            qk = torch.cat((self.q_norm(qk[:, : self.num_heads]), self.k_norm(qk[:, self.num_heads :])), dim=1)
        return fused.rotary(qk, *rope), v  # q and k heads in one pass

    def attend(self, qk, v, meta: AttentionMetadata, out=None):
        """The paged attention kernel (and the cache write) on project's output -> [n, num_heads, head_dim]."""
        return self.attn(qk[:, : self.num_heads], qk[:, self.num_heads :], v, meta, out=out)

    def forward(self, rope, x, meta: AttentionMetadata):
        return self.o_proj(self.attend(*self.project(rope, x), meta).reshape(-1, self.q_size))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        i, bias = config.intermediate_size, bool(getattr(config, "mlp_bias", False))
        awq = layer_group_size(config)
        self.gate_up_proj = MergedLinear(config.hidden_size, {"gate_proj": i, "up_proj": i}, bias=bias,
                                         awq_group_size=awq)
        self.down_proj = MergedLinear(i, {"down_proj": config.hidden_size}, bias=bias, awq_group_size=awq)

    def forward(self, x):
        return self.down_proj(fused.silu_and_mul(self.gate_up_proj(x)))


class DecoderLayer(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.self_attn = Attention(config)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def pre(self, rope, x, residual):
        """Up to the attention kernel. x: this layer's input before its residual add; residual: the stream so far
        (None at layer 0) -> (qk, v, residual)."""
        if residual is None:
            x, residual = self.input_layernorm(x), x
        else:
            x, residual = self.input_layernorm(x, residual)
        return *self.self_attn.project(rope, x), residual

    def post(self, o, residual):
        """After the attention kernel. o: its output [n, num_heads, head_dim] -> (the layer's output before its
        residual add, residual)."""
        x = self.self_attn.o_proj(o.reshape(o.shape[0], -1))
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x), residual

    def forward(self, rope, x, residual, meta):
        qk, v, residual = self.pre(rope, x, residual)
        return self.post(self.self_attn.attend(qk, v, meta), residual)


class Model(nn.Module):
    def __init__(self, config, max_positions: int):
        super().__init__()
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.rotary = RotaryEmbedding(config, head_dim, max_positions)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def embed(self, input_ids, positions):
        """-> (token embeddings, the step's rotary cos/sin, looked up once for all layers)."""
        x = self.embed_tokens(input_ids)
        return x, self.rotary.cos_sin(positions, x.dtype)

    def forward(self, input_ids, positions, meta):
        x, rope = self.embed(input_ids, positions)
        residual = None
        for layer in self.layers:
            x, residual = layer(rope, x, residual, meta)
        return self.norm(x, residual)[0]


class LlamaForCausalLM(nn.Module):
    # HF module name -> (our packed module, shard)
    packed = {"q_proj": ("qkv_proj", "q_proj"), "k_proj": ("qkv_proj", "k_proj"), "v_proj": ("qkv_proj", "v_proj"),
              "o_proj": ("o_proj", "o_proj"), "gate_proj": ("gate_up_proj", "gate_proj"),
              "up_proj": ("gate_up_proj", "up_proj"), "down_proj": ("down_proj", "down_proj")}

    def __init__(self, config, max_positions: int):
        super().__init__()
        self.config = config
        self.model = Model(config, max_positions)
        self.tie = bool(getattr(config, "tie_word_embeddings", False))
        if not self.tie:
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.logits_weight = None  # the lm_head weight in oneDNN's layout, after pack_for_cpu()

    def forward(self, input_ids, positions, meta: AttentionMetadata):
        """input_ids, positions: [num_tokens] -> hidden: [num_tokens, hidden_size]."""
        return self.model(input_ids, positions, meta)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [n, hidden_size] -> logits [n, vocab] in float32."""
        if self.logits_weight is not None:
            return packed_linear(hidden, self.logits_weight).float()
        w = self.model.embed_tokens.weight if self.tie else self.lm_head.weight
        return torch.nn.functional.linear(hidden, w).float()

    def pack_for_cpu(self) -> None:
        """Reorder every matmul weight for the CPU (layers/linear.py), after loading. A tied lm_head gets a
        packed copy (the embedding lookup keeps the original); an untied one is replaced."""
        for m in self.modules():
            if isinstance(m, MergedLinear):
                m.pack()
        w = self.model.embed_tokens.weight if self.tie else self.lm_head.weight
        if self.logits_weight is None and can_pack(w):
            self.logits_weight = pack_weight(w.data)
            if not self.tie:
                self.lm_head.weight = None

    def attention_layers(self) -> list[PagedAttention]:
        return [layer.self_attn.attn for layer in self.model.layers]

    @torch.no_grad()
    def load_weights(self, weights) -> None:
        """weights: iterable of (HF name, tensor). Every parameter must be filled exactly once."""
        params = dict(self.named_parameters())
        loaded = set()
        for name, tensor in weights:
            if "rotary_emb" in name:
                continue
            if name == "lm_head.weight" and self.tie:
                continue
            parts = name.split(".")
            if len(parts) >= 2 and parts[-2] in self.packed:
                module, shard = self.packed[parts[-2]]
                target = ".".join(parts[:-2] + [module, parts[-1]])
                if target not in params:
                    raise ValueError(f"unexpected weight {name}")
                mod = self.get_submodule(".".join(parts[:-2] + [module]))
                mod.load_shard(shard, parts[-1], tensor)
                loaded.add((target, shard))
            elif name in params:
                if params[name].shape != tensor.shape:
                    raise ValueError(f"weight {name}: shape {tuple(tensor.shape)}, expected {tuple(params[name].shape)}")
                params[name].copy_(tensor)
                loaded.add((name, None))
            else:
                raise ValueError(f"unexpected weight {name}")
        missing = []
        for pname, p in params.items():
            mod_name, _, leaf = pname.rpartition(".")
            mod = self.get_submodule(mod_name)
            shards = list(mod.shard_sizes) if isinstance(mod, MergedLinear) else [None]
            missing += [f"{pname}[{s}]" if s else pname for s in shards if (pname, s) not in loaded]
        if missing:
            raise ValueError(f"checkpoint lacks {len(missing)} weights, e.g. {missing[:3]}")
