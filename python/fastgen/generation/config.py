"""The generation job's configuration, read the way verl's `main_generation` reads its Hydra
config, so a verl command runs unchanged with fastgen-generate:

    fastgen-generate data.path=test.parquet data.output_path=out.parquet model.path=smollm2 \
        data.n_samples=4 rollout.temperature=1.0 rollout.top_p=0.7
    fastgen-generate --config job.yaml --data test.parquet --output out.parquet --n-samples 4

Every key has a dotted verl name (`data.n_samples=4`, also `+data.n_samples=4` as Hydra writes
new keys) and a plain flag (`--n-samples 4`); a YAML file (nested, as verl's generation.yaml)
gives defaults that the command line overrides. Keys are one table, KEYS: a key's default,
type, flag and help live in one place. A key that is an engine setting (rollout.max_num_seqs,
model.path, ...) takes its flag, type, default, choices and help from the engine's own flag list
(fastgen.config.engine_flags, which fastgen-run and fastgen-serve use too), and its value is
checked by the same rule. verl keys that mean nothing to fastgen (Ray, FSDP, vLLM internals) are
accepted and listed once as ignored; any other key is an error naming it.
"""

from __future__ import annotations

import enum
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastgen.config import EngineConfig, engine_flags


class ConfigError(ValueError):
    """A bad key, value or config file; the message is one line that names it."""


class Truncation(str, enum.Enum):
    """What happens to a prompt longer than rollout.prompt_length tokens. LEFT is the default,
    not verl's RIGHT: cutting a prompt's end cuts the chat template's generation prompt too."""

    LEFT = "left"      # keep its last tokens: the end of the question and the generation prompt
    RIGHT = "right"    # keep its first tokens (what verl's tokenizer call does)
    REJECT = "reject"  # generate nothing for it: the row is kept with no responses
    ERROR = "error"    # stop the job before generating anything


@dataclass(frozen=True)
class Key:
    name: str          # verl's dotted name
    flag: str          # the plain command-line flag
    type: type
    default: Any
    help: str
    choices: tuple[str, ...] | None = None
    engine: str | None = None        # the engine setting it is (an EngineConfig field name)
    default_text: str | None = None  # what the default means, where its value does not say

    def problem(self, value: Any) -> str | None:
        """What the engine's check finds wrong with value (None when fine, or not a setting)."""
        return engine_flags()[self.engine].problem(value) if self.engine else None


def engine_key(name: str, setting: str) -> Key:
    """The verl key `name` for the engine setting `setting`, with the flag, type, default,
    choices and help the engine declares for it."""
    spec = engine_flags()[setting]
    return Key(name, spec.option, spec.type, spec.cli_default, spec.flag.help, spec.choices,
               engine=setting, default_text=spec.flag.default_text)


