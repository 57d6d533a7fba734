"""Sampling from one step's logits: greedy, temperature, top-k, top-p, min-p, per-request seeds, logprobs.

Rows are independent: a seeded request draws its noise from its own generator, so it samples the same
text whatever else shares the batch. Sampling is an exponential race (argmax of probs / Exp(1) noise),
which equals a categorical draw and needs no host round trip.
"""
import numpy as np
import torch

from batchllm.engine.host_memory import to_device
from batchllm.engine.request import Request


def _per_row(values, dtype, device) -> torch.Tensor:
    """A small per-row parameter tensor on the device, through page-locked memory: torch.tensor(list,
    device=cuda) copies from pageable memory and waits for the stream, which would make the next step's
    launch wait for the running step (asynchronous scheduling lost for every sampled workload)."""
    return to_device(np.asarray(values), device, dtype)


class Sampler:
    def __init__(self, device, seed: int = 0):
        self.device = device
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(seed)

    def __call__(self, logits: torch.Tensor, reqs: list[Request]):
        """logits: [n, vocab] float32, row i for reqs[i] -> (token ids [n], logprob tensors or None).

        Nothing here waits for the device: the logprob tensors become dicts in `logprob_dicts`, once on the host.
        """
        params = [r.sampling_params for r in reqs]
        if all(p.greedy for p in params):
            tokens = logits.argmax(dim=-1)
        else:
            greedy = _per_row([p.greedy for p in params], torch.bool, logits.device)
            tokens = torch.where(greedy, logits.argmax(dim=-1), self._sample(logits, reqs, params))
        if all(p.logprobs is None for p in params):
            return tokens, None
        return tokens, self._logprobs(logits, tokens, max((p.logprobs or 0) for p in params))

    def _sample(self, logits, reqs, params):
        n, vocab = logits.shape
        dev = logits.device
        temp = _per_row([p.temperature if p.temperature > 0 else 1.0 for p in params], logits.dtype, dev)
        x = logits / temp[:, None]
        top_k = [p.top_k if p.top_k > 0 else vocab for p in params]
        top_p = [p.top_p for p in params]
        min_p = [p.min_p for p in params]
        if any(k < vocab for k in top_k) or any(q < 1.0 for q in top_p):
            x = _top_k_top_p(x, _per_row(top_k, torch.int64, dev), _per_row(top_p, x.dtype, dev))
        probs = x.softmax(dim=-1)
        if any(m > 0 for m in min_p):
            floor = _per_row(min_p, probs.dtype, dev)[:, None] * probs.max(dim=-1, keepdim=True).values
            probs = probs.masked_fill(probs < floor, 0.0)
        noise = torch.empty_like(probs).exponential_(generator=self.generator)
        for i, r in enumerate(reqs):
            if params[i].seed is not None and not params[i].greedy:
                if r.generator is None:
                    r.generator = torch.Generator(device=dev)
                    r.generator.manual_seed(params[i].seed)
                noise[i].exponential_(generator=r.generator)
        return (probs / noise).argmax(dim=-1)

    @staticmethod
    def _logprobs(logits, tokens, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> (top-k logprobs [n, k], their token ids [n, k], the sampled token's logprob [n])."""
        lp = logits.log_softmax(dim=-1)
        top_v, top_i = lp.topk(k, dim=-1) if k > 0 else (lp[:, :0], lp[:, :0].long())
        return top_v, top_i, lp.gather(1, tokens[:, None])[:, 0]


def logprob_dicts(tensors, tokens: list[int], reqs: list[Request]) -> list[dict[int, float] | None]:
    """The host side of Sampler._logprobs: {token id: logprob} per row (its top-k and the sampled token)."""
    top_v, top_i, chosen = (t.tolist() for t in tensors)
    out = []
    for i, r in enumerate(reqs):
        k = r.sampling_params.logprobs
        if k is None:
            out.append(None)
            continue
        d = dict(zip(top_i[i][:k], top_v[i][:k]))
        d[tokens[i]] = chosen[i]
        out.append(d)
    return out


def _top_k_top_p(x: torch.Tensor, k: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """x: [n, vocab] logits; k: [n] int; p: [n] float -> x with the excluded tokens at -inf."""
    sorted_x, idx = x.sort(dim=-1, descending=True)
    ranks = torch.arange(x.shape[-1], device=x.device)[None, :]
    drop = ranks >= k[:, None]
    probs = sorted_x.masked_fill(drop, float("-inf")).softmax(dim=-1)
    cum = probs.cumsum(dim=-1)
    drop |= (cum - probs) >= p[:, None]  # keep the smallest prefix whose mass reaches p (the top token always)
    sorted_x = sorted_x.masked_fill(drop, float("-inf"))
    return torch.full_like(x, float("-inf")).scatter(-1, idx, sorted_x)
