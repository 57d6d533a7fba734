"""Reporting for `batchllm bench`: the environment record, JSON, the printed tables and the PNG chart."""
import json
import os
import platform
import shlex
import subprocess
import sys
from datetime import date

import click

def environment(device) -> dict:
    import torch

    import batchllm

    env = {"date": date.today().isoformat(), "version": batchllm.__version__, "torch": torch.__version__,
           "device": device.type, "python": platform.python_version()}
    def git(*args) -> str:
        return subprocess.run(["git", *args], capture_output=True, text=True, cwd=os.path.dirname(__file__),
                              timeout=5).stdout.strip()

    try:  # "+dirty": tracked files differ from the commit, so the commit alone does not name the code that ran
        commit = git("rev-parse", "--short", "HEAD") or None
        env["git_commit"] = commit and commit + ("+dirty" if git("status", "--porcelain", "--untracked-files=no")
                                                 else "")
    except (OSError, subprocess.SubprocessError):
        env["git_commit"] = None
    if device.type == "cuda":
        env["card"] = torch.cuda.get_device_name(device)
    else:
        env["card"] = _cpu_name()
        env["threads"] = torch.get_num_threads()
        env["loadavg_1m"] = os.getloadavg()[0]
    return env


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def _strip_private(d):
    if isinstance(d, dict):
        return {k: _strip_private(v) for k, v in d.items() if not k.startswith("_")}
    return d


def write_json(path, result: dict) -> None:
    with open(path, "w") as f:
        json.dump(_strip_private(result), f, indent=2)
        f.write("\n")


def command_line() -> str | None:
    """The command as typed, when run as `batchllm ...` (not under a test runner)."""
    if os.path.basename(sys.argv[0]) in ("batchllm", "__main__.py") and len(sys.argv) > 1:
        return shlex.join(["batchllm", *sys.argv[1:]])
    return None


# -- the report ----------------------------------------------------------------------------------
def _span(spec) -> str:
    return str(spec) if isinstance(spec, int) else f"{spec[0]}..{spec[1]}"


