"""Token-exact greedy parity with HF transformers (fp32, CPU), through chunked prefill and preemption.

16 prompts of 5..300 tokens, block_size 16, a token budget below the longest prompt, and a KV pool small
enough that the scheduler must preempt.
"""
import pytest
import torch
from transformers import AutoModelForCausalLM

from batchllm import LLM, SamplingParams

MAX_NEW = 16


def _prompts(vocab, n=16, lo=5, hi=300, seed=0):
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(lo, hi + 1, (n,), generator=g).tolist()
    lens[0], lens[1] = lo, hi  # both ends of the range, always
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lens]


def _hf_greedy(hf, prompt, max_new):
    out = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                      max_new_tokens=max_new, do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def _check(path, hf_kwargs=None, num_kv_blocks=40, budget=128):
    llm = LLM(path, device="cpu", dtype="float32", block_size=16, num_kv_blocks=num_kv_blocks,
              max_num_batched_tokens=budget)
    prompts = _prompts(llm.hf_config.vocab_size)
    assert max(len(p) for p in prompts) > budget  # chunked prefill happens
    outs = llm.generate(prompts, SamplingParams(max_tokens=MAX_NEW, temperature=0, ignore_eos=True))
    stats = llm.stats()
    assert stats["num_preemptions"] >= 1, stats
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **(hf_kwargs or {})).eval()
    with torch.no_grad():
        for i, (p, o) in enumerate(zip(prompts, outs)):
            assert o.prompt_token_ids == p
            assert o.token_ids == _hf_greedy(hf, p, MAX_NEW), f"prompt {i} ({len(p)} tokens) differs"
            assert o.finish_reason == "length"
    assert stats["generation_tokens"] == MAX_NEW * len(prompts)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_tiny_models_match_hf(tiny_model_factory, arch):
    _check(tiny_model_factory(arch))


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_without_the_c_kernels_too(tiny_model_factory, monkeypatch, arch):
    """A CPU without a C compiler runs the pure-torch reference (its own key-cache layout): still HF's tokens."""
    from batchllm.kernels import cpu

    monkeypatch.setattr(cpu, "_lib", False)  # as when building failed: load() -> None
    llm = LLM(tiny_model_factory(arch), device="cpu", dtype="float32", block_size=16, num_kv_blocks=8)
    layer = llm.runner.model.attention_layers()[0]
    assert layer.key_cache.shape == layer.value_cache.shape  # the reference's layout
    del llm
    _check(tiny_model_factory(arch))


@pytest.mark.slow
def test_smollm2_gguf_matches_hf():
    from batchllm.models import loader, store

    path = store.resolve("smollm2-135m")
    fmt, p = loader.find_format(path)
    assert fmt == "gguf"
    _check(path, hf_kwargs={"gguf_file": str(p)}, num_kv_blocks=24, budget=200)
