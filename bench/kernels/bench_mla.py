"""DeepSeek MLA attention, V2-Lite's head shapes (16 heads, kv_lora_rank 512, rope 64, nope 128,
v 128; bf16), three ways, timed in the same run:

- absorbed (fastgen's path): W_UK folded into the query, fastgen's mla_attention op over the
  latent cache rows [c_kv | k_pe] (576 values a token as the keys, their first 512 as the values,
  one KV head for all 16 query heads), W_UV after;
- expanded: per-head keys [W_UK c | k_pe] and values W_UV c rebuilt from the same latent cache
  with kv_b_proj for the whole context, then torch's scaled_dot_product_attention (qk 192 / v 128);
- standard attention on an expanded cache: SDPA over keys and values already stored per head (what
  an engine that expands the latent keeps in memory: 16 x (192 + 128) values a token, 8.9x more).

Decode (one query per sequence) at 1 x 4k, 1 x 32k and 16 x 2k cached tokens: time, the bytes each
must read (the cache it attends over, plus kv_b_proj's weights for the absorbed and expanded
ones), their GB/s and the fraction of a copy bandwidth measured in the same run. Prefill (one
sequence of L new tokens, causal) at L = 512 and 2048 (--quick: 256): time and TFLOP/s for the
absorbed and expanded forms, which decide which one prefill should use.

    python bench/kernels/bench_mla.py [--quick] [--json mla.json] [--device cuda]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from fastgen import ops

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the checkout, for bench.* imports
from bench.common import Timer, check, copy_bandwidth, run_metadata, save_json

HEADS, NOPE, ROPE, V_DIM, LATENT = 16, 128, 64, 128, 512  # DeepSeek-V2-Lite
BLOCK = 16
SCALE = 0.114721


class Case:
    """B sequences with `context` cached latent rows each (q_len of them new), in shuffled pages,
    and random W_UK / W_UV."""

    def __init__(self, device: str, batch: int, context: int, q_len: int, seed: int = 0):
        g = torch.Generator(device=device).manual_seed(seed)
        dt = torch.bfloat16
        self.batch, self.context, self.q_len = batch, context, q_len
        blocks = -(-context // BLOCK)
        self.cache = torch.randn(batch * blocks, BLOCK, LATENT + ROPE, generator=g, device=device,
                                 dtype=dt)
        self.tables = torch.randperm(batch * blocks, device=device).view(batch, blocks).int()
        self.q = torch.randn(batch * q_len, HEADS, NOPE + ROPE, generator=g, device=device,
                             dtype=dt)
        kv_b = torch.randn(HEADS * (NOPE + V_DIM), LATENT, generator=g, device=device,
                           dtype=dt) / LATENT ** 0.5
        self.kv_b = kv_b
        w = kv_b.view(HEADS, NOPE + V_DIM, LATENT)
        self.w_uk, self.w_uv_t = w[:, :NOPE].contiguous(), w[:, NOPE:].transpose(1, 2).contiguous()
        self.cu = torch.arange(0, batch * q_len + 1, q_len, device=device, dtype=torch.int32)
        self.lens = torch.full((batch,), context, device=device, dtype=torch.int32)
        # The same rows per sequence, contiguous [B, K, L + R], and expanded per head.
        self.rows = self.cache[self.tables.long()].flatten(1, 2)[:, :context]
        keys, values = self.expand()
        self.keys, self.values = keys.contiguous(), values.contiguous()

    def absorbed(self) -> torch.Tensor:
        """[T, H, V]"""
        q = self.q
        q_lat = torch.bmm(q[..., :NOPE].transpose(0, 1), self.w_uk)  # [H, T, L]
        query = torch.cat((q_lat.transpose(0, 1), q[..., NOPE:]), dim=-1)  # [T, H, L + R]
        out = ops.mla_attention(query, self.cache, LATENT, self.cu, self.lens, self.tables,
                                self.q_len, self.context, SCALE)  # [T, H, L]
        return torch.bmm(out.transpose(0, 1), self.w_uv_t).transpose(0, 1)

    def expand(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-head keys [B, H, K, P + R] and values [B, H, K, V] from the latent rows."""
        b, k = self.batch, self.context
        kv = F.linear(self.rows[..., :LATENT], self.kv_b).view(b, k, HEADS, NOPE + V_DIM)
        k_pe = self.rows[..., LATENT:][:, :, None].expand(b, k, HEADS, ROPE)
        keys = torch.cat((kv[..., :NOPE], k_pe), -1).transpose(1, 2)
        return keys, kv[..., NOPE:].transpose(1, 2)

    def sdpa(self, keys, values) -> torch.Tensor:
        """[T, H, V]"""
        q = self.q.view(self.batch, self.q_len, HEADS, -1).transpose(1, 2)
        if self.q_len == 1:
            out = F.scaled_dot_product_attention(q, keys, values, scale=SCALE)
        else:  # the new tokens are the last q_len of the context
            mask = (torch.arange(self.context, device=q.device)[None, :]
                    <= torch.arange(self.context - self.q_len, self.context,
                                    device=q.device)[:, None])
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=SCALE)
        return out.transpose(1, 2).reshape(self.batch * self.q_len, HEADS, V_DIM)

    def expanded(self) -> torch.Tensor:
        return self.sdpa(*self.expand())

    def on_expanded_cache(self) -> torch.Tensor:
        return self.sdpa(self.keys, self.values)


