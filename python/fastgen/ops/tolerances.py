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
