"""Piecewise CUDA graphs for the steps that decode graphs cannot take: prefill chunks and mixed batches.

A forward is cut at its attention kernels: piece 0 embeds and runs layer 0 up to its attention, piece i runs
layer i-1 after its attention and layer i up to it, the last piece ends with the final norm. Each piece is a
CUDA graph per padded token count; attention (the cache write and the kernel, whose launch follows the batch's
sequences) runs eagerly between replays, from and into static buffers. A step then costs 3-4 launches a layer
(a replay, the cache write, one or two attention launches) instead of ~12 plus torch.compile's guards: on an H100 a qwen3-0.6b mixed step (256 decode rows + a 920-token
prompt) took 29.7 ms eager against 13.5 as a graph, while the GPU needs the same time for both (docs/benchmarks.md,
T68). Padded rows cost matmul work only: attention never reads or writes them.

Steps above the largest size run eagerly; there the kernels are long enough to hide their launches
(max_piece_tokens). llama3-8b's mixed steps (~800-1,300 tokens) gained nothing from graphs up to 4,096 tokens
(-1.6% end to end, the padding and the graphs' memory), qwen3-0.6b with 2,000 prompts +28% (T69, T70).
"""
import bisect

import torch

from batchllm.engine.model_runner import kv_geometry

HOST_S_PER_LAYER = 1.0e-3  # launching a layer eagerly: qwen3-0.6b's mixed step, 29.7 ms over 28 layers (T68)
MATMUL_FLOP_S = 700e12  # about a Hopper card's bf16 matmul rate (777-786 TFLOP/s peaks measured)


def matmul_params_per_layer(hf_config) -> int:
    """Weights one token multiplies in a decoder layer (QKV, O, gate/up, down), from the config: the count does
    not change when fp8 quantization replaces the parameters."""
    h, heads = hf_config.hidden_size, hf_config.num_attention_heads
    kv_heads, head_dim = kv_geometry(hf_config)
    return h * (heads + 2 * kv_heads) * head_dim + heads * head_dim * h + 3 * h * hf_config.intermediate_size


def max_piece_tokens(params_per_layer: int, token_budget: int, fp8: bool = False) -> int:
    """The largest step worth graphs: where one layer's matmuls take about as long as launching the layer
    eagerly (llama3-8b ~1,600 tokens in bf16, twice that with fp8 matmuls; qwen3-0.6b far above 4,096), within
    256..4,096 and the step budget."""
    breakeven = HOST_S_PER_LAYER * MATMUL_FLOP_S * (2 if fp8 else 1) / (2 * params_per_layer)
    return int(min(4096, token_budget, max(256, breakeven)))


def piece_sizes(max_tokens: int) -> list[int]:
    """Padded token counts: steps of 32 up to 256, 64 up to 2,048, 256 up to 4,096 (padding <= 12% at the small
    end, ~3% above), cut at max_tokens, which is always a size."""
    sizes = list(range(32, 256, 32)) + list(range(256, 2048, 64)) + list(range(2048, 4097, 256))
    return sorted({s for s in sizes if s < max_tokens} | {max_tokens})


def buffer_bytes(hf_config, max_tokens: int, dtype: torch.dtype) -> int:
    """What capturing up to max_tokens keeps: the static buffers and the largest piece's temporaries (the MLP's
    gate/up and SiLU-mul outputs, the QKV), an upper estimate for the KV pool's sizing."""
    h, heads = hf_config.hidden_size, hf_config.num_attention_heads
    kv_heads, head_dim = kv_geometry(hf_config)
    per_token = 3 * h + (2 * heads + 3 * kv_heads) * head_dim + 3 * hf_config.intermediate_size + 2 * head_dim
    return max_tokens * per_token * dtype.itemsize * 2


