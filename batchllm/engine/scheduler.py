"""Iteration-level scheduler: one rule, no phases.

Each request has num_computed_tokens and a target (all its tokens). Each step hands out a token budget
(max_num_batched_tokens) so that the first catches up with the second: running requests first (decodes
and unfinished prefill chunks), then waiting ones, at most max_num_seqs running. That one rule gives
chunked prefill, prefix hits, mixed prefill/decode batches and preemption by recompute. When blocks run
out, the latest-admitted running request is preempted: its blocks are freed and it goes back to the front
of the waiting queue with num_computed_tokens = 0 (cached blocks usually bring most of it back).
Plain Python, no torch.
"""
from collections import deque
from dataclasses import dataclass, field

from batchllm.engine.kv_cache_manager import KVCacheManager
from batchllm.engine.request import PENDING, Request, RequestStatus

_MAX_SKIPS = 512  # waiting requests looked past in one step while they wait on in-flight blocks


@dataclass
class SchedulerOutput:
    # (request, num_new_tokens) in batch order: single-token rows (decodes) first, then prefill chunks
    scheduled: list[tuple[Request, int]] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)

    @property
    def num_scheduled_tokens(self) -> int:
        return sum(n for _, n in self.scheduled)


class Scheduler:
    def __init__(self, kv: KVCacheManager, max_num_seqs: int, max_num_batched_tokens: int, max_model_len: int,
                 eos_token_ids=()):
        self.kv = kv
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.eos_token_ids = frozenset(eos_token_ids)
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0
        self._arrivals = 0

    def add_request(self, req: Request) -> None:
        req.arrival = self._arrivals
        self._arrivals += 1
        self.waiting.append(req)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            num_new = min(req.num_tokens - req.num_computed_tokens, budget)
            while not self.kv.allocate_slots(req, num_new):
                victim = self.running.pop()  # the latest admitted goes first
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is req:
                    break
            else:
                out.scheduled.append((req, num_new))
                budget -= num_new
                i += 1
        if out.preempted:  # no room to admit anything new this step
            return out

        skipped = []
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            req = self.waiting.popleft()
            hits, num_hit = self.kv.get_computed_blocks(req)
            if self.kv.blocks_pending(req, len(hits)) and len(skipped) < _MAX_SKIPS:
                skipped.append(req)  # another request is computing our next block: wait for it
                continue
            num_new = min(req.num_tokens - num_hit, budget)
            if not self.kv.allocate_slots(req, num_new, hits):
                self.waiting.appendleft(req)
                break
            self.kv.record_first_schedule(req, num_hit)
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            out.scheduled.append((req, num_new))
            budget -= num_new
        self.waiting.extendleft(reversed(skipped))
        out.scheduled.sort(key=lambda rn: rn[1] != 1)  # single-token rows (decodes) first, order kept otherwise
        return out

    def _preempt(self, req: Request) -> None:
        self.kv.free(req)
        req.status = RequestStatus.WAITING
        req.num_computed_tokens = 0
        self.waiting.appendleft(req)
        self.num_preemptions += 1

    def update_after_launch(self, out: SchedulerOutput) -> list[tuple[Request, int]]:
        """Once the runner has taken the step's inputs: advance each scheduled request, and give each one that
        samples a PENDING token, so that the next step can be scheduled before this one returns.

        A request that reaches max_tokens or max_model_len with that token is finished now (it is not
        scheduled again); its token still arrives through update_from_output. Returns (request, index of the
        PENDING token) for the rows that sample, in batch order: the order of the step's sampled tokens.
        """
        sampling = []
        for req, n in out.scheduled:
            req.num_computed_tokens += n
            if req.num_computed_tokens < req.num_tokens:
                continue  # a partial prefill chunk
            req.token_ids.append(PENDING)
            sampling.append((req, len(req.token_ids) - 1))
            if req.num_output_tokens >= req.sampling_params.max_tokens or req.num_tokens >= self.max_model_len:
                self.finish_request(req, RequestStatus.FINISHED_LENGTH)
        return sampling

    def update_from_output(self, sampling: list[tuple[Request, int]], tokens: list[int],
                           logprobs: list[dict | None] | None = None) -> list[Request]:
        """Fill in a step's sampled tokens (and logprob dicts, one per row or None). Returns the requests that
        received one; a token-level stop finishes its request, and a token sampled after a stop (by a step
        launched before it was known) is dropped with its logprobs."""
        advanced = []
        for k, ((req, i), tok) in enumerate(zip(sampling, tokens)):
            if i >= len(req.token_ids) or req.token_ids[i] != PENDING:
                continue  # the request stopped at an earlier token
            req.token_ids[i] = tok
            if logprobs is not None and logprobs[k] is not None and req.logprobs is not None:
                req.logprobs.append(logprobs[k])
            advanced.append(req)
            sp = req.sampling_params
            if (tok in self.eos_token_ids and not sp.ignore_eos) or tok in sp.stop_token_ids:
                self.stop_request(req)
        return advanced

    def stop_request(self, req: Request) -> None:
        """Finish req at its last known token (EOS, a stop token or a stop string), dropping any PENDING one.
        A stop wins over a length finish that update_after_launch already made."""
        if req.status == RequestStatus.FINISHED_LENGTH:  # already out of the running set, blocks freed
            req.status = RequestStatus.FINISHED_STOPPED
            req.drop_pending()
        else:
            self.finish_request(req, RequestStatus.FINISHED_STOPPED)

    def finish_request(self, req: Request, status: RequestStatus) -> None:
        if req.status.finished:
            return
        if req.status == RequestStatus.RUNNING:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        req.status = status
        if status != RequestStatus.FINISHED_LENGTH:
            req.drop_pending()
        self.kv.free(req)
