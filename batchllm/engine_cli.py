"""`batchllm generate`: run a few prompts through the engine and print the completions.

    batchllm generate -m smollm2-135m --chat "What is the capital of France?" "Name a prime number."
"""
import sys

import click


@click.command()
@click.option("-m", "--model", default="smollm2-135m", show_default=True,
              help="alias, local dir, .gguf, s3://... or hf:org/name")
@click.option("--device", default="auto", show_default=True, type=click.Choice(["auto", "cpu", "cuda"]))
@click.option("--dtype", default="auto", show_default=True,
              type=click.Choice(["auto", "float32", "bfloat16", "float16"]))
@click.option("--quantization", default="none", show_default=True, type=click.Choice(["none", "fp8", "awq"]),
              help="fp8: decoder weights quantized at load, fp8 matmuls (Ada/Hopper GPUs); awq: an AWQ checkpoint "
                   "(detected without it)")
@click.option("--kv-cache-dtype", default="auto", show_default=True, type=click.Choice(["auto", "fp8"]),
              help="fp8: K/V stored in e4m3, half of bf16's bytes")
@click.option("--max-tokens", default=64, show_default=True, type=int)
@click.option("--temperature", default=0.0, show_default=True, type=float)
@click.option("--top-p", default=1.0, show_default=True, type=float)
@click.option("--seed", default=None, type=int)
@click.option("--chat/--no-chat", default=True, show_default=True, help="apply the model's chat template")
@click.option("--system", default=None, help="a system prompt (with --chat)")
@click.argument("prompts", nargs=-1, required=True)
def generate(model, device, dtype, quantization, kv_cache_dtype, max_tokens, temperature, top_p, seed, chat, system,
             prompts):
    """Generate completions for PROMPTS (each argument is one prompt)."""
    from batchllm import LLM, SamplingParams

    try:
        sp = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed)
        llm = LLM(model, device=device, dtype=dtype, quantization=quantization, kv_cache_dtype=kv_cache_dtype)
    except ValueError as e:  # user errors: bad parameters, unknown model
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
    if chat:
        convs = [([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": p}]
                 for p in prompts]
        outs = llm.chat(convs, sp)
    else:
        outs = llm.generate(list(prompts), sp)
    for p, o in zip(prompts, outs):
        if o.finish_reason == "error":
            click.echo(f"error: {o.error}", err=True)
            continue
        click.echo(f"### {p}\n{o.text.strip()}\n")
    s = llm.stats()
    click.echo(f"[{s['prompt_tokens']} prompt + {s['generation_tokens']} generated tokens]", err=True)
