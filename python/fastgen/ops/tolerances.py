"""Numerics policy: how far a kernel's output may be from its float32 reference, per dtype, and
how far a whole model's logits may be from Hugging Face's. Tests import these tables; no test picks
its own tolerance. The per-op low-precision bounds are a few units of the dtype's rounding error
(bf16 keeps 8 significant bits, fp16 11) on values of order one."""

import torch

TOLERANCES: dict[torch.dtype, dict[str, float]] = {
    torch.float32: {"atol": 1e-5, "rtol": 1e-5},
    torch.float16: {"atol": 2e-3, "rtol": 2e-3},
    torch.bfloat16: {"atol": 1.6e-2, "rtol": 1.6e-2},
}
DTYPES: tuple[torch.dtype, ...] = tuple(TOLERANCES)  # every dtype the kernels take

# fastgen's logits against Hugging Face's for the same weights. Both sides accumulate rounding over
# a few layers, so these are looser than the per-op table.
LOGIT_TOLERANCES: dict[torch.dtype, dict[str, float]] = {
    torch.float32: {"atol": 2e-4, "rtol": 2e-4},
    torch.bfloat16: {"atol": 6e-2, "rtol": 6e-2},
}

# A GGUF model run on its quantized blocks (fastgen's kernels: two-digit int8 activations)
# against the same file dequantized to float32 (transformers), float32 activations on both
# sides, per weight type. Measured on the default model (Q4_1 layers, Q8_0 table) over three
# chat prompts and 16 greedy tokens each: max |diff| 0.009 on logits of magnitude ~25; the
# activations' second digit keeps the error of every type below bf16's rounding (whose own
# logit error on that model is 0.24-0.53), so one bound serves them all, with 3x margin.
QUANT_LOGIT_TOLERANCES: dict[str, dict[str, float]] = {
    name: {"atol": 3e-2, "rtol": 0.0} for name in ("Q4_0", "Q4_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K")
}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype | None = None) -> None:
    """torch.testing.assert_close with the tolerance of ``dtype`` (default: actual's dtype)."""
    tol = TOLERANCES[dtype or actual.dtype]
    torch.testing.assert_close(actual.float(), expected.float(), **tol)


def assert_logits_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    """A model's logits against Hugging Face's, with the logit tolerance of the model's dtype."""
    torch.testing.assert_close(actual.float(), expected.float(), **LOGIT_TOLERANCES[dtype])


def assert_within_baseline_error(actual: torch.Tensor, expected: torch.Tensor,
                                 baseline: torch.Tensor, slack: float = 0.0) -> None:
    """max |actual - expected| <= 2 * max |baseline - expected| + slack, with expected a float32
    reference and baseline PyTorch's own op in the same low precision: a kernel may be at most
    twice as far off as PyTorch is (flash-attention's rule, no hand-picked tolerance)."""
    error = (actual.float() - expected.float()).abs().max().item()
    baseline_error = (baseline.float() - expected.float()).abs().max().item()
    assert error <= 2 * baseline_error + slack, (error, baseline_error, slack)


def quant_linear_bound(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """How far quant_linear may be from x @ weight^T in exact arithmetic, per output (float64):
    the kernel quantizes each 32-element block of x in two int8 digits, so every element is off
    by at most half the second digit's step, amax / (127 * 254 * 2) with amax the block's largest
    |x|; the products themselves are exact integers, and the fp32 scaling adds K * 2^-24 relative
    rounding (with margin 16) of sum |w x|.   x: [T, K]; weight: [O, K] dequantized -> [T, O]"""
    x64, w64 = x.double(), weight.double().abs()
    t, k = x64.shape
    amax = x64.abs().view(t, k // 32, 32).amax(dim=-1, keepdim=True).expand(t, k // 32, 32)
    digit = amax.reshape(t, k) / (127 * 254 * 2)
    rounding = 16 * k * torch.finfo(torch.float32).eps * (x64.abs() @ w64.T)
    return digit @ w64.T + rounding
