"""RMSNorm as a layer over the fastgen kernels. With a residual it uses the fused kernel, which adds
the residual and normalises in one pass, in place: the pre-norm decoder block's
``residual = x + residual; x = norm(residual)`` costs one read of the hidden state, not three.
Shape letters: T tokens, H hidden size."""

from __future__ import annotations

import torch
from torch import nn

from fastgen import ops


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x**2) + eps) * weight, over the last dim."""

    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))  # [H]
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """x: [T, H] -> [T, H]. With residual [T, H]: residual += x, then x = norm(residual), both
        in place (x must be contiguous), and returns (x, residual)."""
        if residual is None:
            return ops.rms_norm(x, self.weight, self.eps)
        ops.fused_add_rms_norm(x, residual, self.weight, self.eps)
        return x, residual
