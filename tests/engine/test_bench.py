"""`batchllm bench`: the commands run end to end on the tiny model, and their figures add up."""
import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from batchllm import bench, bench_roofline
from batchllm.cli import main


@pytest.fixture
def small_peaks(monkeypatch):
    """The real peak measurement, at sizes that take milliseconds."""
    real = bench_roofline.measure_peaks
    monkeypatch.setattr(bench_roofline, "measure_peaks",
                        lambda device, dtype, fp8=False: real(device, dtype, matmul_n=128, copy_bytes=1 << 20, fp8=fp8))


def _run(args):
    r = CliRunner().invoke(main, ["bench", *args])
    return r


def test_throughput_json_and_hf_baseline(tiny_model_dir, tmp_path, small_peaks):
    out = tmp_path / "r.json"
    args = ["throughput", "--model", str(tiny_model_dir), "--device", "cpu", "--num-prompts", "5",
            "--input-len-range", "5", "40", "--output-len-range", "2", "7", "--seed", "3", "--warmup", "1",
            "--baseline", "hf", "--hf-batch-size", "2", "--json", str(out)]
    r = _run(args)
    assert r.exit_code == 0, r.output + repr(r.exception)
    res = json.loads(out.read_text())
    assert {"env", "workload", "engine_args", "engine", "roofline", "hf", "speedup_vs_hf"} <= set(res)
    _, out_lens = bench.make_workload(512, 5, None or (5, 40), (2, 7), seed=3)
    e, h, w = res["engine"], res["hf"], res["workload"]
    assert e["output_tokens"] == w["output_tokens"] == sum(out_lens)
    assert 5 * 5 <= e["prompt_tokens"] == w["prompt_tokens"] <= 5 * 40
    assert e["output_tok_s"] > 0 and e["elapsed_s"] > 0
    assert e["total_tok_s"] == pytest.approx((e["output_tokens"] + e["prompt_tokens"]) / e["elapsed_s"])
    assert e["prefill_steps"] >= 1 and e["decode_steps"] >= 1
    assert e["num_steps"] == e["prefill_steps"] + e["decode_steps"]
    assert e["prefill_s"] + e["decode_s"] <= e["elapsed_s"]
    assert 0 < e["peak_kv_usage"] <= 1
    assert e["prefix_hit_rate"] == 0.0  # random prompts share nothing
    # HF: all 5 prompts on the CPU, static batches of 2 run to their longest output
    assert h["num_prompts"] == 5 and h["batch_size"] == 2
    assert h["output_tokens"] == sum(out_lens)
    assert h["generated_tokens"] == sum(2 * max(out_lens[i:i + 2]) for i in (0, 2)) + max(out_lens[4:])
    assert res["speedup_vs_hf"] == pytest.approx(e["output_tok_s"] / h["output_tok_s"])
    f = res["roofline"]
    assert f["peak_tflops"] > 0 and f["peak_bw_gbs"] > 0 and f["flops"] > 0 and f["bytes"] > 0
    # every weight counts, also those reordered for the CPU's matmul (no longer nn.Parameters)
    from safetensors.torch import load_file

    weights = {}
    for path in Path(tiny_model_dir).glob("*.safetensors"):
        weights.update(load_file(path))
    dense = sum(t.numel() for n, t in weights.items() if "embed_tokens" not in n and "lm_head" not in n)
    assert f["params"] == dense + weights["model.embed_tokens.weight"].numel()
    assert 0 < f["efficiency"] and f["roofline_s"] > 0
    assert f["roofline_s"] <= f["serial_roofline_s"] and f["serial_efficiency"] >= f["efficiency"]
    assert f["serial_floor_s"] <= f["serial_roofline_s"] and 0 <= f["serial_decode_s"] <= f["serial_roofline_s"]
    assert "engine" in r.output and "hf (5 prompts, bs 2)" in r.output
    assert "any batch size (weight reads free)" in r.output and "of that: decode steps" in r.output


def test_prefix_hit_rate_on_and_off(tiny_model_dir, tmp_path):
    out = tmp_path / "p.json"
    r = _run(["prefix", "--model", str(tiny_model_dir), "--device", "cpu", "--num-prompts", "4",
              "--prefix-len", "64", "--unique-len", "8", "--output-len", "2", "--warmup", "0", "--json", str(out)])
    assert r.exit_code == 0, r.output + repr(r.exception)
    res = json.loads(out.read_text())
    assert res["caching_on"]["prefix_hit_rate"] > 0
    assert res["caching_on"]["prefix_cache_hits"] >= 3 * 48  # requests 2..4 reuse at least 3 full blocks
    assert res["caching_off"]["prefix_hit_rate"] == 0
    assert res["caching_on"]["output_tokens"] == res["caching_off"]["output_tokens"] == 8
    assert "on / off" in r.output


def test_fixed_lengths_and_bad_arguments(tiny_model_dir):
    prompts, outs = bench.make_workload(100, 3, 7, 5, seed=0)
    assert [len(p) for p in prompts] == [7, 7, 7] and outs == [5, 5, 5]
    assert all(10 <= t < 90 for p in prompts for t in p)
    r = _run(["throughput", "--model", str(tiny_model_dir), "--device", "cpu", "--input-len-range", "10", "5"])
    assert r.exit_code == 2 and "--input-len-range" in r.output
    r = _run(["throughput", "--model", "no-such-preset-or-path", "--device", "cpu", "--no-roofline"])
    assert r.exit_code == 2 and "Error" in r.output


