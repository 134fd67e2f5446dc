"""Rotary position embedding (RoPE) as a layer: a float32 cos/sin table built once per model, and
the in-place rotation of query and key by each token's position (``fastgen.ops.rotary_embedding``).

The table has one row per position the engine can reach (its max_model_len), not per position the
model was trained for: Llama-3.1's 131072 positions x 128 dims cost 64 MiB a table, and a model
builds its tables through one RotaryEmbeddings, which hands every layer with the same parameters
the same module, so 32 layers share one table instead of holding 2 GiB of copies.

The table is what Hugging Face's rope init functions (``transformers.modeling_rope_utils``) imply:
the same inverse frequencies for every scaling type, and the same attention factor multiplied into
cos and sin, so a model here rotates exactly as its Hugging Face implementation does. Scaling that
depends on the running sequence length ("dynamic", "longrope") is not supported.
Shape letters: T tokens, P positions, R rotary dims (<= D, the head size), Hq / Hkv heads.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from fastgen import ops

DEFAULT_ROPE_THETA = 10000.0  # transformers' base when a config names none


def _default_inv_freq(rotary_dim: int, base: float) -> torch.Tensor:
    """base ** (-2i / R) for i < R/2, in float32 with the same operations as transformers."""
    exponent = torch.arange(0, rotary_dim, 2, dtype=torch.int64).float() / rotary_dim  # [R/2]
    return 1.0 / (base ** exponent)


def _llama3_inv_freq(inv_freq: torch.Tensor, scaling: dict[str, Any]) -> torch.Tensor:
    """Llama 3.1: wavelengths above original / low_freq_factor are divided by factor, those below
    original / high_freq_factor are kept, and the band between is interpolated smoothly.
    inv_freq: [R/2] -> [R/2]"""
    factor = scaling["factor"]
    low_freq_factor, high_freq_factor = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_context_len = scaling["original_max_position_embeddings"]
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's magnitude correction for a context scaled by `scale` (DeepSeek squares the
    mscale_all_dim one into its softmax scale)."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn_inv_freq(rotary_dim: int, base: float, max_position: int,
                   scaling: dict[str, Any]) -> tuple[torch.Tensor, float]:
    """YaRN: frequencies that turn fewer than beta_slow times over the original context are
    interpolated (divided by factor), those turning more than beta_fast times are kept, with a
    linear ramp between; cos and sin are scaled by the attention factor
    0.1 * ln(factor) + 1 (or the ratio of the mscale / mscale_all_dim forms, or as given)."""
    original = scaling["original_max_position_embeddings"]
    factor = scaling.get("factor")
    if factor is None:  # DeepSeek-V3 style: the extension ratio is implied by the two lengths
        factor = max_position / original
    attention_factor = scaling.get("attention_factor")
    mscale, mscale_all_dim = scaling.get("mscale"), scaling.get("mscale_all_dim")
    if attention_factor is None:
        if mscale and mscale_all_dim:
            attention_factor = float(yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim))
        else:
            attention_factor = yarn_mscale(factor)
    beta_fast = scaling.get("beta_fast") or 32
    beta_slow = scaling.get("beta_slow") or 1

    def correction_dim(num_rotations: float) -> float:
        return (rotary_dim * math.log(original / (num_rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, rotary_dim - 1)
    if low == high:
        high += 0.001  # keeps the ramp finite
    ramp = ((torch.arange(rotary_dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    pos_freqs = base ** (torch.arange(0, rotary_dim, 2).float() / rotary_dim)  # [R/2]
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
    extrapolation_weight = 1 - ramp
    inv_freq = interpolation * (1 - extrapolation_weight) + extrapolation * extrapolation_weight
    return inv_freq, attention_factor


def rope_inv_freq(rotary_dim: int, max_position: int, base: float,
                  scaling: dict[str, Any] | None) -> tuple[torch.Tensor, float]:
    """(inv_freq [R/2] float32, attention_factor) for a rope type, as transformers computes them.
    scaling: None or a dict with "rope_type" (or legacy "type") among default / linear / llama3 /
    yarn and that type's parameters (the rope_parameters of an HF config, without rope_theta)."""
    rope_type = "default" if scaling is None else scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type == "default":
        return _default_inv_freq(rotary_dim, base), 1.0
    if rope_type == "linear":
        return _default_inv_freq(rotary_dim, base) / scaling["factor"], 1.0
    if rope_type == "llama3":
        return _llama3_inv_freq(_default_inv_freq(rotary_dim, base), scaling), 1.0
    if rope_type == "yarn":
        return _yarn_inv_freq(rotary_dim, base, max_position, scaling)
    raise ValueError(f"unsupported rope_type {rope_type!r} (supported: default, linear, llama3, yarn)")


