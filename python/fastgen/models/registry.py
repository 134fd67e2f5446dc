"""Which model class implements each Hugging Face architecture name (config.architectures)."""

from __future__ import annotations

from torch import nn

from fastgen.models.llama import LlamaForCausalLM

MODEL_REGISTRY: dict[str, type[nn.Module]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
}


def get_model_class(hf_config) -> type[nn.Module]:
    """The class for the first of the config's architectures that fastgen implements."""
    architectures = list(getattr(hf_config, "architectures", None) or [])
    for arch in architectures:
        if arch in MODEL_REGISTRY:
            return MODEL_REGISTRY[arch]
    found = ", ".join(architectures) or "none listed in config.json"
    raise ValueError(f"unsupported model architecture ({found}); "
                     f"fastgen supports: {', '.join(MODEL_REGISTRY)}")
