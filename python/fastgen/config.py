"""Configuration dataclasses that every layer above reads. Defaults live here, once; the CLIs and
the Python API take theirs from these classes.

Every engine setting (a field of EngineConfig, CacheConfig or ParallelConfig) is declared with
`setting(default, help, ...)`: its default, its command-line help and the values it accepts sit
on the field's own line. EngineConfig.add_cli_args turns each into a flag (fastgen-run and
fastgen-serve share that one list), fastgen-generate's verl keys read theirs from engine_flags(),
and the dataclasses check their values at construction with the same checks, so a bad value gets
the same one-line error from the command line (naming the flag) and from LLM(...) (naming the
field). This is vLLM's EngineArgs.add_cli_args / from_cli_args, without a second class.
"""

from __future__ import annotations

import dataclasses
import enum
import typing
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    import argparse

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


QUANTIZATIONS = ("auto", "gguf", "int8", "none")

MAX_LOGPROBS = 20  # the most alternatives a request may ask for, as OpenAI's API
MAX_LOGIT_BIAS = 100.0  # OpenAI's bound on a logit_bias value, either sign


@dataclass(frozen=True)
class StructuredOutputs:
    """What a request's output must match, as vLLM's StructuredOutputsParams: exactly one of

    - json: a JSON Schema (a dict, or its JSON text): the output is one JSON value valid
      against it, written as json.dumps writes it (", " and ": " between items, no other
      whitespace);
    - json_object: True for any JSON object (OpenAI's JSON mode);
    - regex: the output matches the regular expression (Rust regex syntax) in full;
    - choice: the output is exactly one of these strings;
    - grammar: a context-free grammar, in the EBNF (GBNF) of llama.cpp's grammars or in Lark.

    The engine enforces it token by token (engine/structured_output.py); once the output is
    complete and nothing may follow, the request ends with finish reason "stop". An invalid
    schema, expression or grammar is a ValueError when the request is added."""

    json: dict | str | None = None
    json_object: bool = False
    regex: str | None = None
    choice: tuple[str, ...] | None = None
    grammar: str | None = None

    def __post_init__(self) -> None:
        if self.choice is not None:
            object.__setattr__(self, "choice", tuple(self.choice))
            if not self.choice or not all(isinstance(c, str) for c in self.choice):
                raise ValueError("structured_outputs.choice must be a non-empty list of strings")
        given = [name for name in ("json", "regex", "choice", "grammar")
                 if getattr(self, name) is not None] + (["json_object"] if self.json_object
                                                         else [])
        if len(given) != 1:
            raise ValueError("structured_outputs takes exactly one of json, json_object, regex, "
                             f"choice, grammar; got {', '.join(given) or 'none'}")

    @property
    def kind(self) -> str:
        """Which constraint this is: json, json_object, regex, choice or grammar."""
        return next(name for name in ("json", "regex", "choice", "grammar")
                    if getattr(self, name) is not None) if not self.json_object else "json_object"


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
    3. logit_bias b (OpenAI): z[t] = z[t] + b[t] for each token id t it names (-100 to 100;
       -100 in effect bans a token, 100 forces it).
    4. structured_outputs: tokens the constraint does not allow next get z = -inf.
    5. temperature == 0: argmax of the adjusted logits. Otherwise z / temperature, then
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
    logit_bias: dict[int, float] | None = None
    structured_outputs: StructuredOutputs | None = None
    # Megatron-LM's: the k-th generated token (from 0) samples with top_p * top_p_decay ** k,
    # never below top_p_bound (0: off); and after a token ending in ":" no token starting with
    # a newline.
    top_p_decay: float = 0.0
    top_p_bound: float = 0.0
    prevent_newline_after_colon: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if self.logit_bias:
            for token_id, bias in self.logit_bias.items():
                if isinstance(token_id, bool) or not isinstance(token_id, int) or token_id < 0:
                    raise ValueError(f"logit_bias keys must be token ids (integers >= 0), got "
                                     f"{token_id!r}")
                if not -MAX_LOGIT_BIAS <= bias <= MAX_LOGIT_BIAS:
                    raise ValueError(f"logit_bias values must be in [-{MAX_LOGIT_BIAS:g}, "
                                     f"{MAX_LOGIT_BIAS:g}], got {bias} for token {token_id}")
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
        if not 0 <= self.top_p_decay <= 1 or not 0 <= self.top_p_bound <= 1:
            raise ValueError(f"top_p_decay and top_p_bound must be in [0, 1], got "
                             f"{self.top_p_decay} and {self.top_p_bound}")
        if self.top_p_decay and self.top_p is None:
            raise ValueError("top_p_decay needs top_p")
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
    def has_logit_bias(self) -> bool:
        return bool(self.logit_bias)

    def top_p_at(self, num_output_tokens: int) -> float | None:
        """The top_p the next token samples with, num_output_tokens having been generated."""
        if not self.top_p_decay or self.top_p is None:
            return self.top_p
        return max(self.top_p * self.top_p_decay ** num_output_tokens, self.top_p_bound)

    @property
    def has_penalties(self) -> bool:
        return (self.repetition_penalty != 1.0 or self.presence_penalty != 0.0
                or self.frequency_penalty != 0.0)


