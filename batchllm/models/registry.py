"""Which model class serves which HF architecture."""
from batchllm.models.llama import LlamaForCausalLM

_ARCHITECTURES = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": LlamaForCausalLM,
    "Qwen3ForCausalLM": LlamaForCausalLM,
}
_MODEL_TYPES = {"llama": LlamaForCausalLM, "mistral": LlamaForCausalLM, "qwen2": LlamaForCausalLM,
                "qwen3": LlamaForCausalLM}


def model_class(config):
    for arch in getattr(config, "architectures", None) or []:
        if arch in _ARCHITECTURES:
            return _ARCHITECTURES[arch]
    if getattr(config, "model_type", None) in _MODEL_TYPES:
        return _MODEL_TYPES[config.model_type]
    raise ValueError(
        f"unsupported architecture {getattr(config, 'architectures', None) or config.model_type!r}; "
        f"supported: {', '.join(sorted(_ARCHITECTURES))}"
    )