KEYS: tuple[Key, ...] = (
    Key("data.path", "--data", str, None, "input parquet file (required)"),
    Key("data.prompt_key", "--prompt-key", str, "prompt",
        "column holding each row's prompt: a chat list of {role, content} or plain text"),
    Key("data.n_samples", "--n-samples", int, 5, "responses per prompt"),
    Key("data.output_path", "--output", str, None, "output parquet file (required)"),
    Key("data.batch_size", "--batch-size", int, 128,
        "rows per part file: the unit of progress that a restarted job keeps"),
    Key("data.truncation", "--truncation", str, Truncation.LEFT.value,
        "prompts over rollout.prompt_length tokens: left / right (cut), reject (no responses) "
        "or error", tuple(t.value for t in Truncation)),
    Key("data.chat_template", "--chat-template", bool, True,
        "render plain-text prompts as a user message through the chat template (chat lists "
        "always are)"),
    Key("data.save_details", "--save-details", bool, False,
        "also write response_token_ids, finish_reasons, prompt_tokens, response_tokens and "
        "prompt_truncated columns"),
    Key("data.keep_parts", "--keep-parts", bool, False,
        "keep the part files after the output file is assembled"),
    engine_key("model.path", "model"),
    Key("rollout.temperature", "--temperature", float, 1.0, "0 means greedy"),
    Key("rollout.top_k", "--top-k", int, 50, "0 or -1 mean off"),
    Key("rollout.top_p", "--top-p", float, 0.7, "1.0 means off"),
    Key("rollout.do_sample", "--do-sample", bool, True, "false means greedy (temperature 0)"),
    Key("rollout.prompt_length", "--prompt-length", int, 1536, "most prompt tokens"),
    Key("rollout.response_length", "--response-length", int, 512, "most new tokens per response"),
    Key("rollout.ignore_eos", "--ignore-eos", bool, False, "always generate response_length tokens"),
    Key("rollout.seed", "--seed", int, 0,
        "row i's sample j draws from seed + i * n_samples + j, whatever the process layout"),
    Key("rollout.json_schema", "--json-schema", str, None,
        "a JSON Schema file: every response is JSON valid against it (structured outputs)"),
    engine_key("rollout.dtype", "dtype"),
    engine_key("rollout.gpu_memory_utilization", "gpu_memory_utilization"),
    engine_key("rollout.cpu_kv_cache_gib", "cpu_kv_cache_gib"),
    engine_key("rollout.tensor_model_parallel_size", "tensor_parallel_size"),
    engine_key("rollout.max_num_batched_tokens", "max_num_batched_tokens"),
    engine_key("rollout.max_num_seqs", "max_num_seqs"),
    engine_key("rollout.max_model_len", "max_model_len"),
    engine_key("rollout.enforce_eager", "enforce_eager"),
    engine_key("trainer.device", "device"),
    Key("trainer.nnodes", "--nnodes", int, None, "checked against torchrun's world size"),
    Key("trainer.n_gpus_per_node", "--n-gpus-per-node", int, None,
        "checked against torchrun's world size"),
)
KEY_BY_NAME = {key.name: key for key in KEYS}

# verl keys with no meaning here (Ray, FSDP, vLLM switches fastgen does not have); accepted so
# that verl's own generation.yaml and scripts run, and reported as ignored.
IGNORED_KEYS = frozenset({
    "model.external_lib", "model.trust_remote_code", "data.trust_remote_code",
    "rollout.name", "rollout.mode", "rollout.free_cache_engine",
    "rollout.load_format", "rollout.log_prob_micro_batch_size",
    "rollout.log_prob_micro_batch_size_per_gpu", "rollout.use_fire_sampling",
    "rollout.disable_log_stats", "rollout.enable_chunked_prefill", "rollout.n",
})
IGNORED_PREFIXES = ("actor.", "ray_init.", "ray_kwargs.", "hydra.")


@dataclass
class JobConfig:
    """The resolved job: every key in KEYS by its dotted name, plus the ignored keys seen."""

    values: dict[str, Any]
    ignored: list[str] = field(default_factory=list)

    def __getitem__(self, name: str) -> Any:
        return self.values[name]

    @property
    def data_path(self) -> Path:
        return Path(self.values["data.path"]).expanduser()

    @property
    def output_path(self) -> Path:
        return Path(self.values["data.output_path"]).expanduser()

    @property
    def top_k(self) -> int | None:
        top_k = self.values["rollout.top_k"]
        return None if top_k in (0, -1) else top_k

    @property
    def top_p(self) -> float | None:
        top_p = self.values["rollout.top_p"]
        return None if top_p == 1.0 else top_p

    @property
    def temperature(self) -> float:
        return self.values["rollout.temperature"] if self.values["rollout.do_sample"] else 0.0

    def engine_config(self) -> EngineConfig:
        """The engine the job runs: every key that is an engine setting, the rest defaults."""
        return EngineConfig.from_fields(**{key.engine: self.values[key.name] for key in KEYS
                                           if key.engine})


def parse_value(key: Key, text: Any) -> Any:
    """A key's value from a command-line string or a YAML scalar; ConfigError naming the key."""
    if text is None or (isinstance(text, str) and text.lower() in ("null", "none", "~")):
        if key.default is None:
            return None
        raise ConfigError(f"{key.name} cannot be null")
    try:
        if key.type is bool:
            value = _parse_bool(text)
        elif key.type is int:
            if isinstance(text, float) or isinstance(text, bool):
                raise ValueError
            value = int(text)
        elif key.type is float:
            if isinstance(text, bool):
                raise ValueError
            value = float(text)
        else:
            if not isinstance(text, (str, int, float)) or isinstance(text, bool):
                raise ValueError
            value = str(text)
    except ValueError:
        raise ConfigError(f"{key.name}: expected {key.type.__name__}, got {text!r}") from None
    if key.choices and value not in key.choices:
        raise ConfigError(f"{key.name}: expected one of {', '.join(key.choices)}, got {value!r}")
    return value


