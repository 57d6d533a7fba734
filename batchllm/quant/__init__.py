"""Quantized weights: fp8 (quantized at load, quant/fp8.py) and AWQ (read from the checkpoint, quant/awq.py)."""


def resolve(requested: str | None, hf_config, random_weights: bool) -> str | None:
    """The quantization the engine runs (None, "fp8" or "awq"): the user's setting checked against the checkpoint.
    An AWQ checkpoint runs as AWQ whether asked for or not. A random-weight preset asked for "awq" gets an AWQ
    quantization_config (quant/awq.py's random_config), so that its layers are built 4-bit. ValueError otherwise."""
    from batchllm.quant import awq

    requested = None if requested in (None, "none") else requested
    method = awq.checkpoint_method(hf_config)
    if method is None:
        if requested == "awq":
            if not random_weights:
                raise ValueError("quantization awq needs an AWQ checkpoint (quant_method awq in its config.json); "
                                 "to quantize a full-precision checkpoint as it loads, use fp8")
            hf_config.quantization_config = awq.random_config()
        return requested
    if method != "awq":
        raise ValueError(f"a pre-quantized checkpoint of quant_method {method}: batchllm reads AWQ checkpoints only")
    if requested == "fp8":
        raise ValueError("quantization fp8 on an AWQ checkpoint: its weights are 4-bit already; use awq or none")
    awq.group_size(hf_config)  # a layout batchllm reads, or a one-line error now
    return "awq"
