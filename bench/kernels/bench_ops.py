"""The memory-bound decode-path ops beside their torch equivalents, timed in the same run, each as
achieved bandwidth and as a fraction of a copy bandwidth measured in the same run.

    python bench/kernels/bench_ops.py --device cuda --json ops.json --plot decode_attention.png
    python bench/kernels/bench_ops.py --quick          # small sizes, for a CPU check

Baselines: rms_norm vs F.rms_norm and the eager float32 composite (as HF's LlamaRMSNorm);
fused_add_rms_norm vs add + F.rms_norm; silu_and_mul vs F.silu(gate) * up; the fused rotary +
cache write vs fastgen's two unfused ops and vs the eager HF-style composite (rotate_half, then an
index_copy into the cache); the same with Qwen3's per-head q/k norm fused in, vs two rms_norm calls
before the fused rotary op; paged decode attention vs torch's scaled_dot_product_attention on the
same keys and values in a contiguous [B, Hkv, L, D] cache (GQA through enable_gqa). Bytes counted
are those each op must move at least once (the paged cache's keys and values for attention).
Every fastgen result is checked against its baseline before it is timed.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from fastgen import ops

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the checkout, for bench.* imports
from bench.common import Timer, check, copy_bandwidth, pyplot, save_figure, save_json

HIDDEN, INTER, HEADS, KV_HEADS, HEAD_DIM = 4096, 14336, 32, 8, 128  # Llama-3.1-8B
BLOCK_SIZE = 16


def rms_norm_eager(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """Hugging Face's LlamaRMSNorm.forward."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return w * h.to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rotary_and_cache_eager(positions, q, k, v, cos_sin, key_cache, value_cache, slots):
    """HF's apply_rotary_pos_emb on [T, heads, D] views, then the cache write by index_copy_."""
    cos, sin = cos_sin[positions].to(q.dtype).chunk(2, dim=-1)
    cos, sin = torch.cat((cos, cos), -1)[:, None], torch.cat((sin, sin), -1)[:, None]
    tokens = q.shape[0]
    qh, kh = q.view(tokens, HEADS, HEAD_DIM), k.view(tokens, KV_HEADS, HEAD_DIM)
    qh.copy_(qh * cos + rotate_half(qh) * sin)
    k_rot = kh * cos + rotate_half(kh) * sin
    key_cache.view(-1, KV_HEADS, HEAD_DIM).index_copy_(0, slots, k_rot)
    value_cache.view(-1, KV_HEADS, HEAD_DIM).index_copy_(0, slots, v.view(tokens, KV_HEADS, HEAD_DIM))


class Bench:
    def __init__(self, device: str, dtype: torch.dtype, copy_bytes: int):
        self.device, self.dtype = device, dtype
        self.time_us = Timer(device).loop_us
        self.copy_gb_s = copy_bandwidth(device, copy_bytes,
                                        time_s=lambda fn: self.time_us(fn) / 1e6)
        self.rows: list[dict] = []
        print(f"device {device}, {dtype}; copy bandwidth (read + write) {self.copy_gb_s:.1f} GB/s")
        print(f"{'op':<22} {'shape':<26} {'fastgen':>10} {'GB/s':>8} {'of copy':>8}   baselines (us, fastgen speedup)")

    def randn(self, *shape) -> torch.Tensor:
        return torch.randn(*shape, device=self.device).to(self.dtype)

    def row(self, op: str, shape: str, nbytes: float, fastgen, baselines: dict) -> None:
        us = self.time_us(fastgen)
        gb_s = nbytes / us / 1e3
        base = {name: self.time_us(fn) for name, fn in baselines.items()}
        self.rows.append(dict(op=op, shape=shape, us=us, gb_s=gb_s, of_copy=gb_s / self.copy_gb_s,
                              baselines_us=base))
        extra = "  ".join(f"{name} {t:.1f} ({t / us:.2f}x)" for name, t in base.items())
        print(f"{op:<22} {shape:<26} {us:8.1f}us {gb_s:8.1f} {100 * gb_s / self.copy_gb_s:7.0f}%   {extra}")


def bench_norms(b: Bench, tokens: int) -> None:
    e, eps = b.randn(1).element_size(), 1e-5
    x, res, w = b.randn(tokens, HIDDEN), b.randn(tokens, HIDDEN), b.randn(HIDDEN)
    shape = f"{tokens} x {HIDDEN}"
    check("rms_norm", ops.rms_norm(x, w, eps), rms_norm_eager(x, w, eps))
    b.row("rms_norm", shape, 2 * x.numel() * e, lambda: ops.rms_norm(x, w, eps),
          {"F.rms_norm": lambda: F.rms_norm(x, (HIDDEN,), w, eps),
           "eager": lambda: rms_norm_eager(x, w, eps)})

    def add_norm_torch():
        r = x + res
        return F.rms_norm(r, (HIDDEN,), w, eps), r

    want, _ = add_norm_torch()
    xc, rc = x.clone(), res.clone()
    ops.fused_add_rms_norm(xc, rc, w, eps)
    check("fused_add_rms_norm", xc, want)
    b.row("fused_add_rms_norm", shape, 4 * x.numel() * e,
          lambda: ops.fused_add_rms_norm(xc, rc, w, eps), {"add+F.rms_norm": add_norm_torch})


