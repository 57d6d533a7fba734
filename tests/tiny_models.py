"""Tiny random-weight models and a small trained tokenizer, built on the spot (no hub, no downloads).

`make_model_dir(path, arch)` writes an HF directory (config.json, model.safetensors, tokenizer files with
a chat template) that both batchllm and transformers load.
"""
import json
import os

import torch

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Review: great product, works as described. Answer with one word. positive negative neutral",
    "You label the sentiment of product reviews. system user assistant",
    "0123456789 abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ .,;:!?'\"()[]{}<>-_=+*/\\|@#$%^&~`",
] * 20


def make_tokenizer(path, vocab_size=512):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(_CORPUS, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(path)
    return fast


def tiny_config(arch="llama", vocab_size=512, **overrides):
    from transformers import LlamaConfig, Qwen2Config, Qwen3Config

    common = dict(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        bos_token_id=1, eos_token_id=2, pad_token_id=0, rms_norm_eps=1e-6,
    )
    if arch == "llama":  # GQA + llama3 rope scaling
        common.update(
            rope_theta=500000.0, tie_word_embeddings=False,
            rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                          "high_freq_factor": 4.0, "original_max_position_embeddings": 256},
        )
        cls = LlamaConfig
    elif arch == "qwen2":  # qkv bias, tied embeddings
        common.update(tie_word_embeddings=True, rope_theta=10000.0)
        cls = Qwen2Config
    elif arch == "qwen3":  # q/k norm, explicit head_dim
        common.update(tie_word_embeddings=False, head_dim=32, rope_theta=1000000.0)
        cls = Qwen3Config
    else:
        raise ValueError(arch)
    common.update(overrides)
    return cls(**common)


def make_model_dir(path, arch="llama", seed=0, **overrides):
    """Write a tiny random model + tokenizer to `path` (created); returns path."""
    from transformers import AutoModelForCausalLM

    os.makedirs(path, exist_ok=True)
    make_tokenizer(path)
    cfg = tiny_config(arch, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():  # larger-than-default weights so logits are far from ties
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.08)
            elif "bias" in name:
                p.normal_(0.0, 0.05)
    model.save_pretrained(path, safe_serialization=True)
    with open(os.path.join(path, "batchllm_test.json"), "w") as f:
        json.dump({"arch": arch, "seed": seed}, f)
    return str(path)


def awq_pack(values: torch.Tensor) -> torch.Tensor:
    """[rows, cols] of 0..15 -> [rows, cols / 8] int32, packed as AutoAWQ's WQLinear_GEMM.from_linear packs: value
    i of each word (bits 4i..4i+3) is column order[i] of its 8. Written apart from kernels/reference.py's unpacking
    (a table of shifts), so that the two check each other."""
    order = [0, 2, 4, 6, 1, 3, 5, 7]
    packed = torch.zeros(values.shape[0], values.shape[1] // 8, dtype=torch.int64)
    for i, col in enumerate(order):
        packed |= values[:, col::8].long() << (4 * i)
    return torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)


def make_awq_pair(dense_dir, awq_dir, ref_dir, group_size=32):
    """From a tiny model at dense_dir, write an AWQ checkpoint of it (4-bit, zero points, fp16 scales, AutoAWQ's
    GEMM packing; min-max rounding per group, no calibration) to awq_dir, and to ref_dir the same model with each
    matmul weight replaced by exactly what the AWQ one dequantizes to, for transformers to run as the reference.
    Returns (awq_dir, ref_dir)."""
    import shutil

    from safetensors.torch import load_file, save_file

    tensors = load_file(os.path.join(dense_dir, "model.safetensors"))
    awq, ref = {}, {}
    for name, w in tensors.items():
        if not any(f".{p}.weight" in name for p in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                    "down_proj")):
            awq[name] = ref[name] = w
            continue
        wt = w.t().float()  # [in, out], the matrix x @ W multiplies
        g = wt.reshape(-1, group_size, wt.shape[1])
        lo, hi = g.amin(1), g.amax(1)
        scale = ((hi - lo) / 15).clamp(min=1e-6).half()
        zero = torch.round(-lo / scale.float()).clamp(0, 15)
        q = (torch.round(g / scale.float()[:, None]) + zero[:, None]).clamp(0, 15)
        base = name[: -len(".weight")]
        awq[base + ".qweight"] = awq_pack(q.reshape(wt.shape).int())
        awq[base + ".qzeros"] = awq_pack(zero.int())
        awq[base + ".scales"] = scale
        ref[name] = ((q - zero[:, None]) * scale.float()[:, None]).reshape(wt.shape).t().contiguous()
    for out, weights in ((awq_dir, awq), (ref_dir, ref)):
        shutil.copytree(dense_dir, out, dirs_exist_ok=True)
        save_file({k: v.contiguous() for k, v in weights.items()}, os.path.join(out, "model.safetensors"),
                  metadata={"format": "pt"})
    with open(os.path.join(awq_dir, "config.json")) as f:
        cfg = json.load(f)
    cfg["quantization_config"] = {"quant_method": "awq", "bits": 4, "group_size": group_size, "zero_point": True,
                                  "version": "gemm", "modules_to_not_convert": None}
    with open(os.path.join(awq_dir, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    return str(awq_dir), str(ref_dir)
