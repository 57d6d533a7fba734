"""The CUDA engine (Triton attention, CUDA graphs) against HF transformers on random-weight models.

fp32: token-exact greedy, through chunked prefill (piecewise graphs), preemption and graph-replayed decode.
Mixed steps of every shape: no attention kernel compiled after warm-up. Graphs above 512 rows equal eager.
bf16: the first token's top-20 logprobs close to HF's; with an fp8 KV cache or fp8 weights, too. AWQ checkpoints
(4-bit, kernels/awq.py): token-exact in fp32 against HF on the weights they dequantize to, close in bf16. Neither the sampler nor any engine step waits for the device.
Run on a GPU machine:  PYTHONPATH=$PWD python -m pytest -m gpu tests/gpu -q
"""
import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _prompts(vocab, n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(5, 301, (n,), generator=g).tolist()
    return [torch.randint(3, vocab, (L,), generator=g).tolist() for L in lens]


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_fp32_greedy_matches_hf(tiny_model_factory, arch):
    from transformers import AutoModelForCausalLM

    from batchllm import LLM, SamplingParams

    path = tiny_model_factory(arch)
    llm = LLM(path, device="cuda", dtype="float32", num_kv_blocks=40, max_num_batched_tokens=128)
    assert llm.runner.graphs is not None
    prompts = _prompts(llm.hf_config.vocab_size)
    outs = llm.generate(prompts, SamplingParams(max_tokens=16, temperature=0, ignore_eos=True))
    assert llm.stats()["num_preemptions"] >= 1
    assert llm.runner.piecewise.num_replays > 0  # prefill and mixed steps ran through the piecewise graphs
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).cuda().eval()
    with torch.no_grad():
        for i, (p, o) in enumerate(zip(prompts, outs)):
            ref = hf.generate(torch.tensor([p], device="cuda"), max_new_tokens=16, do_sample=False,
                              eos_token_id=None, pad_token_id=0)[0, len(p):].tolist()
            assert o.token_ids == ref, f"prompt {i} ({len(p)} tokens)"


def test_bf16_logprobs_close_to_hf(tiny_model_factory):
    from transformers import AutoModelForCausalLM

    from batchllm import LLM, SamplingParams

    path = tiny_model_factory("llama")
    llm = LLM(path, device="cuda", dtype="bfloat16", num_kv_blocks=256)
    prompts = _prompts(llm.hf_config.vocab_size, n=8, seed=1)
    outs = llm.generate(prompts, SamplingParams(max_tokens=1, temperature=0, logprobs=20, ignore_eos=True))
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).cuda().eval()
    worst = 0.0
    with torch.no_grad():
        for p, o in zip(prompts, outs):
            ref = hf(torch.tensor([p], device="cuda")).logits[0, -1].float().log_softmax(-1)
            for tok, lp in o.logprobs[0].items():
                worst = max(worst, abs(lp - ref[tok].item()))
    assert worst < 0.15, worst


@pytest.mark.parametrize("fp8", ["kv_cache", "weights"])
def test_fp8_close_to_hf(tiny_model_factory, fp8):
    """An fp8 KV cache, or fp8 weights (quantization="fp8"), in bf16, through prefill, graph-replayed decode and
    eager mixed steps: the first token's logprobs stay near HF's bf16 ones, and greedy decoding mostly keeps
    HF's first tokens."""
    from transformers import AutoModelForCausalLM

    from batchllm import LLM, SamplingParams

    path = tiny_model_factory("llama")
    kw = {"kv_cache_dtype": "fp8"} if fp8 == "kv_cache" else {"quantization": "fp8"}
    llm = LLM(path, device="cuda", dtype="bfloat16", num_kv_blocks=256, **kw)
    assert llm.runner.graphs is not None
    if fp8 == "kv_cache":
        assert llm.runner.model.attention_layers()[0].key_cache.dtype == torch.float8_e4m3fn
    else:
        assert llm.runner.model.model.layers[0].mlp.down_proj.fp8_weight.dtype == torch.float8_e4m3fn
    prompts = _prompts(llm.hf_config.vocab_size, n=8, seed=2)
    outs = llm.generate(prompts, SamplingParams(max_tokens=8, temperature=0, logprobs=20, ignore_eos=True))
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).cuda().eval()
    worst, same = 0.0, 0
    with torch.no_grad():
        for p, o in zip(prompts, outs):
            ref = hf(torch.tensor([p], device="cuda")).logits[0, -1].float().log_softmax(-1)
            for tok, lp in o.logprobs[0].items():
                worst = max(worst, abs(lp - ref[tok].item()))
            same += o.token_ids[0] == int(ref.argmax())
            assert len(o.token_ids) == 8
    print(f"fp8 {fp8}: worst logprob gap {worst:.3f}, first tokens kept {same}/8")
    assert worst < 0.5 and same >= 6, (worst, same)


