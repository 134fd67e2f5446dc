"""Attention: fastgen's paged kernel beside torch's scaled_dot_product_attention (flash
backend) on the same queries, keys and values, timed in the same run, as TFLOP/s and as a
fraction of a bf16 matmul rate measured in the same run.

    python bench/kernels/bench_attention.py --json attn.json --plot attn.png   # on a GPU
    python bench/kernels/bench_attention.py --quick                            # a CPU check
    python bench/kernels/bench_attention.py --decode --json decode.json        # decode steps

Each point is causal attention over B sequences of L tokens with B * L = 16k tokens (the
FlashAttention papers' setup), Llama-3-8B's 32 query / 8 KV heads, head sizes 64 and 128, bf16.
fastgen reads keys and values from a paged cache (16-token pages in shuffled order) and takes
the packed variable-length query layout the engine feeds it; SDPA gets contiguous [B, H, L, D]
tensors (the kernel then has the easier memory layout). FLOPs count the causal pairs exactly:
4 * D * Hq * B * L(L + 1) / 2, the same for both.

--decode: one query per sequence instead (a decode step), B sequences of L cached tokens, for
SmolLM2's heads (9 query / 3 KV, size 64) and Llama-3-8B's (32 / 8, size 128): a decode step
reads every cached row once, so the rate is the KV cache's GB/s over a copy's read + write rate
measured in the same run; SDPA gets the rows gathered into contiguous tensors beforehand.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from fastgen import ops

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the checkout, for bench.* imports
from bench.common import Timer, check, copy_bandwidth, matmul_tflop_s, pyplot, save_figure, save_json

HEADS, KV_HEADS, BLOCK_SIZE = 32, 8, 16


def sdpa_flash(q, k, v, scale):
    """SDPA restricted to its flash backend where there is one (CUDA); GQA through enable_gqa."""
    if q.is_cuda:
        from torch.nn.attention import SDPBackend, sdpa_kernel
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)


def paged_cache(device: str, batch: int, length: int, kv_heads: int, head_dim: int):
    """B sequences of L random bf16 keys and values in a paged cache (16-token pages in shuffled
    order) -> (key_cache, value_cache [N, S, Hkv, D], block tables [B, M], seq_lens_k [B], and
    the same keys and values contiguous, k and v [B, Hkv, L, D])."""
    blocks_per_seq = -(-length // BLOCK_SIZE)
    num_blocks = batch * blocks_per_seq
    key_cache = torch.randn(num_blocks, BLOCK_SIZE, kv_heads, head_dim, device=device,
                            dtype=torch.bfloat16)
    value_cache = torch.randn_like(key_cache)
    tables = torch.randperm(num_blocks, device=device).view(batch, blocks_per_seq).int()
    lens = torch.full((batch,), length, device=device, dtype=torch.int32)
    k = key_cache[tables.long()].flatten(1, 2)[:, :length].transpose(1, 2).contiguous()
    v = value_cache[tables.long()].flatten(1, 2)[:, :length].transpose(1, 2).contiguous()
    return key_cache, value_cache, tables, lens, k, v


def bench_point(device: str, time_us, length: int, head_dim: int, total_tokens: int) -> dict:
    batch = max(1, total_tokens // length)
    query = torch.randn(batch * length, HEADS, head_dim, device=device, dtype=torch.bfloat16)
    key_cache, value_cache, tables, lens, k, v = paged_cache(device, batch, length, KV_HEADS,
                                                             head_dim)
    cu = torch.arange(0, (batch + 1) * length, length, device=device, dtype=torch.int32)
    scale = head_dim ** -0.5
    q = query.view(batch, length, HEADS, head_dim).transpose(1, 2).contiguous()  # [B, Hq, L, D]
    out = torch.empty_like(query)

    def ours():
        return ops.attention(query, key_cache, value_cache, cu, lens, tables, length, length,
                             scale, out=out)

    def theirs():
        return sdpa_flash(q, k, v, scale)

    check(f"attention L={length} D={head_dim}", ours(),
          theirs().transpose(1, 2).reshape(batch * length, HEADS, head_dim))
    flops = 4 * head_dim * HEADS * batch * length * (length + 1) / 2
    us, sdpa_us = time_us(ours), time_us(theirs)
    return dict(length=length, batch=batch, head_dim=head_dim, us=us, sdpa_us=sdpa_us,
                tflops=flops / us / 1e6, sdpa_tflops=flops / sdpa_us / 1e6)


DECODE_HEADS = {"SmolLM2": (9, 3, 64), "Llama-3-8B": (32, 8, 128)}
DECODE_POINTS = [(1, 4096), (1, 32768), (16, 2048), (64, 512), (256, 180), (256, 1024)]


def bench_decode_point(device: str, time_us, model: str, batch: int, length: int) -> dict:
    heads, kv_heads, head_dim = DECODE_HEADS[model]
    query = torch.randn(batch, heads, head_dim, device=device, dtype=torch.bfloat16)
    key_cache, value_cache, tables, lens, k, v = paged_cache(device, batch, length, kv_heads,
                                                             head_dim)
    cu = torch.arange(batch + 1, device=device, dtype=torch.int32)
    scale = head_dim ** -0.5
    q = query.unsqueeze(2)  # [B, Hq, 1, D]
    out = torch.empty_like(query)

    def ours():
        return ops.attention(query, key_cache, value_cache, cu, lens, tables, 1, length, scale,
                             out=out)

    def theirs():  # one query: no mask
        return F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=True)

    check(f"decode attention {model} B={batch} L={length}", ours(), theirs().squeeze(2))
    kv_bytes = 2 * batch * length * kv_heads * head_dim * key_cache.element_size()
    us, sdpa_us = time_us(ours), time_us(theirs)
    return dict(model=model, batch=batch, length=length, us=us, sdpa_us=sdpa_us,
                gb_s=kv_bytes / us / 1e3, sdpa_gb_s=kv_bytes / sdpa_us / 1e3)


def decode_main(args, time_us) -> None:
    copy = copy_bandwidth(args.device)
    print(f"device {args.device}; copy {copy:.1f} GB/s read + written (same run)")
    print(f"{'model':>10} {'B':>4} {'L':>6} {'fastgen us':>11} {'GB/s':>6} {'of copy':>8} "
          f"{'SDPA us':>9} {'GB/s':>6} {'speedup':>8}")
    points = DECODE_POINTS[:1] + DECODE_POINTS[4:5] if args.quick else DECODE_POINTS
    rows = []
    with torch.inference_mode():
        for model in DECODE_HEADS:
            for batch, length in points:
                r = bench_decode_point(args.device, time_us, model, batch, length)
                rows.append(r)
                print(f"{model:>10} {batch:4d} {length:6d} {r['us']:11.1f} {r['gb_s']:6.1f} "
                      f"{100 * r['gb_s'] / copy:7.0f}% {r['sdpa_us']:9.1f} {r['sdpa_gb_s']:6.1f} "
                      f"{r['sdpa_us'] / r['us']:7.2f}x")
    if args.json:
        save_json(args.json, {"device": args.device, "copy_gb_s": copy, "decode_rows": rows},
                  indent=1)


def plot(rows: list[dict], matmul: float, path: str) -> None:
    plt = pyplot()
    if plt is None:
        return
    dims = sorted({r["head_dim"] for r in rows})
    fig, axes = plt.subplots(1, len(dims), figsize=(5.5 * len(dims), 4), squeeze=False)
    for ax, d in zip(axes[0], dims):
        pts = [r for r in rows if r["head_dim"] == d]
        xs = [r["length"] for r in pts]
        ax.plot(xs, [r["tflops"] for r in pts], "o-", label="fastgen (paged)")
        ax.plot(xs, [r["sdpa_tflops"] for r in pts], "s--", label="torch SDPA flash (contiguous)")
        ax.axhline(matmul, color="gray", linestyle=":", label="bf16 matmul")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sequence length (B x L = 16k tokens)")
        ax.set_ylabel("TFLOP/s")
        ax.set_title(f"causal prefill attention, head size {d}")
        ax.legend()
    save_figure(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="small sizes (a CPU check)")
    parser.add_argument("--json", help="write the rows here")
    parser.add_argument("--plot", help="PNG of TFLOP/s against sequence length")
    parser.add_argument("--decode", action="store_true",
                        help="decode attention (one query per sequence) as GB/s of the KV cache")
    args = parser.parse_args()
    torch.manual_seed(0)
    time_us = Timer(args.device).loop_us
    if args.decode:
        return decode_main(args, time_us)
    lengths = [256, 512] if args.quick else [512, 1024, 2048, 4096, 8192, 16384]
    total = 1024 if args.quick else 16384
    # The compute roof: one loop-timed bf16 matmul (the kernels' timing, not the end-to-end one).
    matmul = matmul_tflop_s(args.device, torch.bfloat16, 1024 if args.quick else 8192, trials=1,
                            time_s=lambda fn: time_us(fn) / 1e6)
    print(f"device {args.device}; bf16 matmul {matmul:.1f} TFLOP/s (same run)")
    print(f"{'D':>4} {'L':>6} {'B':>3} {'fastgen us':>11} {'TFLOP/s':>8} {'of mm':>6} "
          f"{'SDPA us':>9} {'TFLOP/s':>8} {'speedup':>8}")
    rows = []
    with torch.inference_mode():
        for head_dim in (64, 128):
            for length in lengths:
                r = bench_point(args.device, time_us, length, head_dim, total)
                rows.append(r)
                print(f"{head_dim:4d} {length:6d} {r['batch']:3d} {r['us']:11.1f} {r['tflops']:8.1f} "
                      f"{100 * r['tflops'] / matmul:5.0f}% {r['sdpa_us']:9.1f} "
                      f"{r['sdpa_tflops']:8.1f} {r['sdpa_us'] / r['us']:7.2f}x")
    if args.json:
        save_json(args.json, {"device": args.device, "matmul_tflops": matmul, "rows": rows},
                  indent=1)
    if args.plot:
        plot(rows, matmul, args.plot)


if __name__ == "__main__":
    main()
