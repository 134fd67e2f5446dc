"""The CPU linear kernel (decode's GEMV / skinny GEMM) against the float32 reference in
fastgen.ops.reference, over odd sizes, every dtype, with and without bias. Its error must stay
within twice torch's own F.linear error in the same dtype (flash-attention's rule), plus a small
K-proportional slack for fp32 summation-order differences; the op is CPU-only (cuBLAS on GPUs)."""

import pytest
import torch
import torch.nn.functional as F

from fastgen import ops
from fastgen.layers.embedding import ParallelLMHead
from fastgen.layers.linear import linear
from fastgen.ops import reference
from fastgen.ops.tolerances import DTYPES, assert_within_baseline_error
NUM_TOKENS = [1, 2, 3, 5, 6, 8, 12, 13, 16, 17]  # tiles take up to 6 input rows: every remainder
IN_FEATURES = [7, 64, 576, 1000]  # K tails of 7, 0, 0, 8 past 32
OUT_FEATURES = [1, 5, 960, 3072]


def max_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return (actual.float() - expected).abs().max().item()


def assert_within_torch_error(actual: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                              bias: torch.Tensor | None) -> None:
    """max |actual - ref| <= 2 * max |F.linear - ref| + eps, with ref the float32 reference.
    eps covers fp32 rounding of a K-term sum of order-one products (K * 2^-24, with margin).
    actual: [T, O]; x: [T, I]; weight: [O, I]; bias: [O]"""
    eps = 16 * x.shape[1] * torch.finfo(torch.float32).eps
    assert_within_baseline_error(actual, reference.linear(x, weight, bias), F.linear(x, weight, bias),
                                 slack=eps)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("has_bias", [False, True])
@pytest.mark.parametrize("out_features", OUT_FEATURES)
@pytest.mark.parametrize("in_features", IN_FEATURES)
@pytest.mark.parametrize("num_tokens", NUM_TOKENS)
def test_linear(dtype, has_bias, out_features, in_features, num_tokens):
    x = torch.randn(num_tokens, in_features, dtype=dtype)
    weight = torch.randn(out_features, in_features, dtype=dtype)
    bias = torch.randn(out_features, dtype=dtype) if has_bias else None
    out = ops.linear(x, weight, bias)
    assert out.dtype == dtype and out.shape == (num_tokens, out_features)
    assert_within_torch_error(out, x, weight, bias)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("in_features", IN_FEATURES)
def test_linear_float32_out(dtype, in_features):
    """A low-precision input may write float32 (logits): never less accurate than rounding."""
    x = torch.randn(3, in_features, dtype=dtype)
    weight = torch.randn(960, in_features, dtype=dtype)
    bias = torch.randn(960, dtype=dtype)
    out = ops.linear(x, weight, bias, out_dtype=torch.float32)
    assert out.dtype == torch.float32
    assert_within_torch_error(out, x, weight, bias)
    assert max_error(out, reference.linear(x, weight, bias)) <= max_error(ops.linear(x, weight, bias),
                                                                          reference.linear(x, weight, bias))


def test_linear_strided_rows():
    """input may be a column slice of a wider tensor (rows stride(0) apart)."""
    wide = torch.randn(5, 3 * 576, dtype=torch.bfloat16)
    x = wide[:, 576:2 * 576]
    weight = torch.randn(960, 576, dtype=torch.bfloat16)
    assert_within_torch_error(ops.linear(x, weight), x, weight, None)


@pytest.mark.parametrize("num_tokens", [1, 17, 64])
def test_linear_layer_helper(num_tokens):
    """The layers' helper: the kernel for few tokens, F.linear above the crossover; same results."""
    x = torch.randn(num_tokens, 576, dtype=torch.bfloat16)
    weight = torch.randn(960, 576, dtype=torch.bfloat16)
    assert_within_torch_error(linear(x, weight), x, weight, None)
    logits = linear(x, weight, out_dtype=torch.float32)
    assert logits.dtype == torch.float32
    assert_within_torch_error(logits, x, weight, None)


def test_lm_head_float32_logits():
    head = ParallelLMHead(1000, 64).to(torch.bfloat16)
    torch.nn.init.normal_(head.weight)
    hidden = torch.randn(2, 64, dtype=torch.bfloat16)
    logits = head(hidden)
    assert logits.dtype == torch.float32
    assert_within_torch_error(logits, hidden, head.weight, None)


def test_linear_opcheck():
    x, weight, bias = torch.randn(3, 64), torch.randn(5, 64), torch.randn(5)
    torch.library.opcheck(torch.ops.fastgen.linear.default, (torch.empty(3, 5), x, weight, bias))
    torch.library.opcheck(torch.ops.fastgen.linear.default, (torch.empty(3, 5), x, weight, None))
    x, weight = x.bfloat16(), weight.bfloat16()
    torch.library.opcheck(torch.ops.fastgen.linear.default, (torch.empty(3, 5), x, weight, None))


def test_linear_rejects_bad_input():
    x, weight = torch.randn(3, 64), torch.randn(5, 64)
    with pytest.raises(RuntimeError, match="linear: unsupported dtype Int"):
        ops.linear(x.int(), weight.int())
    with pytest.raises(RuntimeError, match=r"linear: weight must be \[O, 64\]"):
        ops.linear(x, torch.randn(5, 63))
    with pytest.raises(RuntimeError, match=r"linear: bias must be \[5\]"):
        ops.linear(x, weight, torch.randn(4))
    with pytest.raises(RuntimeError, match="linear: weight and input must have the same dtype"):
        ops.linear(x, weight.bfloat16())
    with pytest.raises(RuntimeError, match="linear: out must be BFloat16 or float32"):
        ops.linear(x.bfloat16(), weight.bfloat16(), out_dtype=torch.float16)
    with pytest.raises(RuntimeError, match="linear: input must have 2 dims"):
        ops.linear(x[None], weight)
