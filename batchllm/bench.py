"""`batchllm bench`: offline throughput benchmarks of the engine, in the spirit of `vllm bench throughput`.

    batchllm bench throughput --model smollm2-135m --device cpu --baseline hf      # issue 2's CPU figure
    batchllm bench throughput --model llama3-8b --num-prompts 1000 \\
        --input-len-range 100 1024 --output-len-range 100 1024 --baseline hf --json out.json --png out.png
    batchllm bench prefix --model llama3-8b                # 512 x (1000 shared + 100 unique) tokens, 50 out

Prompts are random token ids in [10, vocab - 10), greedy (or `--temperature T`), ignore_eos, so every request
makes exactly its requested output. `--model` is a path, an alias (smollm2-135m) or a random-weight preset (llama3-8b,
llama3.2-1b, qwen3-0.6b: weights made on the device, nothing downloaded).

The engine runs and its steps are timed in bench_run.py; the roofline is bench_roofline.py, the HF baseline
bench_hf.py, the report bench_report.py.
"""
import gc

import click

from batchllm.bench_report import command_line, environment, print_prefix, print_throughput, write_json, write_png
from batchllm.bench_run import make_prefix_workload, make_workload, profile_table, run_engine


# -- building the engine and describing the run ------------------------------------------------
def build_llm(model: str, **engine_args):
    """LLM(model, ...) with None args left to the engine; a user mistake becomes one line, exit 2."""
    from batchllm.engine.llm import LLM

    args = {k: v for k, v in engine_args.items() if v is not None}
    try:
        return LLM(model, **args)
    except ValueError as e:  # bad engine arg, unknown model/preset (store.ModelError is a ValueError)
        msg = str(e).splitlines()[0]
        if "not found" in msg:
            from batchllm.models.presets import preset_names

            msg += f"; or a random-weight preset: {', '.join(preset_names())}"
        raise click.UsageError(msg) from None


def free_llm(llm) -> None:
    import torch

    llm.__dict__.clear()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# -- the commands --------------------------------------------------------------------------------
def _engine_options(f):
    for opt in reversed([
        click.option("--model", "-m", required=True, help="Path, alias (smollm2-135m) or preset (llama3-8b, ...)."),
        click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True),
        click.option("--dtype", type=click.Choice(["auto", "float32", "bfloat16", "float16"]), default="auto",
                     show_default=True),
        click.option("--kv-cache-dtype", type=click.Choice(["auto", "fp8"]), default="auto", show_default=True,
                     help="fp8: K/V stored in e4m3 (half the bytes of bf16; CUDA needs compute capability >= 8.9)."),
        click.option("--quantization", type=click.Choice(["none", "fp8", "awq"]), default="none", show_default=True,
                     help="fp8: decoder weights in e4m3, fp8 matmuls (CUDA needs compute capability >= 8.9). awq: 4-bit "
                          "weights (random for a preset; an AWQ checkpoint runs as AWQ anyway)."),
        click.option("--max-num-seqs", type=int, default=None),
        click.option("--max-num-batched-tokens", type=int, default=None),
        click.option("--num-kv-blocks", type=int, default=None),
        click.option("--max-model-len", type=int, default=None),
        click.option("--enforce-eager", is_flag=True, help="No CUDA graphs."),
        click.option("--piecewise-graphs/--no-piecewise-graphs", default=True, show_default=True,
                     help="CUDA: prefill and mixed steps of <= 4,096 tokens as graphs cut at attention."),
        click.option("--async-scheduling/--no-async-scheduling", default=None,
                     help="Schedule each step while the previous one runs [on for CUDA, off on the CPU]."),
        click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random prompts."),
        click.option("--threads", type=int, default=None,
                     help="CPU: torch threads (torch.set_num_threads); 1 avoids OpenMP stalls on a busy machine."),
        click.option("--warmup", type=int, default=4, show_default=True, help="Warm-up requests, not timed."),
        click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None, help="Write results."),
    ]):
        f = opt(f)
    return f


def _engine_args(device, dtype, kv_cache_dtype, quantization, max_num_seqs, max_num_batched_tokens, num_kv_blocks,
                 max_model_len, enforce_eager, async_scheduling, piecewise_graphs, **extra):
    return dict(device=device, dtype=dtype, kv_cache_dtype=kv_cache_dtype, quantization=quantization,
                max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens, num_kv_blocks=num_kv_blocks,
                max_model_len=max_model_len, enforce_eager=enforce_eager or None, async_scheduling=async_scheduling,
                piecewise_graphs=piecewise_graphs, **extra)


