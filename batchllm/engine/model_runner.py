"""The model runner: owns the device, the weights, the paged KV tensors, and turns one scheduled step into
sampled tokens. Builds the flat batch with numpy (no Python loop over tokens), runs the model, computes
logits only for the rows that sample, and syncs with the host once per step.
"""
import itertools
import logging

import numpy as np
import torch

from batchllm.engine.config import EngineConfig
from batchllm.engine.sampler import Sampler
from batchllm.engine.scheduler import SchedulerOutput
from batchllm.layers.attention import AttentionMetadata, make_backend
from batchllm.models.registry import model_class

log = logging.getLogger("batchllm.engine")


def kv_bytes_per_block(hf_config, block_size: int, dtype: torch.dtype) -> int:
    heads = hf_config.num_attention_heads
    kv_heads = getattr(hf_config, "num_key_value_heads", None) or heads
    head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // heads
    elt = torch.empty((), dtype=dtype).element_size()
    return 2 * hf_config.num_hidden_layers * block_size * kv_heads * head_dim * elt


class ModelRunner:
    def __init__(self, config: EngineConfig, hf_config, weights, max_model_len: int):
        """weights: iterable of (HF name, tensor), or None for random weights (benchmark presets)."""
        self.config = config
        self.device = torch.device(config.resolved_device())
        self.dtype = config.resolved_dtype()
        self.block_size = config.block_size
        self.max_model_len = max_model_len
        default = torch.get_default_dtype()
        torch.set_default_dtype(self.dtype)
        try:
            with torch.device(self.device):
                self.model = model_class(hf_config)(hf_config, max_model_len)
        finally:
            torch.set_default_dtype(default)
        if weights is None:
            self._random_init()
        else:
            self.model.load_weights(weights)
        self.model.eval()
        self.hf_config = hf_config
        self.num_kv_blocks = config.num_kv_blocks or self._blocks_from_memory()
        self._allocate_kv_cache()
        backend = "triton" if self.device.type == "cuda" else "torch"
        for layer in self.model.attention_layers():
            layer.backend = make_backend(backend)
        self.sampler = Sampler(self.device, config.seed)

    @torch.no_grad()
    def _random_init(self):
        g = torch.Generator(device=self.device).manual_seed(self.config.seed)
        for name, p in self.model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=g)

    def _blocks_from_memory(self) -> int:
        per_block = kv_bytes_per_block(self.hf_config, self.block_size, self.dtype)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            free, total = torch.cuda.mem_get_info(self.device)
            used_by_others = total - free
            budget = total * self.config.gpu_memory_utilization - used_by_others - self._activation_reserve()
        else:
            budget = self.config.cpu_kv_cache_gib * 2**30
        # no more than enough for max_num_seqs full-length sequences
        want = self.config.max_num_seqs * -(-self.max_model_len // self.block_size)
        n = int(min(budget // per_block, want))
        if n < -(-self.max_model_len // self.block_size) and n < 16:
            raise RuntimeError(f"KV cache: room for only {n} blocks; lower max_model_len or free memory")
        return n

    def _activation_reserve(self) -> int:
        """Peak activation memory of one full-budget step, measured by a profiling forward on CUDA."""
        tokens = self.config.token_budget()
        h = self.hf_config
        # hidden states, qkv, mlp intermediate and logits of the sampled rows; x4 for temporaries
        per_token = (h.hidden_size * 4 + h.intermediate_size * 3) * torch.empty((), dtype=self.dtype).element_size()
        logits = min(tokens, self.config.max_num_seqs) * h.vocab_size * 4 * 2
        return 4 * tokens * per_token + logits + (512 << 20)

    def _allocate_kv_cache(self):
        h = self.hf_config
        heads = h.num_attention_heads
        kv_heads = getattr(h, "num_key_value_heads", None) or heads
        head_dim = getattr(h, "head_dim", None) or h.hidden_size // heads
        shape = (self.num_kv_blocks, self.block_size, kv_heads, head_dim)
        self.kv_caches = []
        for layer in self.model.attention_layers():
            layer.key_cache = torch.empty(shape, dtype=self.dtype, device=self.device)
            layer.value_cache = torch.empty(shape, dtype=self.dtype, device=self.device)
            self.kv_caches.append((layer.key_cache, layer.value_cache))

    # -- one step ------------------------------------------------------------------------------
    def _prepare(self, out: SchedulerOutput):
        reqs = [r for r, _ in out.scheduled]
        q_lens = np.fromiter((n for _, n in out.scheduled), dtype=np.int64, count=len(reqs))
        starts = np.fromiter((r.num_computed_tokens for r in reqs), dtype=np.int64, count=len(reqs))
        seq_lens = starts + q_lens
        qsl = np.zeros(len(reqs) + 1, dtype=np.int64)
        np.cumsum(q_lens, out=qsl[1:])
        total = int(qsl[-1])
        input_ids = np.fromiter(
            itertools.chain.from_iterable(r.token_ids[s : s + n] for r, s, n in zip(reqs, starts, q_lens)),
            dtype=np.int64, count=total)
        positions = np.arange(total, dtype=np.int64) - np.repeat(qsl[:-1] - starts, q_lens)
        max_blocks = max(len(r.block_ids) for r in reqs)
        block_table = np.zeros((len(reqs), max_blocks), dtype=np.int32)
        for i, r in enumerate(reqs):
            block_table[i, : len(r.block_ids)] = r.block_ids
        row = np.repeat(np.arange(len(reqs)), q_lens)
        slot_mapping = block_table[row, positions // self.block_size].astype(np.int64) * self.block_size + (
            positions % self.block_size)
        # rows that reach the end of their tokens sample a next token
        sample = seq_lens == np.fromiter((r.num_tokens for r in reqs), dtype=np.int64, count=len(reqs))
        logits_indices = qsl[1:][sample] - 1

        def t(a, dtype):
            return torch.from_numpy(a).to(dtype=dtype).to(self.device, non_blocking=True)

        meta = AttentionMetadata(
            query_start_loc=t(qsl, torch.int32), seq_lens=t(seq_lens, torch.int32),
            block_table=t(block_table, torch.int32), slot_mapping=t(slot_mapping, torch.int64),
            max_query_len=int(q_lens.max()), max_seq_len=int(seq_lens.max()))
        return (t(input_ids, torch.int64), t(positions, torch.int64), meta, t(logits_indices, torch.int64),
                sample)

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput):
        """-> (one sampled token or None per scheduled request, logprob dict or None per request)."""
        input_ids, positions, meta, logits_indices, sample = self._prepare(out)
        hidden = self.model(input_ids, positions, meta)
        sampled = [None] * len(out.scheduled)
        logprobs = [None] * len(out.scheduled)
        if len(logits_indices) == 0:
            return sampled, logprobs
        logits = self.model.compute_logits(hidden[logits_indices])
        rows = np.flatnonzero(sample).tolist()
        reqs = [out.scheduled[i][0] for i in rows]
        tokens, lps = self.sampler(logits, reqs)
        for i, tok in zip(rows, tokens.tolist()):  # the step's one host sync
            sampled[i] = tok
        if lps is not None:
            for i, lp in zip(rows, lps):
                logprobs[i] = lp
        return sampled, logprobs
