"""RMSNorm kernels (plain and fused with the residual add) and the RMSNorm layer, against the
float32 references in fastgen.ops.reference, on CPU and CUDA, over odd sizes and every dtype."""

import pytest
import torch

from fastgen import ops
from fastgen.layers.norm import RMSNorm
from fastgen.ops import reference
from fastgen.ops.tolerances import DTYPES, assert_close

# Odd sizes (CUDA: the scalar kernel), and sizes whose 16-byte vectors take 1, 2 and 8 registers
# per thread in the CUDA kernel (576, 12288, 40000 in bf16; 40000 fp32 is past the register
# path and goes scalar).
HIDDEN_SIZES = [1, 7, 576, 769, 5125, 12288, 40000]
NUM_TOKENS = [1, 3, 67]
EPS = 1e-6


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", HIDDEN_SIZES)
@pytest.mark.parametrize("num_tokens", NUM_TOKENS)
def test_rms_norm(device, dtype, hidden, num_tokens):
    x = torch.randn(num_tokens, hidden, dtype=dtype, device=device)
    weight = torch.randn(hidden, dtype=dtype, device=device)
    assert_close(ops.rms_norm(x, weight, EPS), reference.rms_norm(x, weight, EPS), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", [769, 1024])  # 1024: slices that allow 16-byte accesses
def test_rms_norm_strided_rows(device, dtype, hidden):
    """input may be a column slice of a wider tensor (rows stride(0) apart)."""
    wide = torch.randn(5, 3 * hidden, dtype=dtype, device=device)
    x = wide[:, hidden:2 * hidden]  # [5, hidden], stride (3 * hidden, 1)
    weight = torch.randn(hidden, dtype=dtype, device=device)
    assert_close(ops.rms_norm(x, weight, EPS), reference.rms_norm(x, weight, EPS), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", HIDDEN_SIZES)
@pytest.mark.parametrize("num_tokens", NUM_TOKENS)
def test_fused_add_rms_norm(device, dtype, hidden, num_tokens):
    x = torch.randn(num_tokens, hidden, dtype=dtype, device=device)
    residual = torch.randn(num_tokens, hidden, dtype=dtype, device=device)
    weight = torch.randn(hidden, dtype=dtype, device=device)
    expected_x, expected_residual = reference.fused_add_rms_norm(x, residual, weight, EPS)
    ops.fused_add_rms_norm(x, residual, weight, EPS)
    assert_close(residual, expected_residual, dtype)
    assert_close(x, expected_x, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_layer(device, dtype):
    layer = RMSNorm(769, eps=EPS).to(device=device, dtype=dtype)
    torch.nn.init.normal_(layer.weight)
    x = torch.randn(3, 769, dtype=dtype, device=device)
    residual = torch.randn(3, 769, dtype=dtype, device=device)
    assert_close(layer(x), reference.rms_norm(x, layer.weight, EPS), dtype)
    expected_x, expected_residual = reference.fused_add_rms_norm(x, residual, layer.weight, EPS)
    out, new_residual = layer(x, residual)
    assert out is x and new_residual is residual  # in place
    assert_close(new_residual, expected_residual, dtype)
    assert_close(out, expected_x, dtype)


def test_rms_norm_opcheck():
    x, weight = torch.randn(3, 64), torch.randn(64)
    torch.library.opcheck(torch.ops.fastgen.rms_norm.default, (torch.empty_like(x), x, weight, EPS))


def test_fused_add_rms_norm_opcheck():
    x, residual, weight = torch.randn(3, 64), torch.randn(3, 64), torch.randn(64)
    torch.library.opcheck(torch.ops.fastgen.fused_add_rms_norm.default, (x, residual, weight, EPS))


def test_rms_norm_rejects_bad_input():
    x = torch.randn(3, 64)
    with pytest.raises(RuntimeError, match="rms_norm: unsupported dtype Int"):
        ops.rms_norm(x.int(), torch.ones(64, dtype=torch.int32), EPS)
    with pytest.raises(RuntimeError, match=r"rms_norm: weight must be \[64\]"):
        ops.rms_norm(x, torch.ones(63), EPS)
    with pytest.raises(RuntimeError, match="fused_add_rms_norm: residual shape"):
        ops.fused_add_rms_norm(x, torch.randn(3, 63), torch.ones(64), EPS)