def _parse_bool(text: Any) -> bool:
    if isinstance(text, bool):
        return text
    if isinstance(text, str) and text.lower() in ("true", "1", "yes", "on"):
        return True
    if isinstance(text, str) and text.lower() in ("false", "0", "no", "off"):
        return False
    raise ValueError


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """{"data": {"path": p}} -> {"data.path": p}."""
    flat: dict[str, Any] = {}
    for name, value in tree.items():
        dotted = f"{prefix}{name}"
        if isinstance(value, dict) and f"{dotted}" not in KEY_BY_NAME:
            flat.update(flatten(value, f"{dotted}."))
        else:
            flat[dotted] = value
    return flat


def read_yaml(path: str) -> dict[str, Any]:
    """A YAML config file's keys, flattened to dotted names."""
    import yaml

    try:
        with open(os.path.expanduser(path), encoding="utf-8") as f:
            tree = yaml.safe_load(f)
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else "bad YAML"
        raise ConfigError(f"config file {path} is not valid YAML: {first}") from None
    if tree is None:
        return {}
    if not isinstance(tree, dict):
        raise ConfigError(f"config file {path} must hold a mapping of keys, got "
                          f"{type(tree).__name__}")
    return flatten(tree)


def split_override(text: str) -> tuple[str, str]:
    """"+data.n_samples=4" -> ("data.n_samples", "4"): Hydra's + and ++ prefixes are dropped."""
    name, _, value = text.partition("=")
    return name.lstrip("+").strip(), value


def resolve(yaml_values: dict[str, Any], overrides: dict[str, Any]) -> JobConfig:
    """Defaults, then the YAML file's keys, then the command line's (dotted or flags). Unknown
    keys raise one ConfigError naming all of them."""
    given = {**yaml_values, **overrides}
    ignored = sorted(name for name in given if name in IGNORED_KEYS
                     or name.startswith(IGNORED_PREFIXES))
    unknown = sorted(set(given) - set(KEY_BY_NAME) - set(ignored))
    if unknown:
        raise ConfigError(f"unknown config key{'s' if len(unknown) > 1 else ''}: "
                          f"{', '.join(unknown)}")
    values = {key.name: key.default for key in KEYS}
    for name, raw in given.items():
        if name in KEY_BY_NAME:
            values[name] = parse_value(KEY_BY_NAME[name], raw)
    config = JobConfig(values, ignored)
    check(config)
    return config


def check(config: JobConfig) -> None:
    """Values the job cannot run with, before anything is read or loaded."""
    for name in ("data.path", "data.output_path"):
        if not config[name]:
            key = KEY_BY_NAME[name]
            raise ConfigError(f"{name} is required ({key.flag} or {name}=...)")
    for name in ("data.n_samples", "data.batch_size", "rollout.prompt_length",
                 "rollout.response_length"):
        if config[name] < 1:
            raise ConfigError(f"{name} must be at least 1, got {config[name]}")
    for key in KEYS:
        problem = key.problem(config[key.name])
        if problem is not None:
            raise ConfigError(f"{key.name} {problem}")
    if config["rollout.temperature"] < 0:
        raise ConfigError(f"rollout.temperature must be >= 0, got {config['rollout.temperature']}")
    if config.top_k is not None and config.top_k < 1:
        raise ConfigError(f"rollout.top_k must be >= 1, or 0 / -1 for off, got {config.top_k}")
    if not 0 < config["rollout.top_p"] <= 1:
        raise ConfigError(f"rollout.top_p must be in (0, 1], got {config['rollout.top_p']}")
    if config.output_path.resolve() == config.data_path.resolve():
        raise ConfigError("data.output_path must differ from data.path")