# What is wrong with a setting's value, as "must be at least 1, got 0"; None when it is fine.
Check = Callable[[Any], "str | None"]


def at_least(low: int) -> Check:
    def check(value) -> str | None:
        return None if value >= low else f"must be at least {low}, got {value}"
    return check


def positive(value) -> str | None:
    return None if value > 0 else f"must be > 0, got {value}"


def fraction(value) -> str | None:
    return None if 0 < value <= 1 else f"must be in (0, 1], got {value}"


def only_one(feature: str) -> Check:
    """Accepts 1 alone: any other value needs a feature that is not built yet."""
    def check(value) -> str | None:
        return None if value == 1 else f"must be 1 ({feature} is not supported yet), got {value}"
    return check


@dataclass(frozen=True)
class Flag:
    """How a setting appears on the command line, declared beside its field by setting().

    option is --the-field-name unless given; alias is a second spelling (-tp). A bool setting is
    a switch; off names the flag that turns one that defaults to on off again. choices limit what
    the flag (and a verl key) accepts; LLM(...) leaves those values to the loader, which names an
    unknown dtype or device itself. default_text says what the default means where its value
    does not (None meaning "the model's"). check runs on the command line and at construction.
    """

    help: str
    option: str | None = None
    alias: str | None = None
    off: str | None = None
    choices: tuple[str, ...] | None = None
    metavar: str | None = None
    default_text: str | None = None
    check: Check | None = None


def setting(default: Any, help: str, **flag: Any) -> Any:
    """A config field with its default and its command-line flag (see Flag)."""
    return field(default=default, metadata={"flag": Flag(help, **flag)})


def _check_fields(config: Any) -> None:
    """ValueError naming the first field of config whose value its flag's check refuses."""
    for f in dataclasses.fields(config):
        flag, value = f.metadata.get("flag"), getattr(config, f.name)
        problem = None if flag is None or flag.check is None or value is None else flag.check(value)
        if problem is not None:
            raise ValueError(f"{f.name} {problem}")


@dataclass
class CacheConfig:
    """The paged KV cache: blocks of block_size tokens; its size is set by the engine."""

    block_size: int = setting(16, "tokens per KV-cache block", check=at_least(1))
    cpu_kv_cache_gib: float = setting(1.0, "on CPU, memory for the KV cache, GiB",
                                      check=positive)
    gpu_memory_utilization: float = setting(
        0.9, "on CUDA, the fraction of device memory the engine may use, KV cache included",
        check=fraction)
    enable_prefix_caching: bool = setting(
        True, "share the KV cache of equal prompt prefixes (whole blocks) across requests",
        off="--no-prefix-caching")

    def __post_init__(self) -> None:
        _check_fields(self)


@dataclass
class ParallelConfig:
    """The process layout: tensor_parallel_size ranks shard one model replica, and
    data_parallel_size replicas serve requests of their own (only 1 for the engine and servers;
    fastgen-generate runs replicas as torchrun processes)."""

    tensor_parallel_size: int = setting(
        1, "processes sharding one model replica: rank 0 starts the others on this host (under "
        "torchrun, the job's processes are the ranks)", alias="-tp", check=at_least(1))
    enable_expert_parallel: bool = setting(
        False, "MoE layers place whole experts on the tensor-parallel ranks (E / tp each) "
        "instead of splitting every expert's intermediate dimension")
    data_parallel_size: int = setting(
        1, "model replicas serving requests of their own (only 1 for now; fastgen-generate "
        "splits its rows across torchrun processes instead)", check=only_one("data parallelism"))

    def __post_init__(self) -> None:
        _check_fields(self)


