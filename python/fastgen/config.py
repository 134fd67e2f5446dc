"""Configuration dataclasses that every layer above reads. Defaults live here, once; the CLI and
the Python API take theirs from these classes."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch

DEFAULT_MODEL = "smollm2"

DTYPES: dict[str, torch.dtype] = {
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
}


def parse_dtype(name: str) -> torch.dtype:
    """The torch dtype a user-facing name (bfloat16, bf16, float32, ...) means; ValueError naming
    the choices for any other name."""
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose one of: bfloat16, float16, float32")
    return DTYPES[name]


class LoadFormat(enum.Enum):
    AUTO = "auto"      # safetensors folder or .gguf file, by what the path holds
    RANDOM = "random"  # the config's shapes with random weights (benchmarks)


MAX_LOGPROBS = 20  # the most alternatives a request may ask for, as OpenAI's API


@dataclass
class SamplingParams:
    """How one request is decoded. temperature == 0 means greedy; top_k / top_p / min_p of None
    mean off.

    Each step turns the model's logits z (one per vocabulary token) into the next token in this
    order, as vLLM does:

    1. repetition_penalty r (HF / vLLM): for every token seen in the prompt or the output so far,
       z = z / r if z > 0 else z * r. 1.0 is off; r > 1 discourages repeats.
    2. presence_penalty a and frequency_penalty f (OpenAI), over the output tokens only:
       z = z - a * (count > 0) - f * count, count = times the token was generated so far.
    3. temperature == 0: argmax of the penalised logits. Otherwise z / temperature, then
       min_p (keep tokens with p >= min_p * p_max), top_k, top_p, and a draw.

    logprobs = k asks for, per generated token, the sampled token's log-probability and the k
    most likely tokens' (k <= 20; 0 gives the sampled token alone). They are those of the raw
    model distribution, log_softmax(z) before any penalty, temperature or filter (vLLM's
    default), so they do not depend on how the token was picked. prompt_logprobs = k does the
    same for every prompt token after the first (the prompt is then never read from the prefix
    cache: its logits are needed).

    n samples are drawn per prompt, sharing its cached blocks. With a seed, sample i uses seed + i.
    max_tokens = 0 generates nothing: the prompt is only scored (with prompt_logprobs).
    """

    max_tokens: int = 256
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    min_p: float | None = None
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    n: int = 1

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if self.max_tokens < 0:
            raise ValueError(f"max_tokens must be >= 0, got {self.max_tokens}")
        if self.n < 1:
            raise ValueError(f"n must be at least 1, got {self.n}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be >= 1 (or None for off), got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must not be empty")
        if self.min_p is not None and not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1] (or None for off), got {self.min_p}")
        if not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty must be > 0 (1.0 is off), got "
                             f"{self.repetition_penalty}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not -2 <= value <= 2:
                raise ValueError(f"{name} must be in [-2, 2] (0 is off), got {value}")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and not 0 <= value <= MAX_LOGPROBS:
                raise ValueError(f"{name} must be in [0, {MAX_LOGPROBS}] (or None for off), got "
                                 f"{value}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def has_penalties(self) -> bool:
        return (self.repetition_penalty != 1.0 or self.presence_penalty != 0.0
                or self.frequency_penalty != 0.0)


@dataclass
class CacheConfig:
    """The paged KV cache: blocks of block_size tokens; its size is set by the engine."""

    block_size: int = 16
    cpu_kv_cache_gib: float = 1.0       # on CPU, memory given to the cache
    gpu_memory_utilization: float = 0.9  # on CUDA, fraction of device memory the engine may use
    enable_prefix_caching: bool = True   # share full blocks of equal prefixes across requests


@dataclass
class EngineConfig:
    """What `LLM(...)` and the CLIs construct: which model, where, and how it is run."""

    model: str = DEFAULT_MODEL
    dtype: str = "bfloat16"
    device: str = "auto"  # auto | cpu | cuda
    load_format: LoadFormat = LoadFormat.AUTO
    max_model_len: int | None = None  # default: the model's max_position_embeddings
    max_num_seqs: int = 256
    # Tokens one step may feed the model: decodes first, then prompt chunks (chunked prefill).
    max_num_batched_tokens: int = 2048
    cache: CacheConfig = field(default_factory=CacheConfig)
    seed: int = 0  # seeds random weights for load_format=random
    # Turns CUDA graphs off (for debugging): decode steps then launch their kernels one by one.
    # No effect on CPU, where nothing is captured.
    enforce_eager: bool = False

    @property
    def torch_dtype(self) -> torch.dtype:
        return parse_dtype(self.dtype)