def build_cos_sin_cache(head_size: int, rotary_dim: int, max_position: int, base: float,
                        scaling: dict | None, num_positions: int | None = None) -> torch.Tensor:
    """cos | sin of position * inv_freq, times the attention factor -> [P, R] float32 for the
    first num_positions positions (default max_position, the model's max_position_embeddings,
    which YaRN's frequencies depend on). Row p holds cos(p * f_i) in columns i < R/2 and
    sin(p * f_i) in columns R/2 + i."""
    if rotary_dim > head_size or rotary_dim % 2:
        raise ValueError(f"rotary_dim {rotary_dim} must be even and <= head_size {head_size}")
    inv_freq, attention_factor = rope_inv_freq(rotary_dim, max_position, base, scaling)
    positions = torch.arange(max_position if num_positions is None else num_positions,
                             dtype=torch.float32)
    freqs = positions[:, None] * inv_freq[None, :]  # [P, R/2]
    return torch.cat((freqs.cos() * attention_factor, freqs.sin() * attention_factor), dim=-1)


def rope_params_from_config(hf_config: Any) -> tuple[float, dict | None]:
    """(base, scaling) from a Hugging Face config: transformers 5's ``rope_parameters`` dict
    (rope_type, rope_theta, ...) or the legacy ``rope_theta`` / ``rope_scaling`` attributes.
    scaling is None for plain RoPE, else the parameters without rope_theta. A partial rotary
    factor is not part of it: the caller turns it into rotary_dim."""
    params = getattr(hf_config, "rope_parameters", None)
    if not params:
        params = dict(getattr(hf_config, "rope_scaling", None) or {})
        params.setdefault("rope_theta", getattr(hf_config, "rope_theta", DEFAULT_ROPE_THETA))
    scaling = {key: value for key, value in params.items()
               if key not in ("rope_theta", "partial_rotary_factor")}
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type in ("llama3", "yarn") and "original_max_position_embeddings" not in scaling:
        # HF falls back to the config's own context length for these types
        scaling["original_max_position_embeddings"] = hf_config.max_position_embeddings
    base = float(params.get("rope_theta", DEFAULT_ROPE_THETA))
    return base, None if rope_type == "default" else scaling


class RotaryEmbedding(nn.Module):
    """Rotates the first rotary_dim dims of every query and key head by position * inv_freq,
    in place: rotate-half pairs (i, i + R/2) when is_neox (Llama, HF), GPT-J pairs (2i, 2i + 1)
    otherwise."""

    def __init__(self, head_size: int, rotary_dim: int, max_position: int, base: float,
                 scaling: dict | None, is_neox: bool = True, num_positions: int | None = None):
        """max_position: the model's max_position_embeddings; num_positions: the table's rows
        (default max_position), the most positions the engine will rotate."""
        super().__init__()
        self.head_size, self.rotary_dim, self.is_neox = head_size, rotary_dim, is_neox
        cache = build_cos_sin_cache(head_size, rotary_dim, max_position, base, scaling,
                                    num_positions)
        self.register_buffer("cos_sin_cache", cache, persistent=False)  # [P, R] float32

    def forward(self, positions: torch.Tensor, q: torch.Tensor,
                k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions: [T] int64; q: [T, Hq * D]; k: [T, Hkv * D] (both rotated in place)."""
        ops.rotary_embedding(positions, q, k, self.head_size, self.cos_sin_cache, self.is_neox)
        return q, k


class RotaryEmbeddings:
    """The rotary embeddings of one model: one RotaryEmbedding (one table) per distinct set of
    parameters, shared by every layer that asks for it, each table num_positions rows long."""

    def __init__(self, num_positions: int):
        self.num_positions = num_positions
        self._made: dict[tuple, RotaryEmbedding] = {}

    def get(self, head_size: int, rotary_dim: int, max_position: int, base: float,
            scaling: dict | None, is_neox: bool = True) -> RotaryEmbedding:
        """The model's RotaryEmbedding with these parameters (see RotaryEmbedding)."""
        key = (head_size, rotary_dim, max_position, base, repr(sorted((scaling or {}).items())),
               is_neox)
        if key not in self._made:
            self._made[key] = RotaryEmbedding(head_size, rotary_dim, max_position, base, scaling,
                                              is_neox, self.num_positions)
        return self._made[key]