def _len_spec(fixed, rng, name):
    if fixed is not None:
        if fixed < 1:
            raise click.BadParameter("must be >= 1", param_hint=f"--{name}")
        return fixed
    lo, hi = rng
    if not 1 <= lo <= hi:
        raise click.BadParameter(f"needs 1 <= A <= B, got {lo} {hi}", param_hint=f"--{name}-range")
    return (lo, hi)


@click.group()
def bench():
    """Offline benchmarks of the engine: throughput, prefix caching."""


@bench.command()
@_engine_options
@click.option("--num-prompts", type=int, default=64, show_default=True)
@click.option("--input-len", type=int, default=None, help="Fixed prompt length (overrides the range).")
@click.option("--input-len-range", type=(int, int), default=(16, 256), show_default=True)
@click.option("--output-len", type=int, default=None, help="Fixed output length (overrides the range).")
@click.option("--output-len-range", type=(int, int), default=(16, 128), show_default=True)
@click.option("--baseline", type=click.Choice(["none", "hf"]), default="none", show_default=True,
              help="hf: HF transformers generate on a sample of the same prompts, in this process.")
@click.option("--temperature", type=float, default=0.0, show_default=True,
              help="0: greedy; above 0 the engine samples (on the device), as most jobs do.")
@click.option("--hf-sample", type=int, default=None, help="Prompts for the baseline [all on CPU, 64 on GPU].")
@click.option("--hf-batch-size", type=int, default=None, help="Static batch size [16 on CPU, 64 on GPU].")
@click.option("--roofline/--no-roofline", default=True, show_default=True,
              help="Measure peak FLOP/s and bandwidth here and estimate the workload's roofline.")
@click.option("--profile", is_flag=True, help="Print a torch.profiler summary of the engine run.")
@click.option("--png", "png_path", type=click.Path(dir_okay=False), default=None, help="Bar chart (matplotlib).")
def throughput(model, num_prompts, input_len, input_len_range, output_len, output_len_range, seed, warmup, baseline,
               temperature, hf_sample, hf_batch_size, roofline, profile, json_path, png_path, threads, **engine_kw):
    """Random-token prompts through the engine: output, total and request throughput."""
    import torch

    if num_prompts < 1:
        raise click.BadParameter("must be >= 1", param_hint="--num-prompts")
    in_spec = _len_spec(input_len, input_len_range, "input-len")
    out_spec = _len_spec(output_len, output_len_range, "output-len")
    if temperature < 0:
        raise click.BadParameter("must be >= 0", param_hint="--temperature")
    if temperature > 0 and baseline == "hf":
        raise click.BadParameter("the HF baseline runs greedy: use --temperature 0", param_hint="--baseline")
    if png_path:
        write_png(None, None)  # fail now, not after the run, when matplotlib is missing
    device = torch.device(_resolve_device(engine_kw["device"]))
    if threads:
        torch.set_num_threads(threads)
    dtype = _resolve_dtype(engine_kw["dtype"], device)
    peaks = None
    if roofline:  # before the engine sizes its KV pool from the memory left
        from batchllm.bench_roofline import measure_peaks

        peaks = measure_peaks(device, dtype, fp8=engine_kw["quantization"] == "fp8")
    llm = build_llm(model, **_engine_args(**engine_kw))
    prompts, out_lens = make_workload(llm.hf_config.vocab_size, num_prompts, in_spec, out_spec, seed)
    result = {
        "benchmark": "throughput", "command": command_line(),
        "model": model, "dtype": str(llm.runner.dtype).replace("torch.", ""),
        "env": environment(device),
        "workload": {"num_prompts": num_prompts, "input_len": in_spec, "output_len": out_spec, "seed": seed,
                     "prompt_tokens": sum(map(len, prompts)), "output_tokens": sum(out_lens), "ignore_eos": True,
                     "temperature": temperature},
        "engine_args": {"max_num_seqs": llm.max_num_seqs, "max_num_batched_tokens": llm.config.token_budget(),
                        "num_kv_blocks": llm.runner.num_kv_blocks, "block_size": llm.config.block_size,
                        "enforce_eager": llm.config.enforce_eager, "max_model_len": llm.max_model_len,
                        "piecewise_graphs": llm.runner.piecewise is not None,
                        "kv_cache_dtype": str(llm.runner.kv_dtype).replace("torch.", ""),
                        "quantization": llm.runner.quantization},
    }
    graphs = llm.runner.graphs
    if graphs is not None and graphs.cost_ms is not None:  # each decode graph's time, and what each size pads to
        result["graphs"] = {"sizes": graphs.sizes, "cost_ms": [round(c, 4) for c in graphs.cost_ms],
                            "pads_to": [graphs.padded_size(s) for s in graphs.sizes]}
    result["engine"] = eng = run_engine(llm, prompts, out_lens, warmup=warmup, profile=profile,
                                            temperature=temperature)
    if llm.runner.piecewise is not None:  # steps that ran through the piecewise graphs (warm-up included)
        eng["piecewise_steps"] = llm.runner.piecewise.num_replays
    if peaks is not None:
        from batchllm.bench_roofline import ModelShape
        from batchllm.bench_roofline import roofline as estimate

        result["roofline"] = estimate(ModelShape.from_llm(llm), eng.pop("_steps"), peaks, eng["elapsed_s"])
        result["roofline"]["roofline_output_tok_s"] = eng["output_tokens"] / result["roofline"]["roofline_s"]
        result["roofline"]["serial_roofline_output_tok_s"] = (eng["output_tokens"]
                                                              / result["roofline"]["serial_roofline_s"])
    free_llm(llm)
    del llm
    if baseline == "hf":
        from batchllm.bench_hf import load_hf_model, run_hf

        n = min(num_prompts, hf_sample or (num_prompts if device.type == "cpu" else 64))
        bs = hf_batch_size or (16 if device.type == "cpu" else 64)
        hf_model = load_hf_model(model, device, dtype)
        result["hf"] = run_hf(hf_model, prompts[:n], out_lens[:n], bs, device)
        del hf_model
        gc.collect()
        result["speedup_vs_hf"] = eng["output_tok_s"] / result["hf"]["output_tok_s"]
    print_throughput(result)
    if "_profile" in eng:
        click.echo(profile_table(eng.pop("_profile"), device.type))
    if json_path:
        write_json(json_path, result)
    if png_path:
        write_png(result, png_path)


