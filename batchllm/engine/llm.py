"""LLM: the engine's public face. `generate` and `chat` return outputs in input order; `stream` yields each
request's result as soon as it finishes, pulling new requests lazily so memory stays bounded.

    from batchllm import LLM, SamplingParams
    llm = LLM("smollm2-135m", device="cpu")
    print(llm.generate(["The capital of France is"], SamplingParams(max_tokens=8, temperature=0))[0].text)
"""
import logging
import os
import sys
from collections.abc import Iterable, Iterator
from typing import Any

from batchllm.engine.config import EngineConfig
from batchllm.engine.kv_cache_manager import KVCacheManager
from batchllm.engine.request import Request, RequestOutput, RequestStatus
from batchllm.engine.sampling import SamplingParams
from batchllm.engine.scheduler import Scheduler

log = logging.getLogger("batchllm.engine")


class LLM:
    def __init__(self, model: str, **engine_args):
        import dataclasses

        known = {f.name for f in dataclasses.fields(EngineConfig)} - {"model"}
        unknown = sorted(set(engine_args) - known)
        if unknown:
            raise ValueError(f"unknown engine arg {unknown[0]!r}; valid: {', '.join(sorted(known))}")
        self.config = config = EngineConfig(model=model, **engine_args)
        hf_config, weights, self.tokenizer, key = _load(model, config)
        self.hf_config = hf_config
        max_len = config.max_model_len or getattr(hf_config, "max_position_embeddings", 4096)

        from batchllm.engine.model_runner import ModelRunner

        self.runner = ModelRunner(config, hf_config, weights, max_len)
        pool_tokens = self.runner.num_kv_blocks * config.block_size
        if pool_tokens < max_len:
            log.warning("max_model_len %d is more than the KV pool holds; capped at %d", max_len, pool_tokens)
            max_len = pool_tokens
        self.max_model_len = max_len
        cache_key = f"{key}|{self.runner.quantization or 'none'}|{self.runner.dtype}|kv {self.runner.kv_dtype}"
        self.kv = KVCacheManager(self.runner.num_kv_blocks, config.block_size, config.enable_prefix_caching, cache_key)
        self.max_num_seqs = self.runner.max_num_seqs
        self.scheduler = Scheduler(self.kv, self.max_num_seqs, config.token_budget(), max_len,
                                   _eos_ids(hf_config, self.tokenizer, model))
        # asynchronous scheduling: step N+1 is scheduled and launched before step N's tokens are back, so the
        # device never waits on the host. Off on the CPU, where the model runs in the calling thread anyway.
        self.async_scheduling = config.resolved_async_scheduling()
        self._inflight = None  # (sampling rows, ModelRunnerOutput) of the launched step not yet collected
        self._counter = 0
        self._prompt_tokens = 0
        self._generation_tokens = 0
        self._num_finished = 0
        self._num_steps = 0

    # -- public API ----------------------------------------------------------------------------
    def generate(self, prompts, sampling_params=None, use_tqdm: bool | None = None) -> list[RequestOutput]:
        """prompts: a str, a list of token ids, or a list of either; one SamplingParams or one per prompt."""
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        return self._run_all(list(prompts), sampling_params, use_tqdm)

    def chat(self, conversations, sampling_params=None, use_tqdm: bool | None = None) -> list[RequestOutput]:
        """conversations: one list of {role, content} messages, or a list of such lists."""
        if conversations and isinstance(conversations[0], dict):
            conversations = [conversations]
        return self._run_all(list(conversations), sampling_params, use_tqdm)

    def stream(self, requests: Iterable[tuple[Any, Any, SamplingParams]]) -> Iterator[RequestOutput]:
        """requests: (request_id, prompt, SamplingParams) with prompt a str, token ids or chat messages.

        Yields one RequestOutput per request, in finishing order. Requests are pulled from the iterable only
        while fewer than 2 * max_num_seqs wait, so a long dataset never sits in memory.
        """
        it = iter(requests)
        exhausted = False
        target = 2 * self.max_num_seqs
        while True:
            while not exhausted and len(self.scheduler.waiting) < target:
                item = next(it, None)
                if item is None:
                    exhausted = True
                    break
                req_id, prompt, sp = item
                err = self._add(req_id, prompt, sp or SamplingParams())
                if err is not None:
                    yield err
            if not self.has_unfinished():
                if exhausted:
                    return
                continue
            yield from self.step()

    def stats(self) -> dict:
        return {
            "prefix_cache_queries": self.kv.prefix_cache_queries,
            "prefix_cache_hits": self.kv.prefix_cache_hits,
            "kv_cache_usage": self.kv.usage(),
            "num_preemptions": self.scheduler.num_preemptions,
            "num_running": len(self.scheduler.running),
            "num_waiting": len(self.scheduler.waiting),
            "prompt_tokens": self._prompt_tokens,
            "generation_tokens": self._generation_tokens,
            "num_finished": self._num_finished,
            "num_steps": self._num_steps,
            "num_kv_blocks": self.runner.num_kv_blocks,
        }

    def get_tokenizer(self):
        return self.tokenizer

    # -- internals -----------------------------------------------------------------------------
    def _run_all(self, prompts, sampling_params, use_tqdm):
        if isinstance(sampling_params, (list, tuple)):
            if len(sampling_params) != len(prompts):
                raise ValueError(f"got {len(sampling_params)} SamplingParams for {len(prompts)} prompts")
            sps = list(sampling_params)
        else:
            sps = [sampling_params or SamplingParams()] * len(prompts)
        results: list[RequestOutput | None] = [None] * len(prompts)
        bar = _progress(len(prompts), use_tqdm)
        for out in self.stream((i, p, sp) for i, (p, sp) in enumerate(zip(prompts, sps))):
            results[out.request_id] = out
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
        return results

    def _tokenize(self, prompt) -> list[int]:
        if isinstance(prompt, str):
            self._need_tokenizer()
            return self.tokenizer(prompt).input_ids
        if isinstance(prompt, list) and all(isinstance(m, dict) for m in prompt) and prompt:
            self._need_tokenizer()
            text = self.tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
            return self.tokenizer(text, add_special_tokens=False).input_ids
        if isinstance(prompt, (list, tuple)) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            return list(prompt)
        raise ValueError(f"prompt must be a string, a list of token ids or a list of chat messages, "
                         f"not {type(prompt).__name__}")

    def _need_tokenizer(self):
        if self.tokenizer is None:
            raise ValueError("this model has no tokenizer: pass token ids")

    def _add(self, req_id, prompt, sp: SamplingParams) -> RequestOutput | None:
        kind = "invalid_prompt"
        try:
            ids = self._tokenize(prompt)
            if not ids:
                raise ValueError("prompt is empty")
            vocab = self.hf_config.vocab_size
            if max(ids) >= vocab or min(ids) < 0:
                raise ValueError(f"prompt has a token id outside the vocabulary (0..{vocab - 1})")
            if len(ids) >= self.max_model_len:
                kind = "prompt_too_long"
                raise ValueError(f"prompt has {len(ids)} tokens; max_model_len is {self.max_model_len} "
                                 "(one more is needed to generate)")
        except Exception as e:  # errors are data: the caller gets an output with finish_reason 'error'
            return RequestOutput(req_id, [], [], "", "error", 0, None, error=str(e), error_type=kind, prompt=prompt)
        self.scheduler.add_request(Request(req_id, ids, sp))
        self._prompt_tokens += len(ids)
        return None

    def step(self) -> list[RequestOutput]:
        """Schedule and launch one step, then collect a step's results: with asynchronous scheduling the
        previous step's (the device works on this one meanwhile), else this one's. -> requests finished."""
        sched = self.scheduler.schedule()
        launched = None
        if sched.scheduled:
            self._num_steps += 1
            result = self.runner.execute(sched)
            launched = (self.scheduler.update_after_launch(sched), result)
        elif self._inflight is None:
            raise RuntimeError("scheduler made no progress (a request larger than the KV pool?)")
        if self.async_scheduling:
            launched, self._inflight = self._inflight, launched
        return self._collect(*launched) if launched is not None else []

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished() or self._inflight is not None

    def _collect(self, sampling, result) -> list[RequestOutput]:
        tokens, logprobs = self.runner.fetch(result)
        advanced = self.scheduler.update_from_output(sampling, tokens, logprobs)
        self._generation_tokens += len(advanced)
        done = []
        for req in advanced:
            if req.status != RequestStatus.FINISHED_STOPPED and req.sampling_params.stop_strings:
                self._check_stop_strings(req)
            if req.status.finished and not req.has_pending:  # a length finish waits for its last token
                done.append(self._output(req))
        self._num_finished += len(done)
        return done

    def _check_stop_strings(self, req: Request) -> None:
        ids = req.output_token_ids[:-1] if req.has_pending else req.output_token_ids
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        hits = [i for i in (text.find(s) for s in req.sampling_params.stop_strings) if i >= 0]
        if hits:
            req.stop_text = text[: min(hits)]
            self.scheduler.stop_request(req)

    def _output(self, req: Request) -> RequestOutput:
        if req.stop_text is not None:
            text = req.stop_text
        elif self.tokenizer is not None:
            text = self.tokenizer.decode(req.output_token_ids, skip_special_tokens=True)
        else:
            text = ""
        return RequestOutput(req.request_id, req.prompt_token_ids, req.output_token_ids, text, req.status.value,
                             max(req.num_cached_tokens, 0), req.logprobs)


def _load(model: str, config: EngineConfig):
    """-> (hf_config, weights iterator or None for random presets, tokenizer or None, cache key)."""
    try:
        from batchllm.models import presets
    except ImportError:  # presets are optional
        presets = None
    if presets is not None and model in presets.preset_names():
        return presets.preset_config(model), None, None, f"preset:{model}:{config.seed}"
    from batchllm.models import loader, store

    path = store.resolve(model)
    hf_config = loader.load_config(path)
    tokenizer = loader.load_tokenizer(path)
    return hf_config, loader.iter_weights(path), tokenizer, loader.model_key(path)


def _eos_ids(hf_config, tokenizer, model) -> set[int]:
    ids = set()
    for v in (getattr(hf_config, "eos_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        if isinstance(v, int):
            ids.add(v)
        elif isinstance(v, (list, tuple)):
            ids.update(int(x) for x in v)
    return ids


def _progress(total, use_tqdm):
    if use_tqdm is None:
        use_tqdm = sys.stderr.isatty() and not os.environ.get("BATCHLLM_NO_PROGRESS")
    if not use_tqdm or total <= 1:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc="generate", unit="req")