@pytest.mark.parametrize("dtype, budget", [("float32", 128), ("float32", 1024), ("bfloat16", 1024)])
def test_awq_matches_hf_on_dequantized_weights(tiny_model_factory, tmp_path, dtype, budget):
    """An AWQ checkpoint through kernels/awq.py, prefill chunks (piecewise graphs) and graph-replayed decode,
    against HF on the dense weights it dequantizes to: the same greedy tokens in fp32; in bf16, first-token
    logprobs close. Budget 128: every matmul through the fused kernel; 1,024 (and a KV pool sized from memory):
    prefill steps above DEQUANTIZE_FROM_M rows dequantize into the shared scratch buffer."""
    from transformers import AutoModelForCausalLM

    from batchllm import LLM, SamplingParams
    from tiny_models import make_awq_pair

    awq_dir, ref_dir = make_awq_pair(tiny_model_factory("llama"), tmp_path / "awq", tmp_path / "ref")
    kv = {"num_kv_blocks": 256} if budget == 128 else {}
    llm = LLM(awq_dir, device="cuda", dtype=dtype, max_num_batched_tokens=budget, **kv)
    assert llm.runner.model.model.layers[0].mlp.gate_up_proj.awq_scratch is not None
    assert llm.runner.quantization == "awq" and llm.runner.model.model.layers[0].mlp.down_proj.qweight is not None
    prompts = _prompts(llm.hf_config.vocab_size, n=8, seed=3)
    outs = llm.generate(prompts, SamplingParams(max_tokens=12, temperature=0, logprobs=20, ignore_eos=True))
    assert llm.runner.piecewise.num_replays > 0
    hf = AutoModelForCausalLM.from_pretrained(ref_dir, dtype=getattr(torch, dtype)).cuda().eval()
    worst = 0.0
    with torch.no_grad():
        for i, (p, o) in enumerate(zip(prompts, outs)):
            if dtype == "float32":
                ref = hf.generate(torch.tensor([p], device="cuda"), max_new_tokens=12, do_sample=False,
                                  eos_token_id=None, pad_token_id=0)[0, len(p):].tolist()
                assert o.token_ids == ref, f"prompt {i} ({len(p)} tokens)"
            logits = hf(torch.tensor([p], device="cuda")).logits[0, -1].float().log_softmax(-1)
            worst = max([worst] + [abs(lp - logits[tok].item()) for tok, lp in o.logprobs[0].items()])
    assert worst < (1e-3 if dtype == "float32" else 0.15), worst


def _compiled_variants(*kernels) -> int:
    """Compiled variants of Triton kernels in this process (JITFunction.device_caches: Triton >= 3.2)."""
    total = 0
    for k in kernels:
        caches = getattr(k, "device_caches", None)
        if caches is None:
            pytest.skip("this Triton keeps its compiled kernels elsewhere: cannot count variants")
        total += sum(len(c[0]) for c in caches.values())
    return total


def test_mixed_steps_compile_no_new_attention_variants(tiny_model_factory):
    # Mixed steps change their decode count, sequence count and block-table width every step; none of it
    # may compile the attention kernel again once the engine is warm (a mid-run compile stalls ~0.5 s).
    from batchllm import LLM, SamplingParams
    from batchllm.kernels import attention

    llm = LLM(tiny_model_factory("llama"), device="cuda", dtype="bfloat16", num_kv_blocks=512, max_num_seqs=8)
    g = torch.Generator().manual_seed(3)

    def run(n, lo, hi):  # prompts of >= 32 tokens: every prefill launch takes the same 32-token tile
        lens = torch.randint(lo, hi, (n,), generator=g).tolist()
        prompts = [torch.randint(3, 500, (L,), generator=g).tolist() for L in lens]
        outs = [int(x) for x in torch.randint(3, 20, (n,), generator=g)]
        return llm.generate(prompts, [SamplingParams(max_tokens=m, temperature=0, ignore_eos=True) for m in outs])

    run(12, 32, 64)  # warm: pure prefill, mixed and decode steps
    before = _compiled_variants(attention._unified_attention_kernel, attention._reduce_segments_kernel)
    outs = run(48, 32, 160)
    after = _compiled_variants(attention._unified_attention_kernel, attention._reduce_segments_kernel)
    assert all(o.finish_reason == "length" for o in outs)
    assert after == before, f"{after - before} attention kernel variants compiled after warm-up"


