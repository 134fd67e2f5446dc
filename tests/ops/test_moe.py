"""The MoE ops (moe_route, moe_align, fused_moe) against the pure-PyTorch references in
fastgen.ops.reference (routing and the expert MLP computed in float64), on CPU and CUDA.

Sizes are odd on purpose: E not a power of two (6, 10), H and I that are not multiples of any SIMD
width (37, 23: the CPU kernels take any size, tails masked) beside multiples of 8 (64, 96: on CUDA
the 16-byte GEMV loads and, past 64 pairs, the tensor-core GEMM need H and I % 8 == 0; other
sizes take the GEMV with element loads), T from 1 to the hundreds, k > 1, experts that receive no
token and one expert receiving every token. On the CPU, fp32 batches of more than 48 tokens per
active expert go through at::linear per expert (the prefill path; bf16 / fp16 too on
AVX512-BF16 machines, past 32); the determinism cases stay under 32 so that they hold everywhere.
"""

import pytest
import torch

from fastgen import ops
from fastgen.ops import reference
from fastgen.ops.tolerances import DTYPES, assert_close

NUM_EXPERTS = [6, 10]
NUM_TOKENS = [1, 3, 17, 300]
SIZES = [(37, 23), (64, 96)]  # (H, I)

# Every routing variant, as keyword arguments of moe_route (the group ones for E = 6 and 10:
# groups of 2 or 3 / 5 experts, 2 kept).
ROUTINGS = {
    "softmax_renorm": dict(top_k=2, renormalize=True),  # Mixtral, Qwen3-MoE (norm_topk_prob)
    "softmax": dict(top_k=3),  # Qwen2-MoE, DeepSeek-V2-Lite
    "sigmoid": dict(top_k=1, scoring="sigmoid"),  # Llama 4
    "softmax_scaled": dict(top_k=2, scale=2.5),
    "group_max": dict(top_k=3, num_groups=2, topk_groups=1, group_scoring="max", scale=16.0),  # V2
    "sum_top2_bias": dict(top_k=3, scoring="sigmoid", renormalize=True, num_groups=3,
                          topk_groups=2, group_scoring="sum_top2", scale=2.5),  # V3 noaux_tc
}


def routing_args(name: str, num_experts: int, device: str) -> dict:
    args = dict(ROUTINGS[name])
    if name == "sum_top2_bias":
        if num_experts % 3:
            args.update(num_groups=5, topk_groups=2)  # E = 10: 5 groups of 2
        args["correction_bias"] = 0.1 * torch.randn(num_experts, device=device)
    return args


def random_routing(num_tokens: int, num_experts: int, top_k: int, device: str):
    """Softmax-renormalised routing of random logits (the reference's): (weights, ids)."""
    logits = torch.randn(num_tokens, num_experts)
    weights, ids = reference.moe_route(logits, top_k, renormalize=True)
    return weights.to(device), ids.to(device)


def expert_weights(num_experts: int, hidden: int, inter: int, dtype: torch.dtype, device: str):
    """w13 [E, 2I, H] and w2 [E, H, I], scaled so that every activation is of order one."""
    w13 = torch.randn(num_experts, 2 * inter, hidden, device=device) / hidden ** 0.5
    w2 = torch.randn(num_experts, hidden, inter, device=device) / inter ** 0.5
    return w13.to(dtype), w2.to(dtype)


def expected_moe(x, w13, w2, weights, ids, weight_on_input):
    return reference.fused_moe(x.double().cpu(), w13.double().cpu(), w2.double().cpu(),
                               weights.cpu(), ids.cpu(), weight_on_input)


# ---- moe_route ----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ROUTINGS)
@pytest.mark.parametrize("num_experts", NUM_EXPERTS)
@pytest.mark.parametrize("num_tokens", NUM_TOKENS)
def test_moe_route(device, name, num_experts, num_tokens):
    args = routing_args(name, num_experts, device)
    logits = torch.randn(num_tokens, num_experts, device=device)
    weights, ids = ops.moe_route(logits, **args)
    ref_args = {**args, "correction_bias": args.get("correction_bias")}
    if ref_args["correction_bias"] is not None:
        ref_args["correction_bias"] = ref_args["correction_bias"].cpu()
    expected_weights, expected_ids = reference.moe_route(logits.cpu(), **ref_args)
    assert weights.dtype == torch.float32 and ids.dtype == torch.int32
    assert torch.equal(ids.cpu(), expected_ids)
    assert_close(weights.cpu(), expected_weights, torch.float32)


