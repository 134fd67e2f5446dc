"""SiLU-and-multiply kernel and the SiluAndMul layer, against the float32 reference in
fastgen.ops.reference, on CPU and CUDA, over odd sizes and every dtype."""

import pytest
import torch

from fastgen import ops
from fastgen.layers.activation import SiluAndMul
from fastgen.ops import reference
from fastgen.ops.tolerances import DTYPES, assert_close

INTERMEDIATE_SIZES = [1, 7, 576, 769, 5125, 14336]  # odd ones: the CUDA kernel's scalar path
NUM_TOKENS = [1, 3, 67]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("inter", INTERMEDIATE_SIZES)
@pytest.mark.parametrize("num_tokens", NUM_TOKENS)
def test_silu_and_mul(device, dtype, inter, num_tokens):
    x = torch.randn(num_tokens, 2 * inter, dtype=dtype, device=device) * 3
    assert_close(ops.silu_and_mul(x), reference.silu_and_mul(x), dtype)


def test_silu_and_mul_extreme_gates(device):
    """The CPU exp saturates instead of overflowing: silu(-inf-ish) -> 0, silu(large) -> x."""
    gate = torch.linspace(-200, 200, 4001, device=device)
    x = torch.cat((gate, torch.ones_like(gate)))[None, :]  # [1, 2I]
    out = ops.silu_and_mul(x)
    assert torch.isfinite(out).all()
    assert_close(out, reference.silu_and_mul(x), torch.float32)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("inter", [769, 1024])  # 1024: rows that allow 16-byte accesses
def test_silu_and_mul_strided_rows(device, dtype, inter):
    """input may be a column slice of a wider tensor (rows stride(0) apart)."""
    wide = torch.randn(5, 3 * inter, dtype=dtype, device=device)
    x = wide[:, :2 * inter]
    assert_close(ops.silu_and_mul(x), reference.silu_and_mul(x), dtype)


def test_silu_and_mul_layer(device):
    x = torch.randn(3, 2 * 769, device=device)
    assert_close(SiluAndMul()(x), reference.silu_and_mul(x))


def test_silu_and_mul_opcheck():
    x = torch.randn(3, 2 * 64)
    torch.library.opcheck(torch.ops.fastgen.silu_and_mul.default, (torch.empty(3, 64), x))


def test_silu_and_mul_rejects_bad_input():
    with pytest.raises(RuntimeError, match="silu_and_mul: unsupported dtype Double"):
        ops.silu_and_mul(torch.randn(3, 8, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="silu_and_mul: input must be .* odd last dim 7"):
        torch.ops.fastgen.silu_and_mul(torch.empty(3, 3), torch.randn(3, 7))
    with pytest.raises(RuntimeError, match=r"silu_and_mul: out must be \[3, 4\]"):
        torch.ops.fastgen.silu_and_mul(torch.empty(3, 5), torch.randn(3, 8))
    with pytest.raises(RuntimeError, match="silu_and_mul: out and input must have the same dtype"):
        torch.ops.fastgen.silu_and_mul(torch.empty(3, 4, dtype=torch.float16), torch.randn(3, 8))
