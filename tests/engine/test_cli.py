"""`batchllm generate` and the command group."""
from click.testing import CliRunner

from batchllm.cli import main


def test_group_lists_every_command():
    r = CliRunner().invoke(main, ["--help"])
    assert r.exit_code == 0
    for name in ("submit", "worker", "validate", "plan", "status", "models", "generate", "bench"):
        assert name in r.output


def test_generate_prints_completions(tiny_model_dir):
    r = CliRunner().invoke(main, ["generate", "-m", tiny_model_dir, "--device", "cpu", "--max-tokens", "4",
                                  "--chat", "hello there", "second prompt"])
    assert r.exit_code == 0, r.output
    assert "### hello there" in r.output and "### second prompt" in r.output


def test_generate_with_fp8(tiny_model_dir):
    r = CliRunner().invoke(main, ["generate", "-m", tiny_model_dir, "--device", "cpu", "--max-tokens", "4",
                                  "--quantization", "fp8", "--kv-cache-dtype", "fp8", "--no-chat", "hello there"])
    assert r.exit_code == 0, r.output
    assert "### hello there" in r.output


def test_generate_bad_parameter_is_one_line_exit_2(tiny_model_dir):
    r = CliRunner().invoke(main, ["generate", "-m", tiny_model_dir, "--temperature", "-1", "hi"])
    assert r.exit_code == 2
    assert "SamplingParams.temperature" in r.output and "Traceback" not in r.output
