"""The model runner: owns the device, the weights, the paged KV tensors, and turns one scheduled step into
sampled tokens. Builds the flat batch with numpy (no Python loop over tokens), runs the model, computes
logits only for the rows that sample. `execute` only queues the step; `fetch` is the one wait on the device,
so the next step can be launched first (asynchronous scheduling). A PENDING input token is read on the device
from the previous step's sampled tokens.
"""
import itertools
import logging
from dataclasses import dataclass

import numpy as np
import torch

from batchllm.engine.config import MAX_AUTO_SEQS, MIN_AUTO_SEQS, EngineConfig
from batchllm.engine.host_memory import to_device, to_host
from batchllm.engine.sampler import Sampler, logprob_dicts
from batchllm.engine.scheduler import SchedulerOutput
from batchllm.layers.attention import AttentionMetadata, make_backend
from batchllm.models.registry import model_class

log = logging.getLogger("batchllm.engine")


def kv_geometry(hf_config) -> tuple[int, int]:
    """(num_kv_heads, head_dim) of a model's attention."""
    heads = hf_config.num_attention_heads
    return (getattr(hf_config, "num_key_value_heads", None) or heads,
            getattr(hf_config, "head_dim", None) or hf_config.hidden_size // heads)


def kv_bytes_per_block(hf_config, block_size: int, dtype: torch.dtype) -> int:
    kv_heads, head_dim = kv_geometry(hf_config)
    return 2 * hf_config.num_hidden_layers * block_size * kv_heads * head_dim * dtype.itemsize


class ModelRunner:
    def __init__(self, config: EngineConfig, hf_config, weights, max_model_len: int):
        """weights: iterable of (HF name, tensor), or None for random weights (benchmark presets)."""
        self.config = config
        self.device = torch.device(config.resolved_device())
        self.dtype = config.resolved_dtype()
        self.kv_dtype = config.resolved_kv_cache_dtype()
        self.block_size = config.block_size
        self.max_model_len = max_model_len
        from batchllm.quant import resolve

        self.quantization = resolve(config.quantization, hf_config, random_weights=weights is None)
        if self.kv_dtype == torch.float8_e4m3fn:
            from batchllm.quant.fp8 import require_fp8_gpu

            require_fp8_gpu(self.device, "kv_cache_dtype fp8")
        if self.quantization == "fp8":
            from batchllm.quant import fp8

            fp8.check_device(self.device, self.dtype)
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
        if self.quantization == "fp8":
            from batchllm.quant import fp8

            fp8.quantize_model(self.model)
        if self.quantization == "awq":
            from batchllm.quant import awq

            awq.prepare_model(self.model, self.dtype, self.device)
        if self.device.type == "cpu":
            from batchllm.engine.host_memory import keep_freed_memory
            from batchllm.layers import fused

            keep_freed_memory()
            self.model.pack_for_cpu()
            fused.enable_cpu_kernels()
        self.hf_config = hf_config
        self.piecewise_tokens = self._piecewise_tokens()  # the largest step the piecewise graphs take (0: none)
        backend = {"cuda": "triton", "cpu": "cpu"}.get(self.device.type, "torch")
        if self.device.type == "cuda" and not config.enforce_eager:
            from batchllm.layers import fused

            fused.enable_compile()
        for layer in self.model.attention_layers():
            layer.backend = make_backend(backend, self.dtype, self.kv_dtype)
        self.sampler = Sampler(self.device, config.seed)
        self._prev_tokens: torch.Tensor | None = None  # the last step's sampled tokens, on the device
        self._prev_index: dict = {}  # request_id -> its row in _prev_tokens
        self.split_decodes = True  # mixed batches: decode rows in their own attention launch (False: one launch)
        if config.num_kv_blocks or config.max_num_seqs or self.device.type != "cuda":
            self.num_kv_blocks = config.num_kv_blocks or self._blocks_from_memory(self._seqs_bound())
            self.max_num_seqs = config.max_num_seqs_for(self.num_kv_blocks * self.block_size)
        else:  # the default cap follows the pool, and the pool leaves room for the cap's rows
            self.num_kv_blocks, self.max_num_seqs = size_pool(
                self._blocks_from_memory, lambda blocks: config.max_num_seqs_for(blocks * self.block_size),
                MIN_AUTO_SEQS, MAX_AUTO_SEQS)
        self._allocate_kv_cache()
        self.graphs = None
        self.piecewise = None
        if self.piecewise_tokens:
            from batchllm.engine.piecewise_graphs import PiecewiseGraphs

            self.piecewise = PiecewiseGraphs(self.model, self.device, self.dtype, self.piecewise_tokens)
            self.piecewise.capture()
        if self.device.type == "cuda" and not config.enforce_eager:
            from batchllm.engine.cuda_graphs import DecodeGraphs

            max_blocks = -(-max_model_len // self.block_size)
            self.graphs = DecodeGraphs(self.model, self.device, min(self.max_num_seqs, MAX_AUTO_SEQS), max_blocks,
                                       max_model_len)
            self.graphs.capture()
            kv_heads, _ = kv_geometry(hf_config)
            sms = torch.cuda.get_device_properties(self.device).multi_processor_count
            self.graphs.measure(min_rows=-(-sms // kv_heads))  # below: split-KV batches (kernels/attention.py)

    @torch.no_grad()
    def _random_init(self):
        g = torch.Generator(device=self.device).manual_seed(self.config.seed)
        for name, p in self.model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif p.is_floating_point() and not name.endswith(".scales"):
                p.normal_(0.0, 0.02, generator=g)
        if self.quantization == "awq":
            from batchllm.quant import awq

            awq.random_init(self.model, g)

    def _piecewise_tokens(self) -> int:
        if self.device.type != "cuda" or self.config.enforce_eager or not self.config.piecewise_graphs:
            return 0
        from batchllm.engine.piecewise_graphs import matmul_params_per_layer, max_piece_tokens

        return max_piece_tokens(matmul_params_per_layer(self.hf_config), self.config.token_budget(),
                                fp8=self.quantization == "fp8")

    def _blocks_from_memory(self, rows: int) -> int:
        """KV blocks that fit beside the weights and the peak of a step sampling `rows` rows."""
        per_block = kv_bytes_per_block(self.hf_config, self.block_size, self.kv_dtype)
        if self.device.type == "cuda":
            peak = self._profile_peak_memory(rows)
            free, total = torch.cuda.mem_get_info(self.device)
            others = total - free - torch.cuda.memory_reserved(self.device)  # other processes, CUDA context
            budget = total * self.config.gpu_memory_utilization - others - peak - (256 << 20)  # graphs, slack
            if self.piecewise_tokens:
                from batchllm.engine.piecewise_graphs import buffer_bytes

                budget -= buffer_bytes(self.hf_config, self.piecewise_tokens, self.dtype)
        else:
            budget = self.config.cpu_kv_cache_gib * 2**30
        # no more than enough for max_num_seqs full-length sequences
        want = self._seqs_bound() * -(-self.max_model_len // self.block_size)
        n = int(min(budget // per_block, want))
        if n < -(-self.max_model_len // self.block_size) and n < 16:
            raise RuntimeError(f"KV cache: room for only {n} blocks; lower max_model_len or free memory")
        return n

    def _seqs_bound(self) -> int:
        """max_num_seqs before the pool is sized: the user's, else the largest the default may choose."""
        return self.config.max_num_seqs or MAX_AUTO_SEQS

    @torch.inference_mode()
    def _profile_peak_memory(self, rows: int) -> int:
        """Peak bytes of one full-budget step (weights included): a forward over max_num_batched_tokens tokens
        with a throwaway KV cache, logits and sampling for `rows` rows (max_num_seqs). The step is mixed (decode rows,
        then prefill chunks), so it also compiles the attention kernels a mixed step takes, before any timing."""
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        tokens = self.config.token_budget()
        q_lens, num_decodes = profile_q_lens(tokens, max(1, min(rows, tokens // 2)))
        num_seqs = len(q_lens)
        blocks = -(-q_lens // self.block_size)
        kv_heads, head_dim = kv_geometry(self.hf_config)
        cache = torch.empty((int(blocks.sum()), self.block_size, kv_heads, head_dim), dtype=self.kv_dtype,
                            device=self.device)
        for layer in self.model.attention_layers():
            layer.key_cache = layer.value_cache = cache
        table = np.zeros((num_seqs, int(blocks.max())), dtype=np.int32)
        starts = np.concatenate([[0], np.cumsum(blocks)[:-1]])
        for i in range(num_seqs):
            table[i, : blocks[i]] = np.arange(starts[i], starts[i] + blocks[i])
        qsl = np.concatenate([[0], np.cumsum(q_lens)])
        positions = np.arange(tokens) - np.repeat(qsl[:-1], q_lens)
        row = np.repeat(np.arange(num_seqs), q_lens)
        slots = self._slots(table, row, positions)
        dev = self.device
        meta = AttentionMetadata(
            query_start_loc=torch.tensor(qsl, dtype=torch.int32, device=dev),
            seq_lens=torch.tensor(q_lens, dtype=torch.int32, device=dev),
            block_table=torch.tensor(table, device=dev), slot_mapping=torch.tensor(slots, device=dev),
            max_query_len=int(q_lens.max()), max_seq_len=int(q_lens.max()),
            num_decodes=num_decodes if self.split_decodes else 0)
        ids = torch.randint(0, self.hf_config.vocab_size, (tokens,), device=dev)
        hidden = self.model(ids, torch.tensor(positions, device=dev), meta)
        logits = self.model.compute_logits(hidden[: min(rows, tokens)])
        logits.sort(dim=-1)  # top-k/top-p sampling sorts the logits
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated(self.device)
        del cache, hidden, logits, meta
        for layer in self.model.attention_layers():
            layer.key_cache = layer.value_cache = None
        torch.cuda.empty_cache()
        return peak

    def _allocate_kv_cache(self):
        kv_heads, head_dim = kv_geometry(self.hf_config)
        shape = (self.num_kv_blocks, self.block_size, kv_heads, head_dim)
        self.kv_caches = []
        # zeros, not empty: attention reads padded slots past a sequence's end with weight 0, and 0 * NaN
        # from uninitialised memory would be NaN
        for layer in self.model.attention_layers():
            key_shape = layer.backend.key_cache_shape(*shape)
            layer.key_cache = _zeros(key_shape, self.kv_dtype, self.device)
            layer.value_cache = _zeros(shape, self.kv_dtype, self.device)
            self.kv_caches.append((layer.key_cache, layer.value_cache))

    # -- one step ------------------------------------------------------------------------------
    def _slots(self, block_table: np.ndarray, row: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """Cache slot of each token: its sequence's (row's) block for the position, times block_size, plus offset."""
        blocks = block_table[row, positions // self.block_size].astype(np.int64)
        return blocks * self.block_size + positions % self.block_size

    def _graphable(self, out: SchedulerOutput) -> bool:
        return (len(out.scheduled) <= self.graphs.sizes[-1]
                and all(n == 1 and r.num_computed_tokens + 1 == r.num_tokens for r, n in out.scheduled))

    def _pending_inputs(self, reqs, last_index: np.ndarray):
        """Inputs that are the previous step's sampled tokens, still on the device (asynchronous scheduling):
        -> (their indices in this step's input_ids, the tokens from the previous step's output) or None."""
        dst = [i for i, r in enumerate(reqs) if r.has_pending]
        if not dst:
            return None
        src = [self._prev_index[reqs[i].request_id] for i in dst]
        dst_t = to_device(last_index[dst], self.device, torch.int64)
        src_t = to_device(np.array(src, dtype=np.int64), self.device)
        return dst_t, self._prev_tokens[src_t]

    def _decode_with_graph(self, out: SchedulerOutput):
        reqs = [r for r, _ in out.scheduled]
        n = len(reqs)
        positions = np.fromiter((r.num_computed_tokens for r in reqs), dtype=np.int64, count=n)
        input_ids = np.fromiter((r.token_ids[-1] for r in reqs), dtype=np.int64, count=n)
        block_table = _block_table(reqs)
        slot_mapping = self._slots(block_table, np.arange(n), positions)
        pending = self._pending_inputs(reqs, np.arange(n))
        hidden = self.graphs.run(input_ids, positions, slot_mapping, positions + 1, block_table, pending)
        return hidden, torch.arange(n, device=self.device), np.ones(n, dtype=bool)

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
        block_table = _block_table(reqs)
        row = np.repeat(np.arange(len(reqs)), q_lens)
        slot_mapping = self._slots(block_table, row, positions)
        # rows that reach the end of their tokens sample a next token
        sample = seq_lens == np.fromiter((r.num_tokens for r in reqs), dtype=np.int64, count=len(reqs))
        logits_indices = qsl[1:][sample] - 1

        def t(a, dtype):
            return to_device(a, self.device, dtype)

        meta = AttentionMetadata(
            query_start_loc=t(qsl, torch.int32), seq_lens=t(seq_lens, torch.int32),
            block_table=t(block_table, torch.int32), slot_mapping=t(slot_mapping, torch.int64),
            max_query_len=int(q_lens.max()), max_seq_len=int(seq_lens.max()),
            num_decodes=_leading_ones(q_lens) if self.split_decodes else 0)
        input_ids_t = t(input_ids, torch.int64)
        pending = self._pending_inputs(reqs, qsl[1:] - 1)
        if pending is not None:
            input_ids_t[pending[0]] = pending[1]
        return input_ids_t, t(positions, torch.int64), meta, t(logits_indices, torch.int64), sample

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput) -> "ModelRunnerOutput":
        """Queue one step on the device and return without waiting for it: the sampled tokens (and logprobs)
        are copied to the host behind the step's kernels; `fetch` waits for them."""
        if self.graphs is not None and self._graphable(out):
            hidden, logits_indices, sample = self._decode_with_graph(out)
        else:
            input_ids, positions, meta, logits_indices, sample = self._prepare(out)
            if self.piecewise is not None and input_ids.shape[0] <= self.piecewise.sizes[-1]:
                hidden = self.piecewise.run(input_ids, positions, meta)
            else:
                hidden = self.model(input_ids, positions, meta)
        reqs = [out.scheduled[i][0] for i in np.flatnonzero(sample)]
        self._prev_tokens, self._prev_index = None, {}
        if not reqs:
            return ModelRunnerOutput([], None, None, None)
        logits = self.model.compute_logits(hidden[logits_indices])
        tokens, logprobs = self.sampler(logits, reqs)
        self._prev_tokens = tokens
        self._prev_index = {r.request_id: i for i, r in enumerate(reqs)}
        if self.device.type != "cuda":
            return ModelRunnerOutput(reqs, tokens, logprobs, None)
        host = [to_host(x) for x in (tokens, *(logprobs or ()))]
        ready = torch.cuda.Event()
        ready.record()
        return ModelRunnerOutput(reqs, host[0], tuple(host[1:]) or None, ready)

    @staticmethod
    def fetch(result: "ModelRunnerOutput") -> tuple[list[int], list[dict | None]]:
        """Wait for a step's results: (sampled token, logprob dict or None) for each row that samples, in
        batch order. The step's one wait on the device."""
        if result.ready is not None:
            result.ready.synchronize()
        if result.tokens is None:
            return [], []
        tokens = result.tokens.tolist()
        if result.logprobs is None:
            return tokens, [None] * len(tokens)
        return tokens, logprob_dicts(result.logprobs, tokens, result.reqs)


@dataclass
class ModelRunnerOutput:
    """A launched step's results on their way to the host: one sampled token per row that samples."""
    reqs: list  # the requests that sample, in batch order
    tokens: torch.Tensor | None  # [len(reqs)] int64, on the host (pinned) once `ready` has passed
    logprobs: tuple | None  # Sampler._logprobs' tensors, on the host likewise
    ready: object  # torch.cuda.Event recorded after the copies, or None on the CPU


def _zeros(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """torch.zeros, but on the CPU from calloc (numpy), whose large blocks are fresh pages that the OS zeroes on
    first touch: a 4 GB CPU KV pool costs no startup time and only the memory its used blocks touch."""
    if device.type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    nbytes = int(np.prod(shape)) * torch.empty((), dtype=dtype).element_size()
    return torch.from_numpy(np.zeros(nbytes, dtype=np.uint8)).view(dtype).view(shape)


def size_pool(blocks_for_rows, cap_for_blocks, lo: int, hi: int) -> tuple[int, int]:
    """(KV blocks, max_num_seqs) when the cap follows the pool and the pool leaves room for the cap's rows: the
    start-up step samples logits for them (~4.6 MB a row at llama3's 128k vocabulary, measured on an H100).
    Measured at `lo` rows (the smallest cap); more rows only shrink the pool, so the cap that pool gives is the
    most there can be. If that is above `lo`, measured again there, and between the two the pool is linear in
    the rows: the cap is the largest that the pool left beside its own rows supports, within lo..hi."""
    blocks = blocks_for_rows(lo)
    top = min(hi, cap_for_blocks(blocks))
    if top <= lo:
        return blocks, cap_for_blocks(blocks)
    per_row = max(0.0, (blocks - blocks_for_rows(top)) / (top - lo))  # blocks that one sampled row costs

    def pool(rows):
        return int(blocks - (rows - lo) * per_row)

    seqs = lo
    while seqs < top and cap_for_blocks(pool(seqs + 1)) >= seqs + 1:
        seqs += 1
    return pool(seqs), seqs


def profile_q_lens(tokens: int, num_seqs: int) -> tuple[np.ndarray, int]:
    """Query lengths of the profiling step, `tokens` in all over `num_seqs` sequences: the first half are decode
    rows (one token each) when the rest can still take >= 2 tokens each, then prefill chunks sharing the rest.
    -> (q_lens, number of decode rows)."""
    num_decodes = num_seqs // 2
    if tokens - num_decodes < 2 * (num_seqs - num_decodes):
        num_decodes = 0
    rest = num_seqs - num_decodes
    per = (tokens - num_decodes) // rest
    q_lens = np.ones(num_seqs, dtype=np.int64)
    q_lens[num_decodes:] = per
    q_lens[-1] += tokens - num_decodes - per * rest
    return q_lens, num_decodes


def _leading_ones(q_lens: np.ndarray) -> int:
    """How many rows at the front have query_len 1 (the scheduler puts decode rows first)."""
    other = np.flatnonzero(q_lens != 1)
    return int(other[0]) if len(other) else len(q_lens)


def _block_table(reqs) -> np.ndarray:
    """[num_seqs, max blocks] int32 from each request's block ids, zero-padded. Each request keeps a numpy
    copy of its ids, rebuilt only when the list grows (every block_size tokens) or is replaced (preemption)."""
    width = max(len(r.block_ids) for r in reqs)
    table = np.zeros((len(reqs), width), dtype=np.int32)
    for i, r in enumerate(reqs):
        ids = r.block_ids
        cached = getattr(r, "_block_np", None)
        if cached is None or cached[0] is not ids or len(cached[1]) != len(ids):
            cached = r._block_np = (ids, np.array(ids, dtype=np.int32))
        table[i, : len(ids)] = cached[1]
    return table
