"""Step graphs: a function of tensors (a decode step's forward pass and logits) run once under a
recorder and then replayed from C++ (csrc/core/step_graph.cpp) without Python, the CPU's
counterpart of a CUDA graph. The model stays defined once, in Python: whatever operators its
forward calls, fastgen's or aten's, are what the graph replays.

The recorder is a TorchDispatchMode, so it sees each operator call after Python has decided
everything (module structure, shapes, which kernel), and writes it down: the operator, and per
argument of its schema a constant (any tensor made before the capture — weights, caches, the
static input buffers — and every int, float, dtype) or a slot, the value an earlier call
returned. Two kinds of call leave no node: allocations (torch.empty and friends, whose results
depend only on shapes, fixed at capture) and views whose inputs are all constants. Their results are fixed tensors that the replay reuses, so a step's
buffers are allocated once, as a CUDA graph's memory pool is, and a tensor the graph returns is
overwritten by its next replay.

The same rules as CUDA graph capture apply: the function may not read tensor data in Python
(.item(), data-dependent shapes, random numbers: capture raises CaptureUnsupported and the caller
runs eagerly), and its inputs are static tensors that the caller overwrites in place before each
replay. What the captured Python would have computed from other state (the batch size, a
max_seqlen bound) is frozen at capture.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fastgen._C  # noqa: F401  (registers torch.classes.fastgen.StepGraph)

aten = torch.ops.aten

# Calls that only allocate: with constant arguments their result is a buffer the replay reuses.
_ALLOCATIONS = frozenset({aten.empty.memory_format, aten.empty_strided.default,
                          aten.empty_like.default, aten.new_empty.default,
                          aten.new_empty_strided.default})
_REPLAYABLE_RETURNS = frozenset({"Tensor", "List[Tensor]"})  # schema return types a node can hold
# Tags of calls a replay cannot reproduce: random draws, shapes that depend on data.
_UNREPLAYABLE_TAGS = frozenset({torch.Tag.nondeterministic_seeded, torch.Tag.dynamic_output_shape,
                                torch.Tag.data_dependent_output})


class CaptureUnsupported(RuntimeError):
    """The captured function did something a replay cannot reproduce (see the module docstring)."""


class StepGraph:
    """A captured function: replay() reruns its operator calls on the current contents of the
    tensors it read and returns its results (the same buffers each time, where they were
    allocated in the capture)."""

    def __init__(self, graph, num_nodes: int):
        self._graph = graph
        self.num_nodes = num_nodes

    def replay(self) -> list[torch.Tensor]:
        return self._graph.replay()


def capture(fn: Callable[[], torch.Tensor | Sequence[torch.Tensor]]) -> tuple[StepGraph, list]:
    """Runs fn once, recording it -> (its graph, what this run returned, as a list of tensors).
    Raises CaptureUnsupported when fn reads tensor data or draws random numbers."""
    graph = torch.classes.fastgen.StepGraph()
    recorder = _Recorder(graph)
    with torch.inference_mode(), recorder:
        result = fn()
    results = [result] if isinstance(result, torch.Tensor) else list(result)
    slots = [recorder.slot_of(t) for t in results]
    graph.results(slots, [t for t, s in zip(results, slots) if s < 0])
    return StepGraph(graph, graph.num_nodes()), results


def _key(t: torch.Tensor) -> int:
    return t._cdata  # the TensorImpl's address: one per tensor, whichever Python object holds it


def _is_view(schema, values: list, out) -> bool:
    """Whether the call returned views of its inputs. The schema says only that it may: to(),
    reshape() and contiguous() return their input or a copy, as it happens."""
    if not any(r.alias_info is not None and not r.alias_info.is_write for r in schema.returns):
        return False
    storages = {v.untyped_storage().data_ptr() for v in _tensors(values)}
    return all(t.untyped_storage().data_ptr() in storages for t in _tensors([out]))


def _tensors(values) -> list[torch.Tensor]:
    found = []
    for v in values:
        if isinstance(v, torch.Tensor):
            found.append(v)
        elif isinstance(v, (list, tuple)):
            found.extend(_tensors(v))
    return found


def _argument_values(schema, args: tuple, kwargs: dict) -> list:
    """Every argument of the schema, in its order, as the call gave it or by its default."""
    values = []
    for i, argument in enumerate(schema.arguments):
        if i < len(args) and not argument.kwarg_only:
            values.append(args[i])
        elif argument.name in kwargs:
            values.append(kwargs[argument.name])
        elif argument.has_default_value():
            values.append(argument.default_value)
        else:
            raise CaptureUnsupported(f"{schema.name}: no value for argument {argument.name}")
    return values


class _Recorder(TorchDispatchMode):
    def __init__(self, graph):
        super().__init__()
        self.graph = graph
        self._slots: dict[int, int] = {}  # tensor key -> the slot holding it
        self._alive: list[torch.Tensor] = []  # keeps keys unique until the capture ends
        self._num_slots = 0

    def slot_of(self, t: torch.Tensor) -> int:
        return self._slots.get(_key(t), -1)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        schema = func._schema
        if _UNREPLAYABLE_TAGS.intersection(func.tags):
            raise CaptureUnsupported(f"{func} cannot be replayed (random or data-dependent)")
        # Refused before it runs: a call whose result is not tensors (a collective's Work, a
        # Python number) must not happen twice when the caller reruns the function eagerly.
        for spec in schema.returns:
            if str(spec.type) not in _REPLAYABLE_RETURNS:
                raise CaptureUnsupported(f"{schema.name} returns {spec.type}, which a replay "
                                         f"cannot hand back to Python")
        out = func(*args, **kwargs)
        values = _argument_values(schema, args, kwargs)
        if func in _ALLOCATIONS or (not any(self._reads_slot(v) for v in values)
                                    and _is_view(schema, values, out)):
            self._alive.append(out)  # a buffer (its shape is fixed), or a view of constants

            return out
        self._record(schema, values, out)
        return out

    def _reads_slot(self, value) -> bool:
        if isinstance(value, torch.Tensor):
            return _key(value) in self._slots
        if isinstance(value, (list, tuple)):
            return any(self._reads_slot(v) for v in value)
        return False

    def _record(self, schema, values: list, out) -> None:
        graph = self.graph
        graph.begin(schema.name, schema.overload_name)
        inputs = set()
        for argument, value in zip(schema.arguments, values):
            if isinstance(value, torch.Tensor):
                inputs.add(_key(value))
                slot = self.slot_of(value)
                graph.slot(slot) if slot >= 0 else graph.constant(value)
            elif isinstance(value, (list, tuple)) and any(isinstance(v, torch.Tensor)
                                                          for v in value):
                if not all(isinstance(v, torch.Tensor) for v in value):
                    raise CaptureUnsupported(f"{schema.name}: a list of optional tensors")
                slots = [self.slot_of(v) for v in value]
                inputs.update(_key(v) for v in value)
                graph.tensor_list(slots, [v for v, s in zip(value, slots) if s < 0])
            else:
                graph.constant(list(value) if isinstance(value, tuple) else value)
        returned = (out,) if len(schema.returns) == 1 else (out or ())
        slots, unpack = [], []
        for spec, value in zip(schema.returns, returned):
            if isinstance(value, torch.Tensor):
                known = _key(value) in inputs or _key(value) in self._slots
                slots.append(-1 if known else self._new_slot(value))  # in place: the input's
                unpack.append(-1)
            elif isinstance(value, (list, tuple)) and all(isinstance(v, torch.Tensor)
                                                          for v in value):
                slots.append(self._num_slots)
                unpack.append(len(value))
                for v in value:
                    self._new_slot(v)
            else:
                raise CaptureUnsupported(f"{schema.name} returned {type(value).__name__}")
        graph.end(slots, unpack)

    def _new_slot(self, t: torch.Tensor) -> int:
        slot = self._slots[_key(t)] = self._num_slots
        self._num_slots += 1
        self._alive.append(t)
        return slot
