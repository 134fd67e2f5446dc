"""One weight loader for every model: checkpoint tensors (from safetensors files, single or sharded,
or from a GGUF file) streamed into a model's parameters by the mapping the model declares.

A model class says how checkpoint names become its parameter names, as a WeightMapping:

    weight_mapping = WeightMapping(
        rules=(WeightRule("q_proj", "qkv_proj", shard_id="q"),        # fused QKV, shard q
               WeightRule("experts.{e}.w1", "experts.w13", shard_id=0),  # expert e's gate
               WeightRule("experts.gate_up_proj", "experts.w13_weight",  # already fused, [E, H, 2I]
                          transform=lambda w: w.transpose(1, 2))),
        ignore=("rotary_emb.inv_freq", "vision_model"))

Rules match whole dot-separated name components ("{e}" matches an expert index), so `gate_proj`
never matches inside `experts.7.gate_proj_bias` or turns `experts.7.gate_proj` into something
else by accident; they apply in order, each at most once, and at most one of those that match a
name may name a shard or an expert. Every parameter copies its piece through its own
`weight_loader(param, tensor, shard_id, expert_id)`, which knows its layer's sharding rule, and
declares the pieces (ShardKeys) a complete checkpoint holds for it (fastgen.layers.parameter).

Loading is strict and says everything at once: one ValueError naming every tensor the model has
no place for, every piece of a parameter that no tensor filled (by its checkpoint name, so
E experts x 3 projections are each accounted for), and every shape mismatch. Afterwards every
module with a `process_weights_after_loading()` method gets it called (MLA splits kv_b_proj,
quantized layers repack their blocks), in module order.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace

import torch
from torch import nn

from fastgen.layers.parameter import WHOLE, ShardId, ShardKey, covers, default_weight_loader
from fastgen.quantization import QuantizedParameter, QuantizedTensor

logger = logging.getLogger(__name__)

_EXPERT = "{e}"
_QUIET = frozenset({"rotary_emb.inv_freq", "lm_head.weight"})  # skipped without a word
_MAX_LISTED = 8  # names listed per kind of error; the rest are counted


@dataclass(frozen=True)
class WeightRule:
    """Checkpoint name components -> parameter name components ("" drops them, e.g. a
    "language_model" prefix), with the shard they fill; "{e}" in `checkpoint` matches the expert
    index, which the rule passes on as expert_id. transform is applied to the tensor first."""

    checkpoint: str
    param: str
    shard_id: ShardId = None
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None

    def __post_init__(self) -> None:
        if _EXPERT in self.param:
            raise ValueError(f"weight rule {self.checkpoint!r} -> {self.param!r}: only the "
                             f"checkpoint side may name the expert")

    @property
    def has_expert(self) -> bool:
        return _EXPERT in self.checkpoint.split(".")

    @property
    def is_rename(self) -> bool:
        """A rule that only renames: it names no shard, no expert and changes no values."""
        return self.shard_id is None and not self.has_expert and self.transform is None


@dataclass(frozen=True)
class WeightTarget:
    """Where one checkpoint tensor goes."""

    param: str
    shard_id: ShardId = None
    expert_id: int | None = None
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None

    @property
    def key(self) -> ShardKey:
        return (self.shard_id, self.expert_id)


def _find(components: list[str], pattern: list[str]) -> tuple[int, int | None] | None:
    """(start, expert index) of the first run of components matching pattern, or None."""
    for start in range(len(components) - len(pattern) + 1):
        expert = None
        for want, got in zip(pattern, components[start:]):
            if want == _EXPERT and got.isdigit():
                expert = int(got)
            elif want != got:
                break
        else:
            return start, expert
    return None


def _split(name: str) -> list[str]:
    return name.split(".") if name else []


@dataclass(frozen=True)
class WeightMapping:
    rules: tuple[WeightRule, ...] = ()
    ignore: tuple[str, ...] = ()  # name fragments (whole components) of tensors that are skipped

    def ignoring(self, *fragments: str) -> WeightMapping:
        """This mapping, skipping more names (e.g. "lm_head.weight" for a tied head)."""
        return replace(self, ignore=self.ignore + fragments)

    def ignores(self, name: str) -> bool:
        return self.ignored_by(name) is not None

    def ignored_by(self, name: str) -> str | None:
        """The ignore fragment that skips this tensor, or None."""
        components = _split(name)
        for fragment in self.ignore:
            if _find(components, _split(fragment)) is not None:
                return fragment
        return None

    def to_param(self, name: str) -> WeightTarget:
        """The parameter, shard and expert a checkpoint tensor named `name` fills."""
        components = _split(name)
        target = WeightTarget(name)
        for rule in self.rules:
            found = _find(components, _split(rule.checkpoint))
            if found is None:
                continue
            start, expert = found
            components[start:start + len(_split(rule.checkpoint))] = _split(rule.param)
            if not rule.is_rename:
                if target.key != WHOLE or target.transform is not None:
                    raise ValueError(f"checkpoint tensor {name}: two weight rules give it a "
                                     f"shard (the model's weight_mapping is ambiguous)")
                target = replace(target, shard_id=rule.shard_id, expert_id=expert,
                                 transform=rule.transform)
        return replace(target, param=".".join(components))

    def to_checkpoint(self, param: str, key: ShardKey) -> str:
        """The checkpoint name of the tensor that fills piece `key` of parameter `param` (the
        inverse of to_param, for error messages)."""
        shard_id, expert_id = key
        components = _split(param)
        for rule in reversed(self.rules):
            if rule.has_expert != (expert_id is not None) and not rule.is_rename:
                continue
            if rule.shard_id is not None and rule.shard_id != shard_id:
                continue
            target = _split(rule.param)
            found = _find(components, target) if target else None
            if found is None:
                continue
            start = found[0]
            source = [str(expert_id) if c == _EXPERT else c for c in _split(rule.checkpoint)]
            components[start:start + len(target)] = source
        return ".".join(components)


def _listed(kind: str, names: list[str]) -> str:
    shown = ", ".join(names[:_MAX_LISTED])
    more = f" (and {len(names) - _MAX_LISTED} more)" if len(names) > _MAX_LISTED else ""
    return f"{kind}: {shown}{more}"


def load_weights(model: nn.Module, weights: Iterable[tuple[str, torch.Tensor]],
                 mapping: WeightMapping | None = None) -> None:
    """Copies checkpoint tensors (name, tensor) into model's parameters through `mapping`
    (default: model.weight_mapping), then runs process_weights_after_loading. Raises one
    ValueError naming every unexpected tensor, every missing piece and every shape mismatch."""
    mapping = mapping if mapping is not None else getattr(model, "weight_mapping", WeightMapping())
    params = dict(model.named_parameters())  # a tied head appears once, under the embedding
    expected = {name: getattr(p, "shards", frozenset({WHOLE})) for name, p in params.items()}
    filled: dict[str, list[ShardKey]] = {name: [] for name in params}
    unexpected: list[str] = []
    mismatched: list[str] = []
    skipped: Counter[str] = Counter()
    for name, tensor in weights:
        fragment = mapping.ignored_by(name)
        if fragment is not None:
            skipped[fragment] += 1
            continue
        target = mapping.to_param(name)
        param = params.get(target.param)
        if param is None or not any(covers(target.key, want) for want in expected[target.param]):
            unexpected.append(name)
            continue
        filled[target.param].append(target.key)  # tried: a bad shape is not also "missing"
        if isinstance(tensor, QuantizedTensor) and not isinstance(param, QuantizedParameter):
            tensor = tensor.dequantize()  # a quantized file's tensor for a plain parameter
        if target.transform is not None:
            tensor = target.transform(tensor)
        loader = getattr(param, "weight_loader", default_weight_loader)
        try:
            loader(param, tensor, *target.key)
        except ValueError as e:
            mismatched.append(f"weight {name}: {e}")
    missing = [mapping.to_checkpoint(name, want)
               for name, wants in expected.items()
               for want in sorted(wants, key=repr)
               if not any(covers(got, want) for got in filled[name])]
    problems = []
    if unexpected:
        problems.append(_listed("unexpected weights", sorted(unexpected)))
    if missing:
        problems.append(_listed("missing weights", sorted(missing)))
    if mismatched:
        problems.append(_listed("wrong shapes", mismatched))
    if problems:
        raise ValueError("; ".join(problems))
    for fragment, count in skipped.items():
        if fragment not in _QUIET:
            logger.info("skipped %d checkpoint tensors named *%s* (not part of %s)", count,
                        fragment, type(model).__name__)
    process_weights_after_loading(model)


def process_weights_after_loading(model: nn.Module) -> None:
    """Calls every module's process_weights_after_loading() hook, in module order (also after
    random initialisation, so a model's derived weights always exist)."""
    for module in model.modules():
        hook = getattr(module, "process_weights_after_loading", None)
        if hook is not None and module is not model:
            hook()
    hook = getattr(model, "process_weights_after_loading", None)
    if hook is not None:
        hook()

