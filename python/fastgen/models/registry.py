"""Which model class implements each Hugging Face architecture name (config.architectures)."""

from __future__ import annotations

from torch import nn

from fastgen.models.deepseek import DeepseekV2ForCausalLM, DeepseekV3ForCausalLM
from fastgen.models.llama import LlamaForCausalLM
from fastgen.models.llama4 import Llama4ForCausalLM
from fastgen.models.mixtral import MixtralForCausalLM
from fastgen.models.qwen2 import Qwen2ForCausalLM
from fastgen.models.qwen3 import Qwen3ForCausalLM
from fastgen.models.qwen_moe import Qwen2MoeForCausalLM, Qwen3MoeForCausalLM

MODEL_REGISTRY: dict[str, type[nn.Module]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "DeepseekV2ForCausalLM": DeepseekV2ForCausalLM,
    "DeepseekV3ForCausalLM": DeepseekV3ForCausalLM,
    "Llama4ForCausalLM": Llama4ForCausalLM,
    "Llama4ForConditionalGeneration": Llama4ForCausalLM,  # the text model; vision is skipped
    "MixtralForCausalLM": MixtralForCausalLM,
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
    "Qwen3ForCausalLM": Qwen3ForCausalLM,
    "Qwen2MoeForCausalLM": Qwen2MoeForCausalLM,
    "Qwen3MoeForCausalLM": Qwen3MoeForCausalLM,
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