@dataclass
class EngineConfig:
    """What `LLM(...)` and the CLIs construct: which model, where, and how it is run. The CLIs
    and LLM(**kwargs) name settings flat (block_size, tensor_parallel_size); from_fields puts
    each into the config that declares it."""

    model: str = setting(DEFAULT_MODEL, "model name, Hugging Face folder, or .gguf file")
    dtype: str = setting("bfloat16", "bfloat16, float16 or float32", choices=tuple(DTYPES),
                         metavar="DTYPE")
    device: str = setting("auto", "where the model runs", choices=("auto", "cpu", "cuda"),
                          default_text="auto: CUDA when there is one")
    load_format: LoadFormat = setting(
        LoadFormat.AUTO, "auto: the weights of a safetensors folder or .gguf file; random: the "
        "model's shapes with random weights (for benchmarks)")
    quantization: str | None = setting(
        "auto", "how linear weights are stored and multiplied: auto (a .gguf model runs its "
        "quantized blocks as the file stores them, any other its checkpoint dtype), gguf (the "
        "same, required), int8 (weight-only, one scale per output channel, quantized at load) "
        "or none (a .gguf model dequantized to --dtype)", choices=QUANTIZATIONS)
    dequantize: bool = setting(False, "shorthand for --quantization none")
    max_model_len: int | None = setting(None, "context length, prompt plus output, tokens",
                                        default_text="the model's", check=at_least(2))
    max_num_seqs: int = setting(256, "most sequences in the running batch", check=at_least(1))
    max_num_batched_tokens: int = setting(
        2048, "most tokens one engine step feeds the model, decodes first; longer prompts are "
        "prefilled in chunks", check=at_least(1))
    cache: CacheConfig = field(default_factory=CacheConfig)
    seed: int = setting(0, "seeds random weights (--load-format random) and the draws of "
                        "requests without a seed of their own", option="--engine-seed")
    enforce_eager: bool = setting(
        False, "turn decode-step graphs off (CUDA graphs on GPUs, step graphs on the CPU): "
        "decode steps call their kernels one by one from Python (for debugging)")
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    def __post_init__(self) -> None:
        _check_fields(self)

    @property
    def torch_dtype(self) -> torch.dtype:
        return parse_dtype(self.dtype)

    @property
    def quantization_method(self) -> str | None:
        """"auto", "gguf", "int8", or None for plain weights (quantization None or "none", or
        dequantize)."""
        if self.dequantize or self.quantization in (None, "none"):
            return None
        if self.quantization not in QUANTIZATIONS:
            raise ValueError(f"unknown quantization {self.quantization!r}; choose one of: "
                             f"{', '.join(QUANTIZATIONS)}")
        return self.quantization

    @classmethod
    def from_fields(cls, **values: Any) -> EngineConfig:
        """The config of these settings, named flat (max_num_seqs, block_size,
        tensor_parallel_size, ...), each put into the config that declares it; the rest keep
        their defaults. An enum setting also takes its value (load_format="random"). TypeError
        naming unknown settings; ValueError for a value a check refuses."""
        flags = engine_flags()
        unknown = sorted(set(values) - set(flags))
        if unknown:
            raise TypeError(f"unknown arguments: {', '.join(unknown)}")
        by_owner: dict[type, dict[str, Any]] = {}
        for name, value in values.items():
            by_owner.setdefault(flags[name].owner, {})[name] = flags[name].convert(value)
        nested = {name: kind(**by_owner.get(kind, {})) for name, kind in _nested_configs(cls)}
        return cls(**by_owner.get(cls, {}), **nested)

    @staticmethod
    def add_cli_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
        """Adds every engine setting's flag (engine_flags()) to parser, as one group, with its
        help and default; from_cli_args reads the parsed values back. Returns parser."""
        group = parser.add_argument_group("engine options")
        for spec in engine_flags().values():
            names = [spec.option, *([spec.flag.alias] if spec.flag.alias else [])]
            if spec.type is bool:
                switch = group.add_mutually_exclusive_group() if spec.flag.off else group
                switch.add_argument(*names, dest=spec.dest, action="store_true",
                                    default=spec.default,
                                    help=spec.flag.help + (" (default: on)" if spec.default
                                                           else ""))
                if spec.flag.off:
                    switch.add_argument(spec.flag.off, dest=spec.dest, action="store_false",
                                        help=f"the opposite of {spec.option}")
            else:
                group.add_argument(*names, dest=spec.dest, default=spec.cli_default,
                                   type=str if spec.choices else spec.type, choices=spec.choices,
                                   metavar=spec.flag.metavar,
                                   help=f"{spec.flag.help} (default: {spec.default_text})")
        return parser

    @classmethod
    def from_cli_args(cls, args: argparse.Namespace) -> EngineConfig:
        """The config that add_cli_args's flags were parsed into; ValueError naming the flag
        (one line) for a value no engine can use, before anything is loaded."""
        values = {}
        for spec in engine_flags().values():
            value = getattr(args, spec.dest)
            problem = spec.problem(value)
            if problem is not None:
                raise ValueError(f"{spec.option} {problem}")
            values[spec.name] = value
        return cls.from_fields(**values)


