"""Step graphs (fastgen.engine.step_graph): the CPU's captured decode step.

The recorder and replay on small functions: a replay on new input contents equals the function
run again, allocations are made once (a replay returns the capture's buffers), in-place ops,
tensor lists in and out, Python numbers where a Tensor is expected, to() that copies or aliases;
reading tensor data or drawing random numbers refuses the capture. Then every model family
through the engine: greedy decoding with step graphs gives exactly (bitwise) the tokens and
logprobs of enforce_eager, for batches that shrink as sequences finish, each batch size being its
own graph, with no fallback to eager.
"""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, MixtralConfig

from fastgen import LLM, SamplingParams, ops
from fastgen.engine.decode_graphs import cpu_capture_sizes
from fastgen.engine.step_graph import CaptureUnsupported, StepGraph, capture
from tests.models.harness import VOCAB, save_tiny_model
from tests.models.test_deepseek import CASES as DEEPSEEK
from tests.models.test_llama4 import CASES as LLAMA4
from tests.models.test_moe_models import CASES as MOE
from tests.models.test_qwen import CASES as QWEN

# The recorder and replay.


def test_replay_recomputes_from_the_inputs_current_contents():
    x, w = torch.randn(3, 40), torch.rand(40) + 0.5

    def fn():
        y = ops.rms_norm(x, w, 1e-6)           # an allocation, then an out= op
        a, b = (y * 2 + x).split([16, 24], 1)  # a number as a Tensor; a Tensor[] return
        c = torch.cat([a.exp(), b], 1)         # a Tensor[] argument of slots
        c.mul_(0.5)                            # in place, on a slot
        return c.sum(0), x.to(torch.bfloat16), x.to(torch.float32)  # a copy; x itself

    graph, first = capture(fn)
    assert isinstance(graph, StepGraph) and graph.num_nodes > 0
    for _ in range(3):
        x.copy_(torch.randn(3, 40))
        got = graph.replay()
        want = fn()
        assert len(got) == 3
        for g, e in zip(got, want):
            assert g.dtype == e.dtype and torch.equal(g, e)
    assert got[2].data_ptr() == x.data_ptr()  # to() of the same dtype returned x: a constant


def test_buffers_are_allocated_once():
    x, w = torch.randn(5, 24), torch.rand(24)

    def fn():
        return ops.rms_norm(x, w, 1e-5)  # torch.empty_like, then rms_norm into it

    graph, (first,) = capture(fn)
    assert graph.num_nodes == 1  # the allocation left no node
    again = graph.replay()[0]
    assert again.data_ptr() == first.data_ptr()  # the capture's buffer, overwritten
    x.mul_(3)
    assert torch.equal(graph.replay()[0], fn())


def test_a_view_of_a_computed_tensor_is_replayed():
    x = torch.randn(4, 6)

    def fn():
        return (x + 1).t()[1:3]  # views of a slot are nodes

    graph, _ = capture(fn)
    x.copy_(torch.randn(4, 6))
    assert torch.equal(graph.replay()[0], fn())


@pytest.mark.parametrize("fn", [
    lambda x: x * float(x.sum()),       # .item(): reads data in Python
    lambda x: x[x > 0],                 # a shape that depends on data
    lambda x: x + torch.randn(x.shape),  # random numbers
    lambda x: x * bool((x[:1] > 0).is_nonzero()),  # a result that is no tensor
], ids=["item", "masked", "random", "bool"])
def test_what_a_replay_cannot_reproduce_refuses_the_capture(fn):
    x = torch.randn(8)
    with pytest.raises(CaptureUnsupported):
        capture(lambda: fn(x))


def test_a_call_that_returns_no_tensors_is_refused_before_it_runs():
    """A collective returns a Work object (c10d's allreduce_: Tensor[], Work): such a call is
    refused before it runs, so that the eager rerun that follows a refused capture does not make
    it twice (the other ranks would not). Here an op returning an int counts its calls."""
    calls = []
    library = torch.library.Library("fastgen_step_graph_test", "DEF")
    library.define("count(Tensor x) -> int")
    library.impl("count", lambda x: calls.append(1) or 1, "CompositeExplicitAutograd")
    x = torch.randn(4)
    with pytest.raises(CaptureUnsupported, match="returns int"):
        capture(lambda: x * torch.ops.fastgen_step_graph_test.count(x))
    assert calls == []
    assert str(torch.ops.c10d.allreduce_.default._schema.returns[-1].type).endswith("Work")


# Every family through the engine.

LLAMA = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                    tie_word_embeddings=False)
FAMILIES = {"llama": LLAMA, "qwen2": QWEN["qwen2"], "qwen3": QWEN["qwen3"],
            "mixtral": MOE["mixtral"], "qwen2_moe": MOE["qwen2_moe"],
            "llama4": LLAMA4["llama4_text"], "deepseek_v2_lite": DEEPSEEK["v2_lite"],
            "deepseek_v3": DEEPSEEK["v3"],
            # int8 needs input sizes that are multiples of 32 (the experts' intermediate here)
            "mixtral_i64": MixtralConfig(**{**MOE["mixtral"].to_diff_dict(), "intermediate_size": 64})}


def greedy(llm: LLM, prompts: list[list[int]]) -> list[tuple[list[int], list]]:
    params = [SamplingParams(max_tokens=6 + 3 * i, temperature=0, ignore_eos=True, logprobs=3)
              for i in range(len(prompts))]  # sequences finish at different steps
    outs = llm.generate(prompts, params, use_tqdm=False)
    return [(o.token_ids, o.logprobs) for o in (out.outputs[0] for out in outs)]


@pytest.mark.parametrize("family,quantization",
                         [(f, None) for f in FAMILIES] + [("llama", "int8"), ("mixtral_i64", "int8")])
def test_decoding_with_step_graphs_is_bitwise_enforce_eager(family, quantization, tmp_path):
    """(int8: quantized linear layers, and quantized experts through ops.quant_fused_moe.)"""
    save_tiny_model(FAMILIES[family], tmp_path)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in (5, 17, 2, 30)]
    runs = {}
    for eager in (True, False):
        llm = LLM(str(tmp_path), dtype="float32", device="cpu", cpu_kv_cache_gib=0.01,
                  enforce_eager=eager, quantization=quantization)
        runs[eager] = greedy(llm, prompts)
    graphs = llm.engine.model_runner.decode_graphs
    assert runs[False] == runs[True]
    captured = graphs._graphs
    assert sorted(captured) == [1, 2, 3, 4]  # the batch shrinks 4 -> 1, one graph each
    assert all(isinstance(graph, StepGraph) for graph in captured.values())


def test_every_cpu_batch_size_up_to_32_is_its_own_bucket():
    assert cpu_capture_sizes(16) == list(range(1, 17))
    assert cpu_capture_sizes(256) == list(range(1, 33))