@pytest.mark.parametrize("name", ROUTINGS)
def test_moe_route_ties_go_to_the_lower_index(device, name):
    """Logits from {0, 1, 2} tie everywhere (equal logits give bitwise-equal scores); a zero bias
    keeps them tied. Ids must be the reference's stable order: the lower expert (and group) first."""
    num_experts = 6
    args = routing_args(name, num_experts, device)
    if "correction_bias" in args:
        args["correction_bias"] = torch.zeros(num_experts, device=device)
    logits = torch.randint(0, 3, (64, num_experts), device=device).float()
    logits[0] = 1.0  # every expert and every group tied
    weights, ids = ops.moe_route(logits, **args)
    ref_args = {**args, "correction_bias": args.get("correction_bias")}
    if ref_args["correction_bias"] is not None:
        ref_args["correction_bias"] = ref_args["correction_bias"].cpu()
    expected_weights, expected_ids = reference.moe_route(logits.cpu(), **ref_args)
    assert torch.equal(ids.cpu(), expected_ids)
    assert ids[0].tolist() == list(range(args["top_k"]))
    assert_close(weights.cpu(), expected_weights, torch.float32)


def test_moe_route_group_limit_excludes_better_experts(device):
    """The best expert overall sits in a group whose sum of two best keys loses: sum_top2 must
    drop it, max must keep it."""
    logits = torch.tensor([[5.0, -5.0, 2.0, 2.0, 0.0, 0.0]], device=device)  # groups of 2
    args = dict(top_k=2, scoring="sigmoid", num_groups=3, topk_groups=1)
    _, ids = ops.moe_route(logits, group_scoring="sum_top2", **args)
    assert ids.tolist() == [[2, 3]]
    _, ids = ops.moe_route(logits, group_scoring="max", **args)
    assert ids.tolist() == [[0, 1]]


def test_moe_route_bias_selects_but_does_not_weigh(device):
    logits = torch.tensor([[1.0, 0.0, 0.5]], device=device)
    bias = torch.tensor([0.0, 10.0, 0.0], device=device)
    weights, ids = ops.moe_route(logits, 1, scoring="sigmoid", correction_bias=bias)
    assert ids.tolist() == [[1]]
    assert_close(weights.cpu(), torch.tensor([[0.5]]), torch.float32)  # sigmoid(0), unbiased


# ---- moe_align ----------------------------------------------------------------------------------

def test_moe_align_vllm_example(device):
    """vLLM's moe_align_block_size docstring example (its ids are experts 1-4; expert 0 is empty
    here): each run of 3 pairs padded to 4 with the pair count, 12."""
    topk_ids = torch.tensor([[2, 3, 4], [1, 2, 4], [1, 3, 4], [1, 2, 3]], dtype=torch.int32,
                            device=device)
    sorted_ids, offsets, tiles = ops.moe_align(topk_ids, 5, 4)
    assert sorted_ids[:16].tolist() == [3, 6, 9, 12, 0, 4, 10, 12, 1, 7, 11, 12, 2, 5, 8, 12]
    assert sorted_ids.numel() == 12 + 5 * 3 and (sorted_ids[16:] == 12).all()
    assert offsets.tolist() == [0, 0, 4, 8, 12, 16]
    assert tiles.tolist() == [1, 2, 3, 4, -1, -1, -1]


@pytest.mark.parametrize("block_size", [1, 4, 16, 64])
@pytest.mark.parametrize("num_experts", NUM_EXPERTS)
@pytest.mark.parametrize("num_tokens", [0, 1, 5, 300, 3000])
def test_moe_align(device, block_size, num_experts, num_tokens):
    _, ids = random_routing(num_tokens, num_experts, 2, device)
    got = ops.moe_align(ids, num_experts, block_size)
    for actual, expected in zip(got, reference.moe_align(ids.cpu(), num_experts, block_size)):
        assert torch.equal(actual.cpu(), expected)