@dataclass(frozen=True)
class EngineFlag:
    """One engine setting, resolved: a field of EngineConfig or of a config nested in it."""

    name: str     # the field's name; unique across the nested configs (block_size, ...)
    owner: type   # the dataclass declaring it: EngineConfig, CacheConfig or ParallelConfig
    type: type    # int, float, str, bool or an Enum (for `int | None`: int)
    default: Any  # the field's default
    flag: Flag

    @property
    def option(self) -> str:
        return self.flag.option or "--" + self.name.replace("_", "-")

    @property
    def dest(self) -> str:
        """The parsed namespace's attribute: the option's name (engine_seed for --engine-seed),
        so that a CLI's own flags (fastgen-run's sampling --seed) cannot collide with it."""
        return self.option.lstrip("-").replace("-", "_")

    @property
    def choices(self) -> tuple[str, ...] | None:
        if issubclass(self.type, enum.Enum):
            return tuple(member.value for member in self.type)
        return self.flag.choices

    @property
    def cli_default(self) -> Any:
        """The default as the command line spells it (an enum's value)."""
        return self.default.value if isinstance(self.default, enum.Enum) else self.default

    @property
    def default_text(self) -> str:
        return self.flag.default_text or str(self.cli_default)

    def problem(self, value: Any) -> str | None:
        """What is wrong with value ("must be at least 1, got 0"), or None."""
        return None if value is None or self.flag.check is None else self.flag.check(value)

    def convert(self, value: Any) -> Any:
        """value as the field holds it: an enum member for its value ("random")."""
        if not issubclass(self.type, enum.Enum) or isinstance(value, self.type):
            return value
        try:
            return self.type(value)
        except ValueError:
            raise ValueError(f"unknown {self.name} {value!r}; choose one of: "
                             f"{', '.join(self.choices)}") from None


def engine_flags() -> dict[str, EngineFlag]:
    """Every engine setting by field name, in declaration order (a nested config's in its
    place). TypeError for a field declared without setting(): every setting has a flag."""
    flags: dict[str, EngineFlag] = {}
    for owner, f, kind in _settings(EngineConfig):
        flag = f.metadata.get("flag")
        if flag is None:
            raise TypeError(f"{owner.__name__}.{f.name} has no flag: declare it with setting()")
        if kind is bool and f.default and flag.off is None:
            raise TypeError(f"{owner.__name__}.{f.name} defaults to on but has no off flag")
        if f.name in flags:
            raise TypeError(f"{owner.__name__}.{f.name}: a second setting of that name")
        flags[f.name] = EngineFlag(f.name, owner, kind, f.default, flag)
    return flags


def _nested_configs(cls: type) -> Iterator[tuple[str, type]]:
    """(field name, dataclass) of each config nested in cls (EngineConfig's cache, parallel)."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            yield f.name, hints[f.name]


def _settings(cls: type) -> Iterator[tuple[type, dataclasses.Field, type]]:
    """(declaring class, field, value type) of every setting of cls and of its nested configs;
    `X | None` gives X."""
    nested = dict(_nested_configs(cls))
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in nested:
            yield from _settings(nested[f.name])
            continue
        kinds = [k for k in typing.get_args(hints[f.name]) if k is not type(None)]
        yield cls, f, kinds[0] if kinds else hints[f.name]