def print_throughput(r: dict) -> None:
    env, w, e = r["env"], r["workload"], r["engine"]
    where = env["card"] + (f", {env['threads']} threads, load {env['loadavg_1m']:.2f}" if "threads" in env else "")
    echo = click.echo
    echo(f"model {r['model']} ({r['dtype']}) on {env['device']}: {where}")
    sampling = f"temperature {w['temperature']:g}" if w.get("temperature") else "greedy"
    echo(f"workload: {w['num_prompts']} prompts, input {_span(w['input_len'])} ({w['prompt_tokens']} tokens), "
         f"output {_span(w['output_len'])} ({w['output_tokens']} tokens), {sampling}, ignore_eos, seed {w['seed']}")
    echo(f"{'':22}{'elapsed s':>10}{'out tok/s':>11}{'total tok/s':>13}{'req/s':>8}")
    echo(f"{'engine':22}{e['elapsed_s']:>10.2f}{e['output_tok_s']:>11.1f}{e['total_tok_s']:>13.1f}"
         f"{e['requests_s']:>8.2f}")
    if "hf" in r:
        h = r["hf"]
        label = f"hf ({h['num_prompts']} prompts, bs {h['batch_size']})"
        echo(f"{label:22}{h['elapsed_s']:>10.2f}{h['output_tok_s']:>11.1f}{h['total_tok_s']:>13.1f}"
             f"{h['requests_s']:>8.2f}")
        echo(f"engine / hf output tok/s: {r['speedup_vs_hf']:.2f}x  (hf generated {h['generated_tokens']} tokens "
             f"for {h['output_tokens']} useful)")
    pw = f"; piecewise graphs replayed by {e['piecewise_steps']} steps (warm-up included)" if "piecewise_steps" in e else ""
    echo(f"steps: {e['prefill_steps']} prefill/mixed {e['prefill_s']:.2f} s, {e['decode_steps']} decode "
         f"{e['decode_s']:.2f} s (mean batch {e['decode_batch_mean']:.1f}); launching {e['execute_s']:.2f} s "
         f"(inputs {e['prepare_s']:.2f} s), waiting on the device {e['wait_s']:.2f} s, scheduler "
         f"{e['scheduler_s']:.2f} s{' (async scheduling)' if e['async_scheduling'] else ''}{pw}")
    echo(f"KV peak {100 * e['peak_kv_usage']:.1f}% of {e['num_kv_blocks']} blocks, prefix hit "
         f"{100 * e['prefix_hit_rate']:.1f}%, preemptions {e['num_preemptions']}")
    if "roofline" in r:
        f = r["roofline"]
        dtype_peak = f" and {f['peak_tflops_dtype']:.2f} in {r['dtype']}" if "peak_tflops_dtype" in f else ""
        echo(f"peaks here: {f['peak_tflops']:.2f} TFLOP/s ({f['matmul_dtype']} {f['matmul_n']}^3 matmul){dtype_peak}, "
             f"{f['peak_bw_gbs']:.1f} GB/s (copy)")
        echo(f"roofline: {f['flops'] / 1e12:.2f} TFLOP, {f['bytes'] / 1e9:.1f} GB over {e['num_steps']} steps -> "
             f"{f['roofline_s']:.2f} s ({f['roofline_output_tok_s']:.0f} out tok/s); achieved "
             f"{f['achieved_tflops']:.3f} TFLOP/s, {f['achieved_bw_gbs']:.1f} GB/s; "
             f"measured/roofline {100 * f['efficiency']:.1f}%")
        echo(f"one kernel at a time (matmuls, then attention): {f['serial_roofline_s']:.2f} s "
             f"({f['serial_roofline_output_tok_s']:.0f} out tok/s); measured/that {100 * f['serial_efficiency']:.1f}%")
        if "serial_floor_s" in f:
            echo(f"  any batch size (weight reads free): {f['serial_floor_s']:.2f} s "
                 f"({e['output_tokens'] / f['serial_floor_s']:.0f} out tok/s)")
        if "serial_decode_s" in f:
            echo(f"  of that: decode steps {f['serial_decode_s']:.2f} s (measured {e['decode_s']:.2f} s), "
                 f"prefill/mixed steps {f['serial_roofline_s'] - f['serial_decode_s']:.2f} s "
                 f"(measured {e['prefill_s']:.2f} s)")


def print_prefix(r: dict) -> None:
    w, on, off = r["workload"], r["caching_on"], r["caching_off"]
    click.echo(f"model {r['model']} ({r.get('dtype')}) on {r['env']['device']}: {r['env']['card']}")
    click.echo(f"workload: {w['num_prompts']} prompts = {w['prefix_len']} shared + {w['unique_len']} unique tokens, "
               f"{w['output_len']} out")
    click.echo(f"{'':14}{'elapsed s':>10}{'out tok/s':>11}{'total tok/s':>13}{'hit rate':>10}")
    for name, x in (("caching on", on), ("caching off", off)):
        click.echo(f"{name:14}{x['elapsed_s']:>10.2f}{x['output_tok_s']:>11.1f}{x['total_tok_s']:>13.1f}"
                   f"{100 * x['prefix_hit_rate']:>9.1f}%")
    click.echo(f"on / off: {r['speedup']:.2f}x")


def write_png(r: dict | None, path: str | None) -> None:
    """A bar chart of output tok/s: engine, HF, roofline. write_png(None, None) only checks matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise click.UsageError("--png needs matplotlib: pip install 'batchllm[bench]'") from None
    if r is None:
        return
    bars = [("batchllm", r["engine"]["output_tok_s"])]
    if "hf" in r:
        bars.append(("HF generate", r["hf"]["output_tok_s"]))
    if "roofline" in r:
        bars.append(("roofline", r["roofline"]["roofline_output_tok_s"]))
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar([b[0] for b in bars], [b[1] for b in bars], color=["#2a6fdb", "#999999", "#dddddd"][: len(bars)])
    for i, (_, v) in enumerate(bars):
        ax.text(i, v, f"{v:,.0f}", ha="center", va="bottom")
    ax.set_ylabel("output tokens / s")
    ax.set_title(f"{r['model']} on {r['env']['card']} ({r['env']['date']})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
