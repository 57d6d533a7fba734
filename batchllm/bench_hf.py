"""The benchmark's baseline: HF transformers `generate` on the same prompts, batched as a user would.

    model = load_hf_model("smollm2-135m", torch.device("cpu"), torch.float32)
    result = run_hf(model, prompts, output_lens, batch_size=16, device=torch.device("cpu"))

Static batches of consecutive prompts, left padded, greedy. Each batch runs to its longest requested
output (min_new_tokens = max_new_tokens, so EOS can't stop it early); only each prompt's own requested
output counts as useful, so the padding and over-generation a static batch costs show in the figure.
Presets get random weights from their config (AutoModelForCausalLM.from_config) on the device; a path or
alias is loaded with from_pretrained (GGUF through gguf_file=), as the engine resolves it.
"""
import time

import torch


def _dtype_kwarg(dtype: torch.dtype) -> dict:
    import transformers
    from packaging.version import Version

    # `dtype=` since transformers 4.56; `torch_dtype=` before (and deprecated after).
    return {"dtype": dtype} if Version(transformers.__version__) >= Version("4.56") else {"torch_dtype": dtype}


def load_hf_model(model: str, device: torch.device, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    from batchllm.models import presets

    if model in presets.preset_names():
        cfg = presets.get_preset(model)
        with torch.device(device):
            m = AutoModelForCausalLM.from_config(cfg, **_dtype_kwarg(dtype))
    else:
        from batchllm.models import loader, store

        fmt, p = loader.find_format(store.resolve(model))
        if fmt == "gguf":
            m = AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name, trust_remote_code=False,
                                                     **_dtype_kwarg(dtype))
        else:
            m = AutoModelForCausalLM.from_pretrained(str(p), trust_remote_code=False, **_dtype_kwarg(dtype))
        m = m.to(device)
    return m.eval()


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _pad_id(model) -> int:
    cfg = model.config
    for v in (getattr(cfg, "pad_token_id", None), getattr(cfg, "eos_token_id", None)):
        if isinstance(v, (list, tuple)) and v:
            v = v[0]
        if isinstance(v, int):
            return v
    return 0


@torch.inference_mode()
def _generate_batch(model, batch: list[list[int]], max_new: int, device, pad_id: int, eos_id) -> int:
    """Left-pad, generate exactly max_new tokens for every row; -> generated tokens per row."""
    from transformers import GenerationConfig

    width = max(len(p) for p in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, p in enumerate(batch):
        ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[i, width - len(p):] = 1
    gen = GenerationConfig(max_new_tokens=max_new, min_new_tokens=max_new, do_sample=False,
                           pad_token_id=pad_id, eos_token_id=eos_id)
    out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=gen)
    return out.shape[1] - width


def run_hf(model, prompts: list[list[int]], output_lens: list[int], batch_size: int,
           device: torch.device) -> dict:
    """Time `generate` over static batches of consecutive prompts. -> figures for the report."""
    pad_id = _pad_id(model)
    eos = getattr(model.config, "eos_token_id", None)
    # warm-up: one short batch, so first-call costs (allocator, kernels) stay out of the figure
    _generate_batch(model, [prompts[0][:8]], 2, device, pad_id, eos)
    _sync(device)
    generated = 0
    t0 = time.perf_counter()
    for i in range(0, len(prompts), batch_size):
        batch, outs = prompts[i:i + batch_size], output_lens[i:i + batch_size]
        n = _generate_batch(model, batch, max(outs), device, pad_id, eos)
        if n != max(outs):  # min_new_tokens should make this impossible
            raise RuntimeError(f"HF generate made {n} tokens, expected {max(outs)}")
        generated += n * len(batch)
    _sync(device)
    elapsed = time.perf_counter() - t0
    useful = sum(output_lens)
    prompt_tokens = sum(len(p) for p in prompts)
    return {
        "num_prompts": len(prompts),
        "batch_size": batch_size,
        "elapsed_s": elapsed,
        "output_tokens": useful,
        "generated_tokens": generated,  # useful + what static batching wastes
        "output_tok_s": useful / elapsed,
        "total_tok_s": (useful + prompt_tokens) / elapsed,
        "requests_s": len(prompts) / elapsed,
    }