def test_graphs_above_512_rows_match_eager(tiny_model_factory):
    # The default batch cap reaches 1,024 on big pools: decode steps of 650 rows replay the 700-row graph
    # (steps of 64 above 512, then max_num_seqs) with 50 padding rows, and must give the eager engine's tokens.
    from batchllm import LLM, SamplingParams

    path = tiny_model_factory("llama")
    g = torch.Generator().manual_seed(5)
    lens = torch.randint(4, 25, (650,), generator=g).tolist()
    prompts = [torch.randint(3, 500, (L,), generator=g).tolist() for L in lens]
    sp = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    args = dict(device="cuda", dtype="float32", num_kv_blocks=1600, max_num_seqs=700)
    graphed = LLM(path, **args)
    assert graphed.runner.graphs.sizes[-4:] == [512, 576, 640, 700] and graphed.runner.graphs.padded_size(650) == 700
    outs = graphed.generate(prompts, sp)
    assert graphed.stats()["num_preemptions"] == 0
    eager = LLM(path, enforce_eager=True, **args)
    ref = eager.generate(prompts, sp)
    diff = [i for i, (a, b) in enumerate(zip(outs, ref)) if a.token_ids != b.token_ids]
    assert not diff, f"{len(diff)} of 650 differ; first #{diff[0]}"


def test_sampler_does_not_wait_for_the_device():
    # Per-row sampling parameters reach the GPU through page-locked copies: torch.tensor(list, device="cuda")
    # copies from pageable memory and waits for the stream, so every sampled step's launch would wait for the
    # running step and asynchronous scheduling would be lost.
    from batchllm import SamplingParams
    from batchllm.engine.request import Request
    from batchllm.engine.sampler import Sampler

    params = [SamplingParams(temperature=0.8, top_k=50), SamplingParams(temperature=0),
              SamplingParams(temperature=1.0, top_p=0.9, min_p=0.05, seed=3, logprobs=2),
              SamplingParams(temperature=0.5, top_p=0.5)]
    reqs = [Request(i, [1, 2, 3], p) for i, p in enumerate(params)]
    sampler = Sampler(torch.device("cuda"))
    logits = torch.randn(len(reqs), 1000, device="cuda")
    sampler(logits, reqs)  # first use: the seeded request's generator, kernel loads
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        tokens, logprobs = sampler(logits, reqs)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert tokens.shape == (4,) and int(tokens[1]) == int(logits[1].argmax())
    assert logprobs is not None


def test_engine_steps_never_wait_for_the_device(tiny_model_factory):
    # Asynchronous scheduling holds only if launching a step never waits on the GPU: every copy in goes
    # through page-locked memory and nothing reads a device value back. ModelRunner.execute runs under sync
    # debug mode "error" through prefill, mixed and graph-replayed decode steps, greedy and sampled, top-p,
    # seeded, with logprobs.
    from batchllm import LLM, SamplingParams

    llm = LLM(tiny_model_factory("llama"), device="cuda", dtype="bfloat16", num_kv_blocks=256, max_num_seqs=16,
              max_num_batched_tokens=64)
    assert llm.async_scheduling and llm.runner.graphs is not None
    g = torch.Generator().manual_seed(7)

    def workload(n):
        lens = torch.randint(20, 120, (n,), generator=g).tolist()
        prompts = [torch.randint(3, 500, (L,), generator=g).tolist() for L in lens]
        params = [SamplingParams(max_tokens=12, ignore_eos=True, temperature=0 if i % 3 == 0 else 0.8,
                                 top_p=0.9 if i % 3 == 1 else 1.0, seed=i if i % 3 == 2 else None,
                                 logprobs=2 if i % 4 == 0 else None) for i in range(n)]
        return prompts, params

    llm.generate(*workload(8))  # first use: compiles, graph replays, generators
    execute = llm.runner.execute
    checked_steps = []

    def checked(out):
        torch.cuda.set_sync_debug_mode("error")
        try:
            return execute(out)
        finally:
            torch.cuda.set_sync_debug_mode("default")
            checked_steps.append(llm.runner._graphable(out))

    llm.runner.execute = checked
    try:
        outs = llm.generate(*workload(24))
    finally:
        del llm.runner.execute
    assert all(len(o.token_ids) == 12 for o in outs)
    assert len(checked_steps) > 12 and any(checked_steps) and not all(checked_steps)  # graph replays and eager
