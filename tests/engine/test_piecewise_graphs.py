"""Piecewise CUDA graphs (batchllm/engine/piecewise_graphs.py): the sizes, and the cutting at attention with its
static buffers and padding, run eagerly on the CPU against the model's own forward. The graphs themselves are
checked on a GPU (tests/gpu/test_engine_gpu.py: token-exact against HF through mixed steps)."""
import numpy as np
import pytest
import torch

from batchllm.engine.piecewise_graphs import (PiecewiseGraphs, buffer_bytes, matmul_params_per_layer,
                                              max_piece_tokens, piece_sizes)
from batchllm.layers.attention import AttentionMetadata


def test_piece_sizes():
    sizes = piece_sizes(4096)
    assert sizes == sorted(set(sizes)) and sizes[0] == 32 and sizes[-1] == 4096
    steps = np.diff(sizes)
    assert steps.max() == 256 and all(s in (32, 64, 256) for s in steps)
    assert piece_sizes(128) == [32, 64, 96, 128]
    assert piece_sizes(100) == [32, 64, 96, 100]  # the budget is always a size
    assert piece_sizes(20) == [20]


def test_max_piece_tokens():
    from batchllm.models.presets import get_preset

    llama3_8b = matmul_params_per_layer(get_preset("llama3-8b"))
    qwen3_06b = matmul_params_per_layer(get_preset("qwen3-0.6b"))
    assert llama3_8b == 4096 * 6144 + 4096 * 4096 + 3 * 4096 * 14336
    assert 1400 < max_piece_tokens(llama3_8b, 8192) < 1800  # its mixed steps (~800-1,300 tokens) run at break-even
    assert 2800 < max_piece_tokens(llama3_8b, 8192, fp8=True) < 3600  # fp8 matmuls: twice the rate
    assert max_piece_tokens(qwen3_06b, 8192) == 4096
    assert max_piece_tokens(qwen3_06b, 1000) == 1000  # never above the step budget
    assert max_piece_tokens(10**12, 8192) == 256  # a huge layer still takes small steps


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_matmul_params_per_layer_counts_the_layer(tiny_model_factory, arch):
    from batchllm import LLM
    from batchllm.layers.linear import MergedLinear

    llm = LLM(tiny_model_factory(arch), device="cpu", dtype="float32", num_kv_blocks=16)
    layer = llm.runner.model.model.layers[0]
    counted = sum(m.in_features * sum(m.shard_sizes.values()) for m in layer.modules() if isinstance(m, MergedLinear))
    assert matmul_params_per_layer(llm.hf_config) == counted


def _batch(seqs, block_size, vocab, rng):
    """seqs: (query_len, seq_len) each, decode rows first -> input ids, positions and metadata, each sequence on
    blocks of its own."""
    q_lens = np.array([q for q, _ in seqs])
    seq_lens = np.array([s for _, s in seqs])
    nblocks = -(-seq_lens // block_size)
    table = np.zeros((len(seqs), int(nblocks.max())), dtype=np.int32)
    start = 0
    for r, nb in enumerate(nblocks):
        table[r, :nb] = np.arange(start, start + nb)
        start += int(nb)
    qsl = np.concatenate([[0], np.cumsum(q_lens)])
    row = np.repeat(np.arange(len(seqs)), q_lens)
    positions = np.arange(qsl[-1]) - np.repeat(qsl[:-1], q_lens) + np.repeat(seq_lens - q_lens, q_lens)
    slots = table[row, positions // block_size].astype(np.int64) * block_size + positions % block_size
    meta = AttentionMetadata(
        query_start_loc=torch.tensor(qsl, dtype=torch.int32), seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
        block_table=torch.tensor(table), slot_mapping=torch.tensor(slots), max_query_len=int(q_lens.max()),
        max_seq_len=int(seq_lens.max()), num_decodes=int((q_lens == 1).sum()))
    ids = torch.tensor(rng.integers(3, vocab, int(qsl[-1])), dtype=torch.int64)
    return ids, torch.tensor(positions, dtype=torch.int64), meta


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_pieces_match_the_forward(tiny_model_factory, arch):
    from batchllm import LLM

    llm = LLM(tiny_model_factory(arch), device="cpu", dtype="float32", num_kv_blocks=64)
    model, vocab = llm.runner.model, llm.hf_config.vocab_size
    pw = PiecewiseGraphs(model, torch.device("cpu"), torch.float32, 128)
    pw.eager_pieces()
    rng = np.random.default_rng(0)
    # a mixed step padded from 61 to 64 rows, then a smaller one (33 -> 64: rows 33..63 hold the first step's
    # values), then a full 128-row prefill
    for seqs in ([(1, 20), (1, 33), (7, 7), (12, 30), (40, 40)], [(1, 21), (1, 34), (31, 31)], [(128, 128)]):
        ids, pos, meta = _batch(seqs, llm.runner.block_size, vocab, rng)
        with torch.inference_mode():
            ref = model(ids, pos, meta)
            out = pw.run(ids, pos, meta)
        assert out.shape == ref.shape
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)  # a stale or misplaced row is off by far more
    assert pw.num_replays == 3


def test_buffer_bytes_grows_with_tokens(tiny_model_factory):
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(tiny_model_factory("llama"))
    small, big = buffer_bytes(cfg, 512, torch.bfloat16), buffer_bytes(cfg, 4096, torch.bfloat16)
    assert big == 8 * small
    # at least the static buffers and the MLP's gate/up output of the largest piece
    assert small >= 512 * (2 * cfg.intermediate_size + 4 * cfg.hidden_size) * 2