@pytest.mark.parametrize("block_size", [1, 8, 64])
def test_moe_align_one_expert_takes_every_pair(device, block_size):
    ids = torch.full((200, 1), 7, dtype=torch.int32, device=device)
    got = ops.moe_align(ids, 10, block_size)
    for actual, expected in zip(got, reference.moe_align(ids.cpu(), 10, block_size)):
        assert torch.equal(actual.cpu(), expected)


@pytest.mark.parametrize("block_size", [1, 16])
def test_moe_align_skips_pairs_with_no_expert(device, block_size):
    """Id -1: a pair routed to another rank's experts (expert parallelism) is left out."""
    _, ids = random_routing(300, 8, 2, device)
    ids[::3, 1] = -1
    ids[7] = -1
    got = ops.moe_align(ids, 8, block_size)
    for actual, expected in zip(got, reference.moe_align(ids.cpu(), 8, block_size)):
        assert torch.equal(actual.cpu(), expected)
    sorted_ids, offsets, _ = got
    assert int(offsets[-1]) >= int((ids >= 0).sum())
    kept = sorted_ids[:int(offsets[-1])].cpu()
    assert not torch.isin(kept, (ids.flatten() < 0).nonzero().flatten().int().cpu()).any()


# ---- fused_moe ----------------------------------------------------------------------------------

@pytest.mark.parametrize("weight_on_input", [False, True])
@pytest.mark.parametrize("num_tokens", [1, 5, 200])
def test_fused_moe_skips_pairs_with_no_expert(device, weight_on_input, num_tokens):
    """Pairs with id -1 add nothing (both CPU paths: few tokens stream, many go to GEMMs); a batch
    whose pairs are all skipped gives zeros."""
    top_k = 1 if weight_on_input else 2
    weights, ids = random_routing(num_tokens, 6, top_k, device)
    ids[::2, 0] = -1
    x = torch.randn(num_tokens, 64, device=device)
    w13, w2 = expert_weights(6, 64, 96, torch.float32, device)
    out = ops.fused_moe(x, w13, w2, weights, ids, weight_on_input)
    assert_close(out.cpu(), expected_moe(x, w13, w2, weights, ids, weight_on_input), torch.float32)
    none = ops.fused_moe(x, w13, w2, weights, torch.full_like(ids, -1), weight_on_input)
    assert torch.equal(none.cpu(), torch.zeros_like(x).cpu())