def run(args) -> dict:
    timer = Timer(args.device)
    copy_gb_s = copy_bandwidth(args.device, (64 if args.quick else 512) << 20)
    results = {**run_metadata(args.device), "copy_gb_s": copy_gb_s, "decode": [], "prefill": []}
    print(f"{results['device_name']}; copy bandwidth (read + write) {copy_gb_s:.1f} GB/s; "
          f"V2-Lite heads (16 x nope 128 + rope 64, latent 512, v 128), bf16")
    print("decode           form                      time ms   MB read    GB/s  of copy")
    decode = [(1, 1024), (4, 512)] if args.quick else [(1, 4096), (1, 32768), (16, 2048)]
    weights = 2 * HEADS * (NOPE + V_DIM) * LATENT  # kv_b_proj (W_UK, W_UV) in bf16
    for batch, context in decode:
        case = Case(args.device, batch, context, 1)
        with torch.inference_mode():
            want = case.on_expanded_cache()
            check("absorbed MLA decode", case.absorbed(), want)
            check("expanded MLA decode", case.expanded(), want)
            latent_bytes = batch * context * (LATENT + ROPE) * 2
            forms = {"absorbed (fastgen)": (case.absorbed, latent_bytes + weights),
                     "expanded from latent": (case.expanded, latent_bytes + weights),
                     "SDPA on expanded cache": (case.on_expanded_cache,
                                                batch * context * HEADS * (NOPE + ROPE + V_DIM) * 2)}
            for name, (fn, nbytes) in forms.items():
                s = timer.median_s(fn, 5)
                row = {"batch": batch, "context": context, "form": name, "ms": s * 1e3,
                       "bytes": nbytes, "gb_s": nbytes / s / 1e9,
                       "of_copy": nbytes / s / 1e9 / copy_gb_s}
                results["decode"].append(row)
                print(f"{batch:>3} x {context:<7}     {name:<24} {s * 1e3:8.2f} {nbytes / 1e6:9.1f} "
                      f"{row['gb_s']:7.1f} {100 * row['of_copy']:7.0f}%")
        save(args, results)
    print("prefill          form                      time ms  TFLOP/s")
    for length in ([256] if args.quick else [512, 2048]):
        case = Case(args.device, 1, length, length)
        pairs = length * (length + 1) / 2
        with torch.inference_mode():
            check("absorbed MLA prefill", case.absorbed(), case.expanded())
            # FLOPs of each form's own work: absorbed, the q / o projections through W_UK, W_UV
            # and attention at 576 / 512 per pair; expanded, kv_b_proj over the context and
            # attention at 192 / 128 per pair (causal halves).
            proj = 2 * length * HEADS * LATENT * (NOPE + V_DIM)
            forms = {"absorbed (fastgen)": (case.absorbed,
                                            proj + 2 * pairs * HEADS * (2 * LATENT + ROPE)),
                     "expanded from latent": (case.expanded,
                                              proj + 2 * pairs * HEADS * (NOPE + ROPE + V_DIM))}
            for name, (fn, flops) in forms.items():
                s = timer.median_s(fn, 3)
                row = {"tokens": length, "form": name, "ms": s * 1e3, "tflop_s": flops / s / 1e12}
                results["prefill"].append(row)
                print(f"{length:>13}     {name:<24} {s * 1e3:8.1f} {row['tflop_s']:8.3f}")
        save(args, results)
    return results


def save(args, results: dict) -> None:
    if args.json:
        save_json(args.json, results)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="small sizes (a CPU check)")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    torch.manual_seed(0)
    run(args)


if __name__ == "__main__":
    main()
