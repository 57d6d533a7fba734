"""Sampling: seeds independent of the batch, stops, logprobs, and parameter validation."""
import math

import pytest
import torch

from batchllm import LLM, SamplingParams


@pytest.fixture(scope="module")
def llm(tiny_model_dir):
    return LLM(tiny_model_dir, device="cpu", dtype="float32", num_kv_blocks=256)


def _prompts(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 500, (int(L),), generator=g).tolist() for L in torch.randint(5, 60, (n,), generator=g)]


def test_seeded_request_same_alone_and_in_batch(llm):
    seeded = SamplingParams(max_tokens=24, temperature=0.9, top_p=0.95, top_k=50, seed=1234, ignore_eos=True)
    prompt = _prompts(1, seed=7)[0]
    alone = llm.generate([prompt], seeded)[0]
    others = _prompts(32, seed=8)
    mixed = [SamplingParams(max_tokens=30, temperature=1.0, ignore_eos=True)] * 32
    batch = llm.generate(others[:16] + [prompt] + others[16:], mixed[:16] + [seeded] + mixed[16:])
    assert batch[16].token_ids == alone.token_ids
    assert batch[16].text == alone.text
    other_seed = llm.generate([prompt], SamplingParams(max_tokens=24, temperature=0.9, top_p=0.95, top_k=50,
                                                       seed=99, ignore_eos=True))[0]
    assert other_seed.token_ids != alone.token_ids  # the seed matters


def test_top_k_one_is_greedy_and_min_p_one_is_greedy(llm):
    p = _prompts(4, seed=3)
    greedy = [o.token_ids for o in llm.generate(p, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))]
    k1 = [o.token_ids for o in llm.generate(p, SamplingParams(max_tokens=12, temperature=1.5, top_k=1,
                                                              ignore_eos=True))]
    m1 = [o.token_ids for o in llm.generate(p, SamplingParams(max_tokens=12, temperature=1.5, min_p=1.0,
                                                              ignore_eos=True))]
    assert k1 == greedy and m1 == greedy


def test_stop_strings_cut_text_and_stop_token_ids(llm):
    p = _prompts(1, seed=11)[0]
    full = llm.generate([p], SamplingParams(max_tokens=20, temperature=0, ignore_eos=True))[0]
    assert len(full.text) > 4
    stop = full.text[2:4]
    cut = llm.generate([p], SamplingParams(max_tokens=20, temperature=0, ignore_eos=True, stop=[stop]))[0]
    assert cut.finish_reason == "stop"
    assert cut.text == full.text[: full.text.find(stop)]
    tok = full.token_ids[3]
    by_id = llm.generate([p], SamplingParams(max_tokens=20, temperature=0, ignore_eos=True, stop_token_ids=[tok]))[0]
    assert by_id.finish_reason == "stop"
    assert by_id.token_ids == full.token_ids[: full.token_ids.index(tok) + 1]


def test_logprobs_top_n_and_chosen(llm):
    p = _prompts(2, seed=5)
    outs = llm.generate(p, SamplingParams(max_tokens=5, temperature=0, logprobs=3, ignore_eos=True))
    for o in outs:
        assert len(o.logprobs) == 5
        for tok, lp in zip(o.token_ids, o.logprobs):
            assert tok in lp and len(lp) == 3  # greedy: the chosen token is the top one
            assert max(lp.values()) == lp[tok]
            assert all(v <= 0 for v in lp.values())
            assert sum(math.exp(v) for v in lp.values()) <= 1.0 + 1e-5


def test_eos_stops_unless_ignored(tiny_model_dir):
    llm = LLM(tiny_model_dir, device="cpu", dtype="float32", num_kv_blocks=128)
    p = _prompts(1, seed=2)[0]
    first = llm.generate([p], SamplingParams(max_tokens=1, temperature=0))[0].token_ids[0]
    llm.scheduler.eos_token_ids = frozenset([first])  # make the model's next token its EOS
    stopped = llm.generate([p], SamplingParams(max_tokens=8, temperature=0))[0]
    assert stopped.finish_reason == "stop" and stopped.token_ids == [first]
    ignored = llm.generate([p], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))[0]
    assert ignored.finish_reason == "length" and len(ignored.token_ids) == 8


@pytest.mark.parametrize("kwargs, field", [
    (dict(max_tokens=0), "max_tokens"), (dict(temperature=-1), "temperature"), (dict(top_p=0), "top_p"),
    (dict(top_p=1.5), "top_p"), (dict(top_k=-2), "top_k"), (dict(min_p=2), "min_p"), (dict(seed="x"), "seed"),
    (dict(logprobs=50), "logprobs"), (dict(stop=[""]), "stop"), (dict(stop_token_ids=[-1]), "stop_token_ids"),
])
def test_invalid_params_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"SamplingParams.{field}="):
        SamplingParams(**kwargs)


def test_bad_prompts_become_error_outputs(llm):
    outs = llm.generate([[], [5] * 2000, [10, 999999], "hi"], SamplingParams(max_tokens=2))
    assert [o.finish_reason for o in outs[:3]] == ["error"] * 3
    assert [o.error_type for o in outs[:3]] == ["invalid_prompt", "prompt_too_long", "invalid_prompt"]
    assert "empty" in outs[0].error and "max_model_len" in outs[1].error and "vocabulary" in outs[2].error
    assert outs[3].finish_reason in ("stop", "length")


def test_unknown_engine_arg_is_rejected(tiny_model_dir):
    with pytest.raises(ValueError, match="unknown engine arg 'blocksize'"):
        LLM(tiny_model_dir, blocksize=16)