@bench.command()
@_engine_options
@click.option("--num-prompts", type=int, default=512, show_default=True)
@click.option("--prefix-len", type=int, default=1000, show_default=True, help="Shared system-prompt tokens.")
@click.option("--unique-len", type=int, default=100, show_default=True, help="Unique tokens per request.")
@click.option("--output-len", type=int, default=50, show_default=True)
def prefix(model, num_prompts, prefix_len, unique_len, output_len, seed, warmup, json_path, threads, **engine_kw):
    """A shared-system-prompt workload with prefix caching on, then off (a fresh engine each)."""
    import torch

    for name, v in (("num-prompts", num_prompts), ("unique-len", unique_len), ("output-len", output_len)):
        if v < 1:
            raise click.BadParameter("must be >= 1", param_hint=f"--{name}")
    device = torch.device(_resolve_device(engine_kw["device"]))
    if threads:
        torch.set_num_threads(threads)
    result = {"benchmark": "prefix", "command": command_line(), "model": model, "env": environment(device),
              "workload": {"num_prompts": num_prompts, "prefix_len": prefix_len, "unique_len": unique_len,
                           "output_len": output_len, "seed": seed}}
    prompts = None
    for caching in (True, False):
        llm = build_llm(model, **_engine_args(**engine_kw, enable_prefix_caching=caching))
        if prompts is None:
            prompts = make_prefix_workload(llm.hf_config.vocab_size, num_prompts, prefix_len, unique_len, seed)
            result["dtype"] = str(llm.runner.dtype).replace("torch.", "")
        r = run_engine(llm, prompts, [output_len] * num_prompts, warmup=warmup)
        r.pop("_steps", None)
        result["caching_on" if caching else "caching_off"] = r
        free_llm(llm)
        del llm
    result["speedup"] = result["caching_on"]["output_tok_s"] / result["caching_off"]["output_tok_s"]
    print_prefix(result)
    if json_path:
        write_json(json_path, result)


def _resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise click.UsageError("--device cuda: no CUDA device here (this torch: " + torch.__version__ + ")")
    return device


def _resolve_dtype(dtype: str, device):
    import torch

    if dtype == "auto":  # the engine's own rule
        from batchllm.engine.config import EngineConfig

        return EngineConfig(model="", device=device.type).resolved_dtype()
    return getattr(torch, dtype)