class PiecewiseGraphs:
    def __init__(self, model, device: torch.device, dtype: torch.dtype, max_tokens: int):
        """model: a LlamaForCausalLM (its inner Model's embed, layers' pre/post and attend, norm); dtype: its
        activations'."""
        self.m = model.model
        self.sizes = piece_sizes(max_tokens)
        self.pieces: dict[int, list] = {}  # size -> its pieces' replays, one more than there are layers
        self.num_replays = 0  # steps run through the graphs (tests and the bench read it)
        n = self.sizes[-1]
        attn = self.m.layers[0].self_attn
        z = dict(device=device, dtype=dtype)
        self.input_ids = torch.zeros(n, dtype=torch.int64, device=device)
        self.positions = torch.zeros(n, dtype=torch.int64, device=device)
        self.qk = torch.zeros((n, attn.num_heads + attn.num_kv_heads, attn.head_dim), **z)
        self.v = torch.zeros((n, attn.num_kv_heads, attn.head_dim), **z)
        self.o = torch.zeros((n, attn.num_heads, attn.head_dim), **z)
        self.residual = torch.zeros((n, self.m.embed_tokens.weight.shape[1]), **z)
        self.hidden = torch.zeros_like(self.residual)
        self.cos = torch.zeros((n, 1, attn.head_dim), **z)
        self.sin = torch.zeros_like(self.cos)

    def _piece(self, i: int, bs: int) -> None:
        """Piece i at bs tokens, reading and writing the static buffers' first bs rows."""
        layers = self.m.layers
        if i == 0:
            x, (cos, sin) = self.m.embed(self.input_ids[:bs], self.positions[:bs])
            self.cos[:bs].copy_(cos)
            self.sin[:bs].copy_(sin)
            residual = None
        else:
            x, residual = layers[i - 1].post(self.o[:bs], self.residual[:bs])
        if i < len(layers):
            qk, v, residual = layers[i].pre((self.cos[:bs], self.sin[:bs]), x, residual)
            self.qk[:bs].copy_(qk)
            self.v[:bs].copy_(v)
            self.residual[:bs].copy_(residual)
        else:
            self.hidden[:bs].copy_(self.m.norm(x, residual)[0])

    def capture(self) -> None:
        """Capture every size's pieces, the largest first, into one memory pool. Each piece leaves nothing but
        the static buffers behind, so pieces may reuse each other's temporaries."""
        pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.inference_mode():
            for bs in reversed(self.sizes):
                with torch.cuda.stream(stream):  # warm-up: compiles kernels, settles the allocator
                    for i in range(len(self.m.layers) + 1):
                        self._piece(i, bs)
                torch.cuda.current_stream().wait_stream(stream)
                graphs = []
                for i in range(len(self.m.layers) + 1):
                    g = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(g, pool=pool, stream=stream):
                        self._piece(i, bs)
                    graphs.append(g.replay)
                self.pieces[bs] = graphs
        torch.cuda.synchronize()

    def eager_pieces(self) -> None:
        """Run the pieces without graphs (the CPU, where tests check the cutting and the padding)."""
        n = len(self.m.layers) + 1
        self.pieces = {bs: [lambda i=i, bs=bs: self._piece(i, bs) for i in range(n)] for bs in self.sizes}

    def padded_size(self, num_tokens: int) -> int | None:
        i = bisect.bisect_left(self.sizes, num_tokens)
        return self.sizes[i] if i < len(self.sizes) else None

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, meta) -> torch.Tensor:
        """One step's forward (inputs on the device, num_tokens <= the largest size) -> hidden [num_tokens, hidden].
        Rows past num_tokens keep what earlier steps left there: finite values, on rows nothing reads."""
        t = input_ids.shape[0]
        pieces = self.pieces[self.padded_size(t)]
        self.input_ids[:t].copy_(input_ids, non_blocking=True)
        self.positions[:t].copy_(positions, non_blocking=True)
        qk, v, o = self.qk[:t], self.v[:t], self.o[:t]
        for layer, replay in zip(self.m.layers, pieces):
            replay()
            layer.self_attn.attend(qk, v, meta, out=o)
        pieces[-1]()
        self.num_replays += 1
        return self.hidden[:t]
