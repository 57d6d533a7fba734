"""One request's state (plain Python, no torch), and the result handed back to the caller."""
import enum
from dataclasses import dataclass, field
from typing import Any

from batchllm.engine.sampling import SamplingParams

PENDING = -1  # a sampled token still on the device: the step that samples it has launched, not returned


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ERROR = "error"

    @property
    def finished(self) -> bool:
        return self not in (RequestStatus.WAITING, RequestStatus.RUNNING)


class Request:
    """token_ids holds the prompt then the output; the scheduler moves num_computed_tokens up to it.

    With asynchronous scheduling the last output token may be PENDING: its step is still on the device.
    The next step already computes it (the runner reads it from the device), and the step's results fill it in.
    """

    def __init__(self, request_id: Any, prompt_token_ids: list[int], sampling_params: SamplingParams,
                 arrival: int = 0):
        self.request_id = request_id
        self.sampling_params = sampling_params
        self.token_ids: list[int] = list(prompt_token_ids)
        self.num_prompt_tokens = len(self.token_ids)
        self.num_computed_tokens = 0
        self.num_cached_tokens = -1  # prefix-cache hit at first schedule; -1 until then
        self.block_ids: list[int] = []  # physical KV blocks, written by the KV cache manager
        self.block_hashes: list[int] = []  # chained hashes of full blocks, extended by the KV cache manager
        self.status = RequestStatus.WAITING
        self.arrival = arrival  # admission order; earlier requests are preempted last
        self.logprobs: list[dict[int, float]] | None = [] if sampling_params.logprobs is not None else None
        self.stop_text: str | None = None  # the text, cut before a matched stop string
        self.error: str | None = None
        self.generator = None  # per-request torch.Generator for seeded sampling (set by the sampler)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def has_pending(self) -> bool:
        return self.token_ids[-1] == PENDING

    def drop_pending(self) -> None:
        """Forget a token sampled after the request stopped (its step launched before the stop was known)."""
        if self.has_pending and len(self.token_ids) > self.num_prompt_tokens:
            self.token_ids.pop()

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[: self.num_prompt_tokens]

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    def __repr__(self):
        return (f"Request({self.request_id!r}, tokens={self.num_tokens}, computed={self.num_computed_tokens}, "
                f"{self.status.value})")


@dataclass
class RequestOutput:
    request_id: Any
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str  # stop | length | error
    num_cached_tokens: int = 0
    logprobs: list[dict[int, float]] | None = None
    error: str | None = None
    error_type: str | None = None  # prompt_too_long | invalid_prompt, with finish_reason 'error'
    prompt: Any = field(default=None, repr=False)
