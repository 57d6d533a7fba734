"""Read a local model for the engine: its config, its weights (one tensor at a time), its tokenizer.

Two formats, nothing else:

- an HF directory: config.json + model.safetensors, or shards listed in model.safetensors.index.json;
- GGUF: a .gguf file (or a directory holding exactly one), dequantized tensor by tensor through the
  ``gguf`` package, renamed to HF names with Llama q/k un-permuted by transformers' own GGUF code.

Pickled checkpoints (pytorch_model.bin, *.pt) are refused, never unpickled: loading one runs
arbitrary code. ``path`` is always local; ``batchllm.models.store.resolve`` turns a user's model
name into one.

Imports torch, transformers and safetensors; ``gguf`` only when a GGUF is read.
"""
import hashlib
import json
from pathlib import Path
from typing import Iterator

import torch
from safetensors import safe_open

from batchllm.models import gguf_meta
from batchllm.models.store import ModelError
from batchllm.quant import awq

_INDEX = "model.safetensors.index.json"
_SINGLE = "model.safetensors"
_PICKLES = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")


# ---------------------------------------------------------------------------------------------
# what is at `path`


def find_format(path) -> tuple[str, Path]:
    """("safetensors", model dir) or ("gguf", .gguf file) for a local model path; ModelError otherwise."""
    p = Path(path).expanduser()
    if not p.exists():
        raise ModelError(f"model path {str(p)!r} does not exist")
    if p.is_file():
        if p.suffix == ".gguf":
            return "gguf", p
        raise ModelError(f"{p} is not a .gguf file; give a model directory (config.json + "
                         f"*.safetensors) or a .gguf file")
    if (p / "config.json").is_file() and _safetensors_files(p):
        return "safetensors", p
    ggufs = sorted(p.glob("*.gguf"))
    if len(ggufs) == 1:
        return "gguf", ggufs[0]
    if len(ggufs) > 1:
        names = ", ".join(g.name for g in ggufs)
        raise ModelError(f"{p} holds several .gguf files ({names}); give the path of one of them")
    pickles = sorted({f.name for pat in _PICKLES for f in p.glob(pat)})
    if pickles:
        raise ModelError(f"{p} has only pickled weights ({', '.join(pickles[:3])}); batchllm loads "
                         f"safetensors and GGUF only (never unpickles): convert with "
                         f"`save_pretrained(..., safe_serialization=True)`")
    if _safetensors_files(p):
        raise ModelError(f"{p} has safetensors but no config.json")
    raise ModelError(f"{p} holds no model: need config.json + *.safetensors, or a .gguf file")


def _safetensors_files(folder: Path) -> list[Path]:
    """The weight files in load order: the index's shards, else model.safetensors, else all."""
    index = folder / _INDEX
    if index.is_file():
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        return [folder / name for name in dict.fromkeys(sorted(weight_map.values()))]
    if (folder / _SINGLE).is_file():
        return [folder / _SINGLE]
    # Some exports name their single file differently; consolidated.* is Mistral's non-HF copy.
    return sorted(f for f in folder.glob("*.safetensors") if not f.name.startswith("consolidated"))


# ---------------------------------------------------------------------------------------------
# config, tokenizer, key


def load_config(path):
    """The model's transformers.PretrainedConfig (from config.json, or from the GGUF header; gguf_meta.py
    parses a header once and keeps the result)."""
    from transformers import AutoConfig

    fmt, p = find_format(path)
    try:
        if fmt == "gguf":
            config = gguf_meta.load(p, "config", AutoConfig)
            config._name_or_path = str(p.parent)  # as when parsed from the GGUF
            return config
        config = AutoConfig.from_pretrained(str(p), trust_remote_code=False)
    except ValueError as e:  # unknown model_type / unsupported GGUF architecture
        raise ModelError(f"cannot read the config of {p}: {str(e).splitlines()[0]}") from None
    method = awq.checkpoint_method(config)
    if method:  # AWQ is read (quant/awq.py); FP8 / GPTQ / ... checkpoints store weights the loader does not read
        if method != "awq":
            raise ModelError(f"{p} is a pre-quantized checkpoint (quant_method {method}), which batchllm cannot "
                             "load; use an AWQ or the full-precision checkpoint (quantization: fp8 quantizes that one "
                             "at load)")
    return config


