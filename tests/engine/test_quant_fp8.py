"""quantization="fp8": decoder matmul weights in e4m3 with per-channel scales, inputs quantized per token, the
product through torch._scaled_mm. Checked against the same arithmetic written out in fp64, and end to end
against the unquantized engine (close logprobs, mostly the same greedy tokens)."""
import pytest
import torch

from batchllm import LLM, SamplingParams
from batchllm.kernels import reference
from batchllm.layers.linear import MergedLinear
from batchllm.quant.fp8 import fp8_linear


def test_fp8_linear_is_the_scaled_product():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(48, 64, generator=g) * 0.02
    x = torch.randn(5, 3, 64, generator=g)
    bias = torch.randn(48, generator=g)
    qw, ws = reference.quantize_rows_fp8(w)
    out = fp8_linear(x, qw, ws, bias)
    xq, xs = reference.quantize_rows_fp8(x.reshape(-1, 64))
    want = (xq.double() * xs.double()[:, None]) @ (qw.double() * ws.double()[:, None]).T + bias.double()
    assert out.shape == (5, 3, 48) and out.dtype == torch.float32
    assert torch.allclose(out.reshape(-1, 48).double(), want, rtol=1e-5, atol=1e-6)
    # and it is close to the unquantized product: a few per cent, as 3 mantissa bits allow
    exact = x.reshape(-1, 64).double() @ w.double().T + bias.double()
    assert ((out.reshape(-1, 48).double() - exact).norm() / exact.norm()) < 0.05


def test_merged_linear_quantizes_in_place():
    m = MergedLinear(64, {"a": 32, "b": 16})
    torch.nn.init.normal_(m.weight, std=0.02)
    x = torch.randn(7, 64)
    before = m(x)
    m.quantize_fp8()
    assert m.weight is None and m.fp8_weight.dtype == torch.float8_e4m3fn and m.fp8_scale.shape == (48,)
    after = m(x)
    assert ((after - before).norm() / before.norm()) < 0.05


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])  # GQA + rope scaling; qkv bias, tied; q/k norm
def test_engine_fp8_weights_close_to_unquantized(tiny_model_factory, arch):
    path = tiny_model_factory(arch)
    kw = dict(device="cpu", dtype="float32", block_size=16, num_kv_blocks=64)
    full, q = LLM(path, **kw), LLM(path, quantization="fp8", **kw)
    layers = [m for m in q.runner.model.modules() if isinstance(m, MergedLinear)]
    assert layers and all(m.fp8_weight is not None and m.weight is None for m in layers)
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(3, full.hf_config.vocab_size, (n,), generator=g).tolist() for n in (5, 33, 90, 150, 12, 64)]
    params = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True, logprobs=5)
    want, got = full.generate(prompts, params), q.generate(prompts, params)
    same = sum(w.token_ids[0] == o.token_ids[0] for w, o in zip(want, got))
    gaps = [abs(o.logprobs[0][w.token_ids[0]] - w.logprobs[0][w.token_ids[0]])
            for w, o in zip(want, got) if w.token_ids[0] in o.logprobs[0]]
    # near-ties flip on these flat random models (seen: 4-5 of 6 kept); the logprob gap is the check that matters
    assert same >= 3 and len(gaps) >= 5 and max(gaps) < 0.2, (same, gaps)
    outs = q.generate(prompts, SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))
    assert all(len(o.token_ids) == 6 for o in outs)


def test_sizes_not_multiples_of_16_are_refused():
    from torch import nn

    from batchllm.quant.fp8 import quantize_model

    model = nn.Module()
    model.proj = MergedLinear(64, {"a": 40})
    with pytest.raises(ValueError, match=r"quantization fp8: proj is 40x64; fp8 matmuls need both sizes"):
        quantize_model(model)
