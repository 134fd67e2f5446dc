"""GGUF block formats, and their lossless repacking into fastgen's kernel layout.

llama.cpp stores a quantized weight [N, K] as N rows of K / B blocks (B = 32, or 256 for the
K-quants), each block its scales then its codes, bit-packed in the order its own SIMD code likes.
fastgen's kernels read a different layout (csrc/core/quant_format.h): tiles of 16 rows in which
every 64-byte vector is 4 bytes of each of the 16 rows, so one VPDPBUSD multiplies 16 rows at
once. `pack` turns the first into the second, keeping every code and every fp16 scale exactly
(no value is recomputed, so nothing is rounded); `decode` is the step in between, the blocks
unpacked into integer codes and per-group scale parameters, checked against
gguf.quants.dequantize in the tests.

Shape letters: N rows, K input features, nb blocks per row, T tiles of 16 rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

TILE_ROWS = 16
VECTOR_BYTES = 64


@dataclass(frozen=True)
class BlockFormat:
    """One GGUF quantization type: its file layout and fastgen's chunk layout."""

    name: str
    qtype: int          # GGML's type id, as the file stores it
    block_elems: int    # elements per file block (= fastgen's super-block)
    block_bytes: int    # bytes per file block
    group_elems: int    # elements sharing a scale
    code_bits: int      # 4, 5, 6 or 8
    scale_bytes: int    # bytes of scales per fastgen chunk (16 rows)

    @property
    def elems_per_vector(self) -> int:
        return 4 if self.code_bits == 8 else 8

    @property
    def vectors(self) -> int:
        return self.block_elems // self.elems_per_vector

    @property
    def mask_planes(self) -> int:
        return {5: 1, 6: 2}.get(self.code_bits, 0)

    @property
    def chunk_bytes(self) -> int:
        return self.vectors * (VECTOR_BYTES + self.mask_planes * 16) + self.scale_bytes

    def packed_shape(self, rows: int, k: int) -> tuple[int, int, int]:
        return (-(-rows // TILE_ROWS), k // self.block_elems, self.chunk_bytes)

    def bits_per_weight(self) -> float:
        return 8 * self.block_bytes / self.block_elems


FORMATS: dict[int, BlockFormat] = {f.qtype: f for f in (
    BlockFormat("Q4_0", 2, 32, 18, 32, 4, 32),
    BlockFormat("Q4_1", 3, 32, 20, 32, 4, 64),
    BlockFormat("Q8_0", 8, 32, 34, 32, 8, 32),
    BlockFormat("Q4_K", 12, 256, 144, 32, 4, 320),
    BlockFormat("Q5_K", 13, 256, 176, 32, 5, 320),
    BlockFormat("Q6_K", 14, 256, 210, 16, 6, 288),
)}
BY_NAME: dict[str, BlockFormat] = {f.name: f for f in FORMATS.values()}
# Types a GGUF file may hold that are plain float arrays.
DENSE_TYPES = {0: torch.float32, 1: torch.float16, 30: torch.bfloat16}


@dataclass
class Decoded:
    """A quantized weight's blocks unpacked (K-quants' super-blocks keep their two levels):
    weight[n, e] = s * code + o for the group of e, where per block b

        Q4_0: s = d, o = -8 d      Q4_1: s = d, o = m      Q8_0: codes q + 128, s = d, o = -128 d
        Q4_K / Q5_K: s = d * sc[g], o = -dmin * mins[g]   Q6_K: s = d * sc[g], o = -32 s

    codes: uint8 [N, nb, block_elems]; d, m, dmin: fp16 [N, nb]; sc, mins: uint8 / int8
    [N, nb, groups]."""

    fmt: BlockFormat
    codes: torch.Tensor
    d: torch.Tensor
    m: torch.Tensor | None = None
    dmin: torch.Tensor | None = None
    sc: torch.Tensor | None = None
    mins: torch.Tensor | None = None

    def dequantize(self) -> torch.Tensor:
        """float32 [N, K], computed as gguf.quants.dequantize computes it."""
        name, d = self.fmt.name, self.d.float().unsqueeze(-1)
        codes = self.codes.to(torch.int32)
        n, nb, _ = codes.shape
        if name == "Q4_0":
            w = d * (codes - 8).float()
        elif name == "Q4_1":
            w = d * codes.float() + self.m.float().unsqueeze(-1)
        elif name == "Q8_0":
            w = d * (codes - 128).float()
        else:
            g = self.fmt.group_elems
            s = (d * self.sc.float()).unsqueeze(-1)                         # [N, nb, groups, 1]
            grouped = codes.view(n, nb, -1, g)
            if name == "Q6_K":
                w = s * (grouped - 32).float()
            else:
                w = s * grouped.float() - (self.dmin.float().unsqueeze(-1) * self.mins.float()).unsqueeze(-1)
        return w.reshape(n, -1)


def _halves(raw: torch.Tensor, start: int) -> torch.Tensor:
    """The fp16 at byte `start` of every block.   raw: [N, nb, bytes] -> [N, nb] float16"""
    return raw[..., start:start + 2].contiguous().view(torch.float16).squeeze(-1)


def _nibbles(qs: torch.Tensor, chunk: int) -> torch.Tensor:
    """Codes of llama.cpp's nibble layout: each run of `chunk` bytes holds elements i (low
    nibbles) and i + chunk (high nibbles).   qs: [N, nb, bytes] -> [N, nb, 2 * bytes]"""
    n, nb, nbytes = qs.shape
    runs = qs.view(n, nb, nbytes // chunk, 1, chunk)
    return torch.cat([runs & 15, runs >> 4], dim=3).reshape(n, nb, 2 * nbytes)


def _k_scales(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K / Q5_K's 12 bytes of 6-bit scales and mins -> (sc, mins) uint8 [N, nb, 8]."""
    lo, mid, hi = scales[..., 0:4], scales[..., 4:8], scales[..., 8:12]
    sc = torch.cat([lo & 63, (hi & 15) | ((lo >> 2) & 48)], dim=-1)
    mins = torch.cat([mid & 63, (hi >> 4) | ((mid >> 2) & 48)], dim=-1)
    return sc, mins


def decode(qtype: int, raw: torch.Tensor, k: int) -> Decoded:
    """A GGUF tensor's blocks unpacked.   raw: uint8 [N, K / block_elems * block_bytes]"""
    fmt = FORMATS[qtype]
    if k % fmt.block_elems or raw.shape[-1] != k // fmt.block_elems * fmt.block_bytes:
        raise ValueError(f"{fmt.name} rows of {k} elements are {k // fmt.block_elems} blocks of "
                         f"{fmt.block_bytes} bytes; got rows of {raw.shape[-1]} bytes")
    blocks = raw.reshape(raw.shape[0], k // fmt.block_elems, fmt.block_bytes)
    if fmt.name == "Q4_0":
        return Decoded(fmt, _nibbles(blocks[..., 2:], 16), _halves(blocks, 0))
    if fmt.name == "Q4_1":
        return Decoded(fmt, _nibbles(blocks[..., 4:], 16), _halves(blocks, 0), m=_halves(blocks, 2))
    if fmt.name == "Q8_0":
        return Decoded(fmt, blocks[..., 2:] ^ 0x80, _halves(blocks, 0))
    if fmt.name in ("Q4_K", "Q5_K"):
        sc, mins = _k_scales(blocks[..., 4:16])
        if fmt.name == "Q4_K":
            codes = _nibbles(blocks[..., 16:], 32)
        else:  # bit i of qh byte j is the high bit of element 32 i + j
            n, nb, _ = blocks.shape
            qh = blocks[..., 16:48]
            high = torch.stack([(qh >> i) & 1 for i in range(8)], dim=2).reshape(n, nb, 256)
            codes = _nibbles(blocks[..., 48:], 32) | (high << 4)
        return Decoded(fmt, codes, _halves(blocks, 0), dmin=_halves(blocks, 2), sc=sc, mins=mins)
    # Q6_K: ql [128] (two halves of 64 bytes: elements j, j + 64 of each 128), qh [64] (two halves
    # of 32 bytes: bits 2s, 2s + 1 of byte j are the top bits of element 32 s + j of the half),
    # scales int8 [16], d fp16
    n, nb, _ = blocks.shape
    low = _nibbles(blocks[..., :128].reshape(n, nb * 2, 64), 64).reshape(n, nb, 256)
    qh = blocks[..., 128:192].reshape(n, nb, 2, 1, 32)
    high = torch.cat([(qh >> (2 * s)) & 3 for s in range(4)], dim=3).reshape(n, nb, 256)
    return Decoded(fmt, low | (high << 4), _halves(blocks, 208),
                   sc=blocks[..., 192:208].contiguous().view(torch.int8))


def _tiles(x: torch.Tensor) -> torch.Tensor:
    """Rows padded with zeros to a multiple of 16 and grouped.   [N, ...] -> [T, 16, ...]"""
    pad = -x.shape[0] % TILE_ROWS
    if pad:
        x = torch.cat([x, x.new_zeros(pad, *x.shape[1:])])
    return x.view(-1, TILE_ROWS, *x.shape[1:])


def _bits_to_bytes(bits: torch.Tensor) -> torch.Tensor:
    """Little-endian bit packing of the last dim (a multiple of 8).   [..., 8 M] -> [..., M]"""
    weights = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)
    grouped = bits.reshape(*bits.shape[:-1], -1, 8) * weights
    return grouped.sum(dim=-1, dtype=torch.uint8)


def _per_row_bytes(values: torch.Tensor) -> torch.Tensor:
    """Per-(row, block[, group]) values as the chunk's [groups][16 rows] bytes.
    values: [N, nb] or [N, nb, G] of 1- or 2-byte dtype -> uint8 [T, nb, bytes]"""
    tiles = _tiles(values)                        # [T, 16, nb(, G)]
    if tiles.dim() == 3:
        tiles = tiles.unsqueeze(-1)
    t, _, nb, g = tiles.shape
    ordered = tiles.permute(0, 2, 3, 1).contiguous()  # [T, nb, G, 16]
    return ordered.view(torch.uint8).reshape(t, nb, -1)


def pack_decoded(dec: Decoded) -> torch.Tensor:
    """The kernel layout of decoded blocks.   -> uint8 [T, nb, chunk_bytes]"""
    fmt = dec.fmt
    codes = _tiles(dec.codes)                     # [T, 16, nb, B]
    t, _, nb, block = codes.shape
    epv = fmt.elems_per_vector
    per_vector = codes.view(t, TILE_ROWS, nb, block // epv, epv)
    if fmt.code_bits == 8:
        vectors = per_vector
    else:
        low = per_vector & 15
        vectors = low[..., :4] | (low[..., 4:] << 4)   # [T, 16, nb, V, 4]
    parts = [vectors.permute(0, 2, 3, 1, 4).reshape(t, nb, -1)]  # [T, nb, V * 64]
    if fmt.mask_planes:
        lanes = per_vector.permute(0, 2, 3, 1, 4)      # [T, nb, V, 16, 8]
        planes = []
        for half in (slice(0, 4), slice(4, 8)):  # Q6_K: bit 4 low, bit 5 low, bit 4 high, ...
            for bit in range(4, 4 + fmt.mask_planes):
                bits = (lanes[..., half] >> bit) & 1   # [T, nb, V, 16, 4]: byte lane 4 r + j
                planes.append(_bits_to_bytes(bits.reshape(t, nb, -1, 64)))  # [T, nb, V, 8]
        parts.append(torch.stack(planes, dim=3).reshape(t, nb, -1))
    if fmt.name in ("Q4_0", "Q8_0"):
        parts.append(_per_row_bytes(dec.d))
    elif fmt.name == "Q4_1":
        parts += [_per_row_bytes(dec.d), _per_row_bytes(dec.m)]
    elif fmt.name in ("Q4_K", "Q5_K"):
        parts += [_per_row_bytes(dec.sc), _per_row_bytes(dec.mins), _per_row_bytes(dec.d),
                  _per_row_bytes(dec.dmin)]
    else:
        parts += [_per_row_bytes(dec.sc), _per_row_bytes(dec.d)]
    packed = torch.cat(parts, dim=-1).contiguous()
    assert packed.shape[-1] == fmt.chunk_bytes, (fmt.name, packed.shape)
    return packed


def pack(qtype: int, raw: torch.Tensor, k: int) -> torch.Tensor:
    """A GGUF tensor's rows in the kernel layout.   raw: uint8 [N, row_bytes] -> [T, nb, chunk]"""
    return pack_decoded(decode(qtype, raw, k))


def quantize_int8_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, Decoded]:
    """Weight-only int8 with one scale per output row: q = round(w / s), s = max|w| / 127 rounded
    up to fp16 (so |q| <= 127), stored as Q8_0 blocks that all carry the row's scale.
    weight: [N, K] -> (fp16 scales [N], Decoded Q8_0)"""
    n, k = weight.shape
    if k % 32:
        raise ValueError(f"int8 weights need the input size to be a multiple of 32, got {k}")
    w = weight.float()
    amax = w.abs().amax(dim=1)
    scale = (amax / 127).to(torch.float16)
    up = torch.from_numpy(np.nextafter(scale.numpy(), np.float16(np.inf)))
    scale = torch.where(scale.float() * 127 < amax, up, scale)
    inv = torch.where(scale > 0, 1 / scale.float(), torch.zeros(()))
    q = torch.round(w * inv.unsqueeze(1)).clamp(-127, 127).to(torch.int16)
    codes = (q + 128).to(torch.uint8).view(n, k // 32, 32)
    d = scale.unsqueeze(1).expand(n, k // 32).contiguous()
    return scale, Decoded(FORMATS[8], codes, d)
