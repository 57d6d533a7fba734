"""AWQ checkpoints: read as AutoAWQ writes them, run token for token like transformers on the weights they
dequantize to; every unsupported layout or mismatched setting refused in one line."""
import json
import os

import pytest
import torch

from batchllm import LLM, SamplingParams
from batchllm.layers.linear import MergedLinear
from batchllm.models.store import ModelError
from tiny_models import make_awq_pair

MAX_NEW = 12


@pytest.fixture(scope="module")
def awq_pairs(tiny_model_factory, tmp_path_factory):
    def get(arch):
        root = tmp_path_factory.mktemp(f"awq-{arch}")
        return make_awq_pair(tiny_model_factory(arch), root / "awq", root / "ref")
    return get


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])  # GQA + rope scaling; qkv bias, tied; q/k norm
def test_awq_checkpoint_matches_hf_on_its_dequantized_weights(awq_pairs, arch):
    from transformers import AutoModelForCausalLM

    awq_dir, ref_dir = awq_pairs(arch)
    llm = LLM(awq_dir, device="cpu", dtype="float32", block_size=16, num_kv_blocks=40, max_num_batched_tokens=96)
    assert llm.runner.quantization == "awq"  # detected from the checkpoint, not asked for
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, llm.hf_config.vocab_size, (n,), generator=g).tolist() for n in (5, 40, 130, 17)]
    outs = llm.generate(prompts, SamplingParams(max_tokens=MAX_NEW, temperature=0, ignore_eos=True))
    hf = AutoModelForCausalLM.from_pretrained(ref_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        for p, o in zip(prompts, outs):
            want = hf.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                               max_new_tokens=MAX_NEW, do_sample=False, eos_token_id=None, pad_token_id=0)
            assert o.token_ids == want[0, len(p):].tolist(), f"{len(p)}-token prompt differs"


def test_merged_shards_equal_the_dequantized_weights(awq_pairs):
    """q/k/v and gate/up shards packed side by side: the engine's layer (dequantized at load on the CPU), and a
    4-bit layer's own matmul (the reference path), both against transformers' dense weights from ref_dir."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    awq_dir, ref_dir = awq_pairs("llama")
    llm = LLM(awq_dir, device="cpu", dtype="float32", num_kv_blocks=8)
    ref = load_file(os.path.join(ref_dir, "model.safetensors"))
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(0))
    qkv = llm.runner.model.model.layers[1].self_attn.qkv_proj
    assert qkv.qweight is None  # dequantized at load on the CPU (and then packed for oneDNN)
    want = torch.cat([ref[f"model.layers.1.self_attn.{p}.weight"] for p in ("q_proj", "k_proj", "v_proj")])
    assert torch.allclose(qkv(x), x @ want.T, rtol=1e-5, atol=1e-6)

    m = MergedLinear(64, {"gate_proj": 128, "up_proj": 128}, awq_group_size=32)
    with safe_open(os.path.join(awq_dir, "model.safetensors"), "pt") as f:
        for shard in ("gate_proj", "up_proj"):
            for param in ("qweight", "qzeros", "scales"):
                m.load_shard(shard, param, f.get_tensor(f"model.layers.0.mlp.{shard}.{param}"))
    want = torch.cat([ref[f"model.layers.0.mlp.{p}.weight"] for p in ("gate_proj", "up_proj")])
    assert torch.allclose(m(x), x @ want.T, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"up_proj.scales: shape \(2, 64\), expected \(2, 128\)"):
        MergedLinear(64, {"gate_proj": 128, "up_proj": 128}, awq_group_size=32).load_shard(
            "up_proj", "scales", torch.zeros(2, 64))


def _with_quant(src, dst, **changes):
    import shutil

    shutil.copytree(src, dst)
    with open(os.path.join(dst, "config.json")) as f:
        cfg = json.load(f)
    cfg["quantization_config"].update(changes)
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(cfg, f)
    return str(dst)


@pytest.mark.parametrize("changes, message", [
    ({"bits": 8}, "AWQ checkpoint with bits=8: batchllm reads 4-bit AWQ only"),
    ({"version": "gemv"}, "AWQ checkpoint of version 'gemv': batchllm reads version 'gemm' only"),
    ({"zero_point": False}, "AWQ checkpoint with zero_point=false"),
    ({"modules_to_not_convert": ["mlp.down_proj"]}, r"modules_to_not_convert=\['mlp.down_proj'\]"),
    ({"quant_method": "gptq"}, "pre-quantized checkpoint \\(quant_method gptq\\), which batchllm cannot load"),
    ({"group_size": 48}, "AWQ checkpoint with group_size=48: batchllm needs a power of 2, at least 16"),
])
def test_unsupported_layouts_are_refused(awq_pairs, tmp_path, changes, message):
    path = _with_quant(awq_pairs("llama")[0], tmp_path / "m", **changes)
    with pytest.raises((ValueError, ModelError), match=message):
        LLM(path, device="cpu", num_kv_blocks=8)


def test_other_spellings_of_the_layout_are_read(awq_pairs, tmp_path):
    """AutoAWQ's own keys (w_bit, q_group_size), an unquantized lm_head named, a version in capitals."""
    path = _with_quant(awq_pairs("llama")[0], tmp_path / "m", bits=None, w_bit=4, group_size=None, q_group_size=32,
                       modules_to_not_convert=["lm_head"], version="GEMM")
    assert LLM(path, device="cpu", num_kv_blocks=8).runner.quantization == "awq"


def test_mismatched_settings_are_refused(awq_pairs, tiny_model_dir):
    awq_dir, _ = awq_pairs("llama")
    with pytest.raises(ValueError, match="quantization fp8 on an AWQ checkpoint"):
        LLM(awq_dir, device="cpu", quantization="fp8", num_kv_blocks=8)
    with pytest.raises(ValueError, match="quantization awq needs an AWQ checkpoint"):
        LLM(tiny_model_dir, device="cpu", quantization="awq", num_kv_blocks=8)
    assert LLM(awq_dir, device="cpu", quantization="awq", num_kv_blocks=8).runner.quantization == "awq"


def test_random_awq_weights_for_presets(monkeypatch):
    """quantization="awq" on a random-weight model builds 4-bit layers whose weights have the preset's scale."""
    from batchllm.engine import model_runner
    from batchllm.quant import resolve
    from tiny_models import tiny_config

    cfg = tiny_config("llama")
    assert resolve("awq", cfg, random_weights=True) == "awq" and cfg.quantization_config["group_size"] == 128
    cfg.quantization_config["group_size"] = 32
    from batchllm.engine.config import EngineConfig

    runner = model_runner.ModelRunner(EngineConfig(model="x", device="cpu", dtype="float32", num_kv_blocks=8,
                                                   quantization="awq"), cfg, None, 256)
    layers = [m for m in runner.model.modules() if isinstance(m, MergedLinear)]
    assert layers and all(m.qweight is None for m in layers)  # built 4-bit, dequantized for the CPU
    std = torch.cat([m(torch.eye(m.in_features)).flatten() for m in layers]).std().item()  # the rows of W.T
    assert 0.015 < std < 0.025, std