def load_tokenizer(path):
    """A transformers tokenizer from the model directory, or from the GGUF's embedded vocabulary."""
    from transformers import AutoTokenizer

    fmt, p = find_format(path)
    try:
        if fmt == "gguf":
            return gguf_meta.load(p, "tokenizer", AutoTokenizer)
        return AutoTokenizer.from_pretrained(str(p), trust_remote_code=False)
    except (OSError, ValueError) as e:  # no tokenizer files, or a tokenizer class we can't build
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ModelError(f"cannot load a tokenizer from {p}: {first}") from None


def model_key(path) -> str:
    """A short stable id of the weights at `path`, for prefix-cache hashing. Cheap: no weights read.

    Config bytes plus each weight file's name, size and mtime; for GGUF also the first MiB (the
    header: architecture, hyperparameters, tokenizer). A copy elsewhere may get a new key, which only
    costs cache hits; two different models never share one.
    """
    fmt, p = find_format(path)
    h = hashlib.sha256(fmt.encode())
    if fmt == "gguf":
        files = [p]
        with open(p, "rb") as f:
            h.update(f.read(1 << 20))
    else:
        h.update((p / "config.json").read_bytes())
        files = _safetensors_files(p)
    for f in files:
        st = f.stat()
        h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:32]


# ---------------------------------------------------------------------------------------------
# weights


def iter_weights(path, dtype: torch.dtype | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (hf_name, tensor) one tensor at a time, on the CPU; cast to `dtype` if given.

    Only one tensor is materialised at a time: safetensors are mmapped and read per key; GGUF
    tensors are mmapped by the gguf reader and dequantized per tensor. Tied models yield no
    lm_head.weight (the engine ties it to model.embed_tokens.weight).
    """
    fmt, p = find_format(path)
    it = _iter_gguf(p) if fmt == "gguf" else _iter_safetensors(p)
    for name, tensor in it:
        yield name, (tensor.to(dtype) if dtype is not None else tensor)


def _iter_safetensors(folder: Path) -> Iterator[tuple[str, torch.Tensor]]:
    files = _safetensors_files(folder)
    for f in files:
        if not f.is_file():
            raise ModelError(f"{folder / _INDEX} lists {f.name}, which is missing")
        with safe_open(str(f), framework="pt", device="cpu") as sf:
            for name in sf.keys():
                yield name, sf.get_tensor(name)


def _iter_gguf(file: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """GGUF tensors under HF names, reusing transformers' name map and tensor processors.

    transformers' load_gguf_checkpoint(return_tensors=True) does the same but builds a dict of the
    whole model; we walk its pieces instead so only one dequantized tensor lives at a time. Dense
    decoders only (Llama, Mistral, Qwen2/3): MoE processors merge experts across tensors.
    """
    import numpy as np
    from gguf import GGUFReader, dequantize
    from transformers import AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import (
        TENSOR_PROCESSORS,
        TensorProcessor,
        get_gguf_hf_weights_map,
        read_field,
    )

    config = load_config(file)
    config_dict = config.to_dict()
    reader = GGUFReader(str(file))  # mmaps the file; tensor.data are views, read on access
    architecture = read_field(reader, "general.architecture")[0]
    processor = TENSOR_PROCESSORS.get(architecture, TensorProcessor)(config=config_dict)
    # A weightless skeleton gives the HF names; on the meta device it costs nothing even for 70B.
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    name_map = get_gguf_hf_weights_map(_NoChildren(skeleton), processor)
    del skeleton

    parsed = {"config": config_dict, "tensors": {}}
    for tensor in reader.tensors:
        weights = dequantize(tensor.data, tensor.tensor_type)  # float numpy, HF [out, in] layout
        result = processor.process(weights=weights, name=tensor.name, tensor_key_mapping=name_map,
                                   parsed_parameters=parsed)
        if result.name not in name_map:
            continue  # e.g. rope_freqs: recomputed from the config, not a parameter
        # Copy out of the read-only mmap so the tensor owns its memory.
        yield name_map[result.name], torch.from_numpy(np.array(result.weights, order="C", copy=True))


class _NoChildren:
    """A model seen only from the top: get_gguf_hf_weights_map recurses into every submodule and
    rebuilds gguf's name table for each (seconds for a small model, minutes for a big one), but a
    *ForCausalLM's full state-dict names already map from the top level."""

    def __init__(self, model):
        self.config = model.config
        self._model = model

    def state_dict(self):
        return self._model.state_dict()

    def named_children(self):
        return []