@pytest.mark.parametrize("weight_on_input", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden,inter", SIZES)
@pytest.mark.parametrize("num_experts", NUM_EXPERTS)
@pytest.mark.parametrize("num_tokens", NUM_TOKENS)
def test_fused_moe(device, weight_on_input, dtype, hidden, inter, num_experts, num_tokens):
    top_k = 1 if weight_on_input else 2  # Llama 4 routes one expert; the kernel takes any k
    weights, ids = random_routing(num_tokens, num_experts, top_k, device)
    x = torch.randn(num_tokens, hidden, device=device).to(dtype)
    w13, w2 = expert_weights(num_experts, hidden, inter, dtype, device)
    out = ops.fused_moe(x, w13, w2, weights, ids, weight_on_input)
    assert out.dtype == dtype and out.shape == x.shape
    assert_close(out.cpu(), expected_moe(x, w13, w2, weights, ids, weight_on_input), dtype)


@pytest.mark.parametrize("weight_on_input", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_tokens", [1, 200])
def test_fused_moe_one_expert_takes_every_token(device, weight_on_input, dtype, num_tokens):
    """Slot 0 of every token goes to expert 3, slot 1 anywhere else (or nowhere else, k = 1)."""
    hidden, inter, num_experts = 64, 96, 6
    top_k = 1 if weight_on_input else 2
    weights, ids = random_routing(num_tokens, num_experts, top_k, device)
    ids[:, 0] = 3
    if top_k == 2:
        ids[:, 1] = torch.where(ids[:, 1] == 3, 0, ids[:, 1])
    x = torch.randn(num_tokens, hidden, device=device).to(dtype)
    w13, w2 = expert_weights(num_experts, hidden, inter, dtype, device)
    out = ops.fused_moe(x, w13, w2, weights, ids, weight_on_input)
    assert_close(out.cpu(), expected_moe(x, w13, w2, weights, ids, weight_on_input), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_moe_writes_out(device, dtype):
    weights, ids = random_routing(5, 6, 2, device)
    x = torch.randn(5, 37, device=device).to(dtype)
    w13, w2 = expert_weights(6, 37, 23, dtype, device)
    out = torch.full_like(x, float("nan"))
    assert ops.fused_moe(x, w13, w2, weights, ids, out=out) is out
    assert_close(out.cpu(), expected_moe(x, w13, w2, weights, ids, False), dtype)


def moe_in_batch(x0, weights0, ids0, batch, num_experts, w13, w2, weight_on_input):
    """Token x0's output when it is row 0 of a batch of `batch` tokens (the rest random)."""
    device = x0.device
    others_weights, others_ids = random_routing(batch - 1, num_experts, ids0.shape[1], device)
    x = torch.cat([x0, torch.randn(batch - 1, x0.shape[1], device=device).to(x0.dtype)])
    weights = torch.cat([weights0, others_weights])
    ids = torch.cat([ids0, others_ids])
    return ops.fused_moe(x, w13, w2, weights, ids, weight_on_input)[:1]


@pytest.mark.parametrize("weight_on_input", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_moe_is_batch_invariant(device, weight_on_input, dtype):
    """A token's output is bitwise the same alone and in any batch on the same path: alone and in
    32 tokens (decode sizes: the CPU's streaming kernel, CUDA's GEMV, <= 64 pairs), in 256 and
    384 tokens (CPU: still streaming, <= 12 tokens per expert on average; CUDA: the tensor-core
    GEMM for bf16 / fp16)."""
    num_experts, hidden, inter, top_k = 64, 64, 96, 2
    w13, w2 = expert_weights(num_experts, hidden, inter, dtype, device)
    weights0, ids0 = random_routing(1, num_experts, top_k, device)
    x0 = torch.randn(1, hidden, device=device).to(dtype)
    run = lambda batch: moe_in_batch(x0, weights0, ids0, batch, num_experts, w13, w2,
                                     weight_on_input)
    alone, small = ops.fused_moe(x0, w13, w2, weights0, ids0, weight_on_input), run(32)
    assert torch.equal(alone, small)
    large = run(256)
    assert torch.equal(large, run(384))
    if device == "cpu":
        assert torch.equal(alone, large)


# ---- schemas and errors -------------------------------------------------------------------------

def test_moe_opcheck(device):
    logits = torch.randn(5, 6, device=device)
    weights = torch.empty(5, 2, device=device)
    ids = torch.empty(5, 2, dtype=torch.int32, device=device)
    bias = torch.randn(6, device=device)
    torch.library.opcheck(torch.ops.fastgen.moe_route.default,
                          (weights, ids, logits, "softmax", True, None, None, "max", None, 1.0))
    torch.library.opcheck(torch.ops.fastgen.moe_route.default,
                          (weights, ids, logits, "sigmoid", True, 3, 2, "sum_top2", bias, 2.5))
    _, ids = ops.moe_route(logits, 2)
    block_size = 4
    padded = ids.numel() + 6 * (block_size - 1)
    int32 = dict(dtype=torch.int32, device=device)
    torch.library.opcheck(torch.ops.fastgen.moe_align.default,
                          (torch.empty(padded, **int32), torch.empty(7, **int32),
                           torch.empty(-(-padded // block_size), **int32), ids, block_size))
    x = torch.randn(5, 37, device=device)
    w13, w2 = expert_weights(6, 37, 23, torch.float32, device)
    weights, ids = random_routing(5, 6, 2, device)
    for weight_on_input in (False, True):
        torch.library.opcheck(torch.ops.fastgen.fused_moe.default,
                              (torch.empty_like(x), x, w13, w2, weights, ids, weight_on_input))


def test_moe_route_rejects_bad_input():
    logits = torch.randn(3, 6)
    with pytest.raises(RuntimeError, match=r"moe_route: top_k must be in \[1, 6\]"):
        ops.moe_route(logits, 7)
    with pytest.raises(RuntimeError, match="moe_route: num_groups 4 must divide the 6 experts"):
        ops.moe_route(logits, 2, num_groups=4, topk_groups=1)
    with pytest.raises(RuntimeError, match="moe_route: num_groups and topk_groups"):
        ops.moe_route(logits, 2, num_groups=3)
    with pytest.raises(RuntimeError, match=r"moe_route: topk_groups must be in \[1, 3\]"):
        ops.moe_route(logits, 2, num_groups=3, topk_groups=4)
    with pytest.raises(RuntimeError, match="moe_route: top_k 3 is more than the 2 experts"):
        ops.moe_route(logits, 3, num_groups=3, topk_groups=1)
    with pytest.raises(RuntimeError, match="sum_top2\" needs groups of >= 2 experts"):
        ops.moe_route(logits, 2, num_groups=6, topk_groups=2, group_scoring="sum_top2")
    with pytest.raises(RuntimeError, match="moe_route: scoring must be \"softmax\" or \"sigmoid\""):
        ops.moe_route(logits, 2, scoring="softplus")
    with pytest.raises(RuntimeError, match="moe_route: group_scoring must be"):
        ops.moe_route(logits, 2, num_groups=3, topk_groups=1, group_scoring="mean")
    with pytest.raises(RuntimeError, match=r"moe_route: correction_bias must be \[6\]"):
        ops.moe_route(logits, 2, correction_bias=torch.zeros(5))
    with pytest.raises(RuntimeError, match="moe_route: router_logits must be Float"):
        ops.moe_route(logits.bfloat16(), 2)


def test_moe_align_rejects_bad_input():
    ids = torch.tensor([[0, 5], [2, 1]], dtype=torch.int32)
    with pytest.raises(RuntimeError, match=r"moe_align: topk_ids\[0, 1\] = 5 is not an expert id"):
        ops.moe_align(ids, 4)
    with pytest.raises(RuntimeError, match="moe_align: block_size must be >= 1"):
        int32 = dict(dtype=torch.int32)
        torch.ops.fastgen.moe_align.default(torch.empty(4, **int32), torch.empty(7, **int32),
                                            torch.empty(4, **int32), ids, 0)
    with pytest.raises(RuntimeError, match=r"moe_align: sorted_ids must be \[22\]"):
        torch.ops.fastgen.moe_align.default(torch.empty(4, **int32), torch.empty(7, **int32),
                                            torch.empty(6, **int32), ids, 4)
    with pytest.raises(RuntimeError, match="moe_align: every tensor must be int32"):
        ops.moe_align(ids.long(), 6)


def test_fused_moe_rejects_bad_input():
    x = torch.randn(3, 37)
    w13, w2 = expert_weights(6, 37, 23, torch.float32, "cpu")
    weights, ids = random_routing(3, 6, 2, "cpu")
    with pytest.raises(RuntimeError, match=r"fused_moe: topk_ids\[2, 0\] = -2 is not an expert "
                                           r"id in \[0, 6\) or -1 \(skip\)"):
        bad = ids.clone()
        bad[2, 0] = -2
        ops.fused_moe(x, w13, w2, weights, bad)
    with pytest.raises(RuntimeError, match=r"fused_moe: w13 must be \[E, 2I, 37\]"):
        ops.fused_moe(x, w13[:, :, :36].contiguous(), w2, weights, ids)
    with pytest.raises(RuntimeError, match=r"fused_moe: w2 must be \[6, 37, 23\]"):
        ops.fused_moe(x, w13, w2[:, :, :22].contiguous(), weights, ids)
    with pytest.raises(RuntimeError, match="fused_moe: w13 and x must have the same dtype"):
        ops.fused_moe(x, w13.bfloat16(), w2, weights, ids)
    with pytest.raises(RuntimeError, match="fused_moe: topk_ids shape"):
        ops.fused_moe(x, w13, w2, weights, ids[:, :1].contiguous())
    with pytest.raises(RuntimeError, match="fused_moe: topk_ids must be Int"):
        ops.fused_moe(x, w13, w2, weights, ids.long())
    with pytest.raises(RuntimeError, match="fused_moe: unsupported dtype Int"):
        ops.fused_moe(x.int(), w13.int(), w2.int(), weights, ids)
