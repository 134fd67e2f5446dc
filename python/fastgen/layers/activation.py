"""Gated activations as layers over the fastgen kernels: the gate and up projections arrive as one
fused [T, 2I] tensor (one matmul instead of two) and the kernel splits, activates and multiplies
them in a single pass. Shape letters: T tokens, I intermediate size."""

from __future__ import annotations

import torch
from torch import nn

from fastgen import ops


class SiluAndMul(nn.Module):
    """silu(x[:, :I]) * x[:, I:], silu(g) = g * sigmoid(g) (SwiGLU's gating)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [T, 2I] -> [T, I]"""
        return ops.silu_and_mul(x)