def test_sampled_workload(tiny_model_dir, tmp_path):
    out = tmp_path / "s.json"
    r = _run(["throughput", "--model", str(tiny_model_dir), "--device", "cpu", "--num-prompts", "6", "--input-len",
              "9", "--output-len-range", "3", "8", "--temperature", "0.8", "--no-roofline", "--warmup", "0",
              "--json", str(out)])
    assert r.exit_code == 0, r.output
    assert "temperature 0.8, ignore_eos" in r.output
    d = json.loads(out.read_text())
    assert d["workload"]["temperature"] == 0.8 and d["engine"]["output_tokens"] == d["workload"]["output_tokens"]
    for bad, hint in ((["--temperature", "-1"], "--temperature"), (["--temperature", "1", "--baseline", "hf"],
                                                                   "--baseline")):
        r = _run(["throughput", "--model", str(tiny_model_dir), "--device", "cpu", "--no-roofline", *bad])
        assert r.exit_code == 2 and hint in r.output, r.output


def test_step_costs_by_hand():
    shape = bench_roofline.ModelShape(dense_params=1000, hidden=8, vocab=10, layers=2, heads=2, kv_heads=1,
                                      head_dim=4, elt=2, kv_elt=2)
    # one decode at context 5 (6th token), one 3-token prefill chunk from scratch; 2 rows sample
    flops, nbytes = bench_roofline.step_costs(shape, np.array([5, 0]), np.array([1, 3]), num_sampled=2)
    pairs = (1 * 5 + 1) + (3 * 4 / 2)
    assert flops == 2 * 1000 * 4 + 2 * 8 * 10 * 2 + 4 * 2 * 2 * 4 * pairs
    kv_tok = 2 * 2 * 1 * 4 * 2
    assert nbytes == (1000 + 80) * 2 + (6 + 3) * kv_tok + 4 * kv_tok
    # one kernel at a time: matmuls bound by the larger of FLOPs and weight bytes, then attention alike
    peaks = {"peak_tflops": 1e-9, "peak_bw_gbs": 1e-6}  # 1000 FLOP/s, 1000 B/s: both terms in seconds / 1000
    step = type("S", (), {"starts": np.array([5, 0]), "q_lens": np.array([1, 3]), "num_sampled": 2})
    est = bench_roofline.roofline(shape, [step], peaks, elapsed_s=100.0)
    matmul_s = max(2 * 1000 * 4 + 2 * 8 * 10 * 2, (1000 + 80) * 2) / 1000
    attention_s = max(4 * 2 * 2 * 4 * pairs, (6 + 3) * kv_tok + 4 * kv_tok) / 1000
    assert est["serial_roofline_s"] == pytest.approx(matmul_s + attention_s)
    assert est["roofline_s"] == pytest.approx(max(flops, nbytes) / 1000)
    assert est["roofline_s"] <= est["serial_roofline_s"] <= est["compute_s"] + est["memory_s"]
    assert est["serial_decode_s"] == 0.0  # a mixed step
    assert est["serial_floor_s"] == pytest.approx((2 * 1000 * 4 + 2 * 8 * 10 * 2) / 1000 + attention_s)
    decode = type("S", (), {"starts": np.array([5, 9]), "q_lens": np.array([1, 1]), "num_sampled": 2})
    est = bench_roofline.roofline(shape, [step, decode, decode], peaks, elapsed_s=100.0)
    one = bench_roofline.roofline(shape, [decode], peaks, elapsed_s=100.0)["serial_roofline_s"]
    assert est["serial_decode_s"] == pytest.approx(2 * one)
    assert est["serial_roofline_s"] == pytest.approx(matmul_s + attention_s + 2 * one)
    # fp8 weights: the dense matmuls at the fp8 peak, the lm_head and attention at the model dtype's (half of it)
    fp8 = {"peak_tflops": 2e-9, "peak_tflops_dtype": 1e-9, "peak_bw_gbs": 1e-6}
    est = bench_roofline.roofline(shape, [step], fp8, elapsed_s=100.0)
    matmul_fp8 = max(2 * 1000 * 4 / 2000 + 2 * 8 * 10 * 2 / 1000, (1000 + 80) * 2 / 1000)
    assert est["serial_roofline_s"] == pytest.approx(matmul_fp8 + attention_s)


def test_png_needs_matplotlib_or_draws(tiny_model_dir, tmp_path):
    png = tmp_path / "c.png"
    r = _run(["throughput", "--model", str(tiny_model_dir), "--device", "cpu", "--num-prompts", "2",
              "--input-len", "8", "--output-len", "2", "--no-roofline", "--warmup", "0", "--png", str(png)])
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert r.exit_code == 2 and "matplotlib" in r.output
    else:
        assert r.exit_code == 0 and png.stat().st_size > 0


def test_preset_model_with_hf_baseline(monkeypatch, tmp_path):
    """A random-weight preset (a tiny one added for the test): the engine and HF's from_config both build it."""
    from batchllm.models import presets

    tiny = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, max_position_embeddings=512, rms_norm_eps=1e-6,
                rope_theta=10000.0, rope_scaling=None, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
    monkeypatch.setitem(presets._PRESETS, "tiny-test", ("llama", tiny))
    out = tmp_path / "r.json"
    r = _run(["throughput", "--model", "tiny-test", "--device", "cpu", "--num-prompts", "3", "--input-len", "12",
              "--output-len", "4", "--warmup", "0", "--no-roofline", "--baseline", "hf", "--json", str(out)])
    assert r.exit_code == 0, r.output + repr(r.exception)
    res = json.loads(out.read_text())
    assert res["engine"]["output_tokens"] == res["hf"]["output_tokens"] == res["hf"]["generated_tokens"] == 12
