"""Loading a model for the engine: resolve the name to a Hugging Face folder (hub.py), read its
config, build the registered model class directly in the target dtype and device (its rotary
tables sized to the engine's max_model_len), stream the weights in (hf.py) through the shared
loader (weights.py), and bring the tokenizer and the end-of-sequence ids along.

    from fastgen.config import EngineConfig
    loaded = load_model(EngineConfig(model="smollm2", dtype="float32", device="cpu"))
"""

from __future__ import annotations

import contextlib
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from fastgen import quantization
from fastgen.config import EngineConfig, LoadFormat
from fastgen.distributed import SINGLE_RANK, TensorParallelGroup
from fastgen.loader.gguf import convert_gguf, iter_gguf_quantized
from fastgen.loader.hf import (ModelLoadError, eos_token_ids, iter_safetensors, load_hf_config,
                               load_tokenizer)
from fastgen.loader.hub import SOURCE_GGUF, resolve_model
from fastgen.loader.weights import load_weights, process_weights_after_loading

__all__ = ["LoadedModel", "ModelLoadError", "load_model", "resolve_model", "convert_gguf"]

RANDOM_WEIGHT_STD = 0.02


@dataclass
class LoadedModel:
    model: nn.Module            # on its device and dtype, in eval mode
    hf_config: object           # transformers PretrainedConfig
    tokenizer: object           # transformers tokenizer, with the chat template
    eos_token_ids: list[int]
    model_dir: Path             # the Hugging Face folder (for a GGUF model, the converted one)
    max_model_len: int
    quantization: str | None = None  # "gguf" or "int8" when the linear weights are quantized


def load_model(config: EngineConfig, tp: TensorParallelGroup = SINGLE_RANK) -> LoadedModel:
    """Builds config.model on its device in its dtype with its weights (or random weights when
    config.load_format is RANDOM), sharded for rank tp.rank of tp.size (each rank reads the
    checkpoint and keeps its slices; random weights are drawn per shard, so they differ between
    tensor-parallel sizes). Every user-facing failure raises ModelLoadError."""
    # Imported here: the models import fastgen.loader.weights, which runs this package first.
    from fastgen.models.base import ModelContext
    from fastgen.models.registry import get_model_class

    device = _device(config.device)
    dtype = _dtype(config, device)
    random_weights = config.load_format is LoadFormat.RANDOM
    try:
        method = config.quantization_method
    except ValueError as e:
        raise ModelLoadError(str(e)) from None
    model_dir = resolve_model(config.model, weights=not random_weights)
    gguf_file = _gguf_source(config.model, model_dir)
    if method == "auto":
        method = "gguf" if gguf_file is not None and not random_weights else None
    if method == "gguf" and (gguf_file is None or random_weights):
        raise ModelLoadError(f"quantization gguf runs a .gguf file's weights; {config.model} "
                             + ("has random weights" if random_weights else "is not a GGUF model")
                             + " (int8 quantizes any checkpoint at load)")
    hf_config = load_hf_config(model_dir)
    try:
        model_class = get_model_class(hf_config)
    except ValueError as e:
        raise ModelLoadError(f"{model_dir}: {e}") from None
    # A multimodal checkpoint's language model is built from its text config (Llama 4).
    hf_config = hf_config.get_text_config()
    max_positions = int(hf_config.max_position_embeddings)
    max_model_len = config.max_model_len or max_positions
    if max_model_len > max_positions:
        raise ModelLoadError(f"max_model_len {max_model_len} exceeds the model's "
                             f"max_position_embeddings ({max_positions})")

    from fastgen.layers.linear import configure_cpu_thresholds
    configure_cpu_thresholds()
    with _default_dtype(dtype), torch.device(device), quantization.building(method):
        try:
            model = model_class(hf_config, ModelContext(max_model_len, tp))
        except ValueError as e:  # a config the architecture cannot express (e.g. hidden_act),
            # or a dimension that does not split over the tensor-parallel ranks
            raise ModelLoadError(f"cannot build {model_class.__name__} from {model_dir}"
                                 + (f" for tensor-parallel size {tp.size}" if tp.size > 1 else "")
                                 + f": {e}") from None
    model.requires_grad_(False)
    with torch.no_grad():
        if random_weights:
            _init_random(model, config.seed)
            process_weights_after_loading(model)
        else:
            try:
                if method == "gguf":
                    load_weights(model, iter_gguf_quantized(gguf_file, hf_config))
                else:
                    load_weights(model, iter_safetensors(model_dir))
            except ValueError as e:
                raise ModelLoadError(f"checkpoint in {model_dir} does not fit "
                                     f"{model_class.__name__}: {e}") from None
    model.eval()

    tokenizer = load_tokenizer(model_dir)
    return LoadedModel(model=model, hf_config=hf_config, tokenizer=tokenizer,
                       eos_token_ids=eos_token_ids(model_dir, hf_config, tokenizer),
                       model_dir=model_dir, max_model_len=max_model_len, quantization=method)


def _gguf_source(name: str, model_dir: Path) -> Path | None:
    """The .gguf file a model was converted from: the file the user named, or the default
    model's source.gguf kept in its folder; None for a Hugging Face model."""
    path = Path(name).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return path
    source = model_dir / SOURCE_GGUF
    return source if source.is_file() else None


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError("device 'cuda' requested but no CUDA device is available")
    if name not in ("cpu", "cuda"):
        raise ModelLoadError(f"unknown device {name!r}; choose auto, cpu or cuda")
    return torch.device(name)


def _dtype(config: EngineConfig, device: torch.device) -> torch.dtype:
    try:
        dtype = config.torch_dtype
    except ValueError as e:
        raise ModelLoadError(str(e)) from None
    if device.type == "cuda" and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        raise ModelLoadError("bfloat16 is not available on this GPU; use dtype float16 or float32")
    return dtype


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    """Parameters are created in the target dtype (no float32 copy of a large model first);
    buffers that need float32, like the rotary cos/sin cache, ask for it explicitly."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def _init_random(model: nn.Module, seed: int) -> None:
    """Norm weights one, biases zero, everything else normal(0, 0.02), reproducibly from seed and
    each parameter's name: a parameter every tensor-parallel rank holds whole (a norm, a
    replicated projection) is the same on all of them."""
    devices = {p.device for p in model.parameters()}
    generator = torch.Generator(device=devices.pop() if devices else "cpu")
    for name, param in model.named_parameters():
        generator.manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
        if isinstance(param, quantization.QuantizedParameter):  # int8: drawn dense, then packed
            for weight in getattr(param, "experts", [param]):  # a MoE layer's: each expert's
                rows = torch.empty(weight.out_features, weight.in_features, device=param.device)
                weight.store(rows.normal_(0.0, RANDOM_WEIGHT_STD, generator=generator), 0)
        elif "norm" in name.split(".")[-2]:
            param.fill_(1.0)
        elif name.endswith(".bias"):
            param.zero_()
        else:
            param.normal_(0.0, RANDOM_WEIGHT_STD, generator=generator)