def bench_silu(b: Bench, tokens: int) -> None:
    x = b.randn(tokens, 2 * INTER)
    e = x.element_size()

    def torch_silu():
        return F.silu(x[:, :INTER]) * x[:, INTER:]

    check("silu_and_mul", ops.silu_and_mul(x), torch_silu())
    b.row("silu_and_mul", f"{tokens} x {INTER}", 3 * tokens * INTER * e,
          lambda: ops.silu_and_mul(x), {"silu*up": torch_silu})


def bench_rotary_and_cache(b: Bench, tokens: int) -> None:
    from fastgen.layers.rotary import build_cos_sin_cache

    q_w, kv_w = HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM
    qkv = b.randn(tokens, q_w + 2 * kv_w)
    q, k, v = qkv.split([q_w, kv_w, kv_w], dim=-1)
    cos_sin = build_cos_sin_cache(HEAD_DIM, HEAD_DIM, 8192, 500000.0, None).to(b.device)
    positions = torch.randint(0, 8192, (tokens,), device=b.device)
    num_slots = max(tokens, 4096)
    slots = torch.randperm(num_slots, device=b.device)[:tokens]
    caches = [b.randn(num_slots // BLOCK_SIZE, BLOCK_SIZE, KV_HEADS, HEAD_DIM) for _ in range(2)]
    eager_caches = [c.clone() for c in caches]
    q_eager = q.clone()
    rotary_and_cache_eager(positions, q_eager, k, v, cos_sin, *eager_caches, slots)
    q_ours = q.clone()
    ops.rotary_embedding_and_cache(positions, q_ours, k, v, HEAD_DIM, cos_sin, True, *caches, slots)
    check("rotary_embedding_and_cache", q_ours, q_eager)
    check("rotary_embedding_and_cache (cache)", caches[0], eager_caches[0])

    def unfused():  # rotates k in place, harmless here: only the time is kept
        ops.rotary_embedding(positions, q, k, HEAD_DIM, cos_sin, True)
        ops.reshape_and_cache(k.view(tokens, KV_HEADS, HEAD_DIM),
                              v.view(tokens, KV_HEADS, HEAD_DIM), *caches, slots)

    nbytes = (2 * q_w + 4 * kv_w) * tokens * qkv.element_size()
    b.row("rotary_and_cache", f"{tokens} tokens", nbytes,
          lambda: ops.rotary_embedding_and_cache(positions, q, k, v, HEAD_DIM, cos_sin, True,
                                                 *caches, slots),
          {"unfused fastgen": unfused,
           "eager": lambda: rotary_and_cache_eager(positions, q, k, v, cos_sin, *caches, slots)})


def bench_qk_norm_rotary_and_cache(b: Bench, tokens: int) -> None:
    """Qwen3's attention input (Qwen3-8B has Llama-3.1-8B's heads): per-head q/k RMSNorm, rotary
    and the cache write in one call, against the two rms_norm calls plus the fused rotary op it
    replaces, and against the eager HF-style composite."""
    from fastgen.layers.rotary import build_cos_sin_cache

    q_w, kv_w, eps = HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM, 1e-6
    qkv = b.randn(tokens, q_w + 2 * kv_w)
    q, k, v = qkv.split([q_w, kv_w, kv_w], dim=-1)
    q_weight, k_weight = b.randn(HEAD_DIM), b.randn(HEAD_DIM)
    cos_sin = build_cos_sin_cache(HEAD_DIM, HEAD_DIM, 8192, 1000000.0, None).to(b.device)
    positions = torch.randint(0, 8192, (tokens,), device=b.device)
    num_slots = max(tokens, 4096)
    slots = torch.randperm(num_slots, device=b.device)[:tokens]
    caches = [b.randn(num_slots // BLOCK_SIZE, BLOCK_SIZE, KV_HEADS, HEAD_DIM) for _ in range(2)]

    def normed(x, w):
        return ops.rms_norm(x.reshape(-1, HEAD_DIM), w, eps).view(tokens, -1)

    def unfused():
        ops.rotary_embedding_and_cache(positions, normed(q, q_weight), normed(k, k_weight), v,
                                       HEAD_DIM, cos_sin, True, *caches, slots)

    def eager():
        qn = rms_norm_eager(q.reshape(-1, HEAD_DIM), q_weight, eps).view(tokens, -1)
        kn = rms_norm_eager(k.reshape(-1, HEAD_DIM), k_weight, eps).view(tokens, -1)
        rotary_and_cache_eager(positions, qn, kn, v, cos_sin, *caches, slots)

    q_ours, eager_caches = q.clone(), [c.clone() for c in caches]
    ops.rotary_embedding_and_cache(positions, q_ours, k, v, HEAD_DIM, cos_sin, True, *caches,
                                   slots, q_weight, k_weight, eps)
    q_eager = normed(q, q_weight)
    ops.rotary_embedding_and_cache(positions, q_eager, normed(k, k_weight), v, HEAD_DIM, cos_sin,
                                   True, *eager_caches, slots)
    check("qk norm + rotary_embedding_and_cache", q_ours, q_eager)
    check("qk norm + rotary_embedding_and_cache (cache)", caches[0], eager_caches[0])
    nbytes = (2 * q_w + 4 * kv_w) * tokens * qkv.element_size()
    # The fused op normalises q in place: q drifts between calls, harmless for the timing.
    b.row("qk_norm+rotary_and_cache", f"{tokens} tokens", nbytes,
          lambda: ops.rotary_embedding_and_cache(positions, q, k, v, HEAD_DIM, cos_sin, True,
                                                 *caches, slots, q_weight, k_weight, eps),
          {"2 rms_norm + fused rotary": unfused, "eager": eager})


def bench_decode_attention(b: Bench, batch: int, context: int) -> dict:
    """One decode query per sequence over `context` cached tokens in shuffled pages."""
    blocks_per_seq = math.ceil(context / BLOCK_SIZE)
    num_blocks = batch * blocks_per_seq
    key_cache = b.randn(num_blocks, BLOCK_SIZE, KV_HEADS, HEAD_DIM)
    value_cache = b.randn(num_blocks, BLOCK_SIZE, KV_HEADS, HEAD_DIM)
    tables = torch.randperm(num_blocks, device=b.device).view(batch, blocks_per_seq).int()
    query = b.randn(batch, HEADS, HEAD_DIM)
    cu = torch.arange(batch + 1, device=b.device, dtype=torch.int32)
    lens = torch.full((batch,), context, device=b.device, dtype=torch.int32)
    scale = HEAD_DIM ** -0.5
    # The same keys and values, contiguous per sequence: [B, Hkv, L, D].
    k = key_cache[tables.long()].flatten(1, 2)[:, :context].transpose(1, 2).contiguous()
    v = value_cache[tables.long()].flatten(1, 2)[:, :context].transpose(1, 2).contiguous()
    q = query[:, :, None]  # [B, Hq, 1, D]

    def sdpa():
        return F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=True)

    def ours():
        return ops.attention(query, key_cache, value_cache, cu, lens, tables, 1, context, scale)

    check("attention", ours(), sdpa()[:, :, 0])
    nbytes = 2 * batch * context * KV_HEADS * HEAD_DIM * query.element_size()
    b.row("decode attention", f"{batch} x {context} tokens", nbytes, ours, {"sdpa": sdpa})
    return b.rows[-1]


def plot(sweeps: dict, copy_gb_s: float, path: str) -> None:
    plt = pyplot()
    if plt is None:
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, (title, (xlabel, rows)) in zip(axes, sweeps.items()):
        xs = [r["x"] for r in rows]
        ax.plot(xs, [r["gb_s"] for r in rows], "o-", label="fastgen paged decode")
        ax.plot(xs, [r["gb_s"] * r["us"] / r["baselines_us"]["sdpa"] for r in rows], "s--",
                label="torch SDPA (contiguous)")
        ax.axhline(copy_gb_s, color="gray", linestyle=":", label="copy bandwidth")
        ax.set_xscale("log", base=2)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("KV bytes read / time (GB/s)")
        ax.set_title(title)
        ax.legend()
    save_figure(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="small sizes (a CPU check)")
    parser.add_argument("--json", help="write the rows here")
    parser.add_argument("--plot", help="PNG of the decode attention sweeps")
    args = parser.parse_args()
    torch.manual_seed(0)
    quick = args.quick
    b = Bench(args.device, torch.bfloat16, copy_bytes=(64 if quick else 1024) << 20)
    with torch.inference_mode():
        for tokens in ([64] if quick else [16, 4096, 32768]):
            bench_norms(b, tokens)
            bench_silu(b, tokens)
            bench_rotary_and_cache(b, tokens)
        for tokens in ([1, 64] if quick else [1, 16, 4096]):
            bench_qk_norm_rotary_and_cache(b, tokens)
        contexts = [512, 2048] if quick else [1024, 2048, 4096, 8192, 16384, 32768]
        batches = [1, 4] if quick else [1, 8, 32, 64, 128]
        long_ctx = contexts[-1]
        by_context = [dict(bench_decode_attention(b, 1, c), x=c) for c in contexts]
        batch_ctx = 512 if quick else 2048
        by_batch = [dict(bench_decode_attention(b, n, batch_ctx), x=n) for n in batches]
    if args.json:
        save_json(args.json, {"device": args.device, "copy_gb_s": b.copy_gb_s, "rows": b.rows},
                  indent=1)
    if args.plot:
        plot({f"batch 1, context up to {long_ctx}": ("context (tokens)", by_context),
              f"context {batch_ctx}": ("batch size", by_batch)}, b.copy_gb_s, args.plot)


if __name__ == "__main__":
    main()
