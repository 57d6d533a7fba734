"""Prefix caching: 32 chat requests share a ~200-token system prompt in one chat() call."""
import pytest

from batchllm import LLM, SamplingParams

WORDS = ("review product quality shipping price sentiment label answer positive negative neutral word "
         "customer service return refund battery screen sound comfort size color").split()


def _system_prompt(tokenizer, n_tokens=200):
    text, i = "You label product reviews.", 0
    while len(tokenizer(text).input_ids) < n_tokens:
        text += " " + WORDS[i % len(WORDS)] + str(i % 7)
        i += 1
    return text


def _conversations(tokenizer):
    system = _system_prompt(tokenizer)
    return [[{"role": "system", "content": system},
             {"role": "user", "content": f"Review {i}: " + " ".join(WORDS[(i * 3 + j) % len(WORDS)] for j in range(5 + i % 9))}]
            for i in range(32)]


def _common(a, b):
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


@pytest.mark.parametrize("budget", [2048, 96])  # whole prompts in one step; or chunked, so requests must wait
def test_shared_system_prompt_hits(tiny_model_dir, budget):
    sp = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    llm = LLM(tiny_model_dir, device="cpu", dtype="float32", max_num_batched_tokens=budget, num_kv_blocks=512)
    convs = _conversations(llm.tokenizer)
    outs = llm.chat(convs, sp)
    first = outs[0].prompt_token_ids
    assert outs[0].num_cached_tokens == 0
    for o in outs[1:]:
        shared = _common(o.prompt_token_ids, first)
        assert shared >= 200
        assert o.num_cached_tokens >= 0.9 * shared, (o.request_id, o.num_cached_tokens, shared)
        assert o.num_cached_tokens <= shared
    stats = llm.stats()
    assert stats["prefix_cache_hits"] == sum(o.num_cached_tokens for o in outs)
    assert stats["prefix_cache_queries"] == sum(len(o.prompt_token_ids) for o in outs)

    off = LLM(tiny_model_dir, device="cpu", dtype="float32", max_num_batched_tokens=budget, num_kv_blocks=512,
              enable_prefix_caching=False)
    outs_off = off.chat(convs, sp)
    assert [o.token_ids for o in outs_off] == [o.token_ids for o in outs]
    assert all(o.num_cached_tokens == 0 for o in outs_off)
    assert off.stats()["prefix_cache_hits"] == 0
