"""Block-quantized weights: fastgen's repacking and kernels against the `gguf` package.

For each GGUF type the kernels run (Q4_0, Q4_1, Q8_0, Q4_K, Q5_K, Q6_K): weights made with the
gguf package's own quantizers where it has them (Q4_0, Q4_1, Q8_0) and hand-packed random blocks
(with sane scales) where it has not (the K-quants); every block layout is checked against
gguf.quants.dequantize, value for value:
- the decoded blocks (formats.decode) and the op quant_dequantize on the repacked tiles give
  exactly gguf's dequantized weights (the repack loses nothing);
- quant_linear against the float64 product of those weights, within the bound its two-digit
  int8 activations guarantee (ops.tolerances.quant_linear_bound), over odd row counts (tails of
  the 16-row tiles), batch sizes past the 6- and 16-row passes, bias, fp32 / bf16 inputs, column slices;
- the AVX512-VNNI kernel, the AMX-INT8 one (2 input rows and more, in 16-row passes) and the
  portable one agree to the bit (the machine picks one).
"""

import gguf
import gguf.quants
import numpy as np
import pytest
import torch
from fastgen import ops
from fastgen.ops.tolerances import quant_linear_bound
from fastgen.quantization import QuantizedTensor, formats
from fastgen.quantization.formats import FORMATS

TYPES = [f.name for f in FORMATS.values()]


def quantized_rows(name: str, n: int, k: int, seed: int = 0) -> np.ndarray:
    """uint8 [n, row bytes] of GGUF blocks of type name."""
    fmt = formats.BY_NAME[name]
    rng = np.random.default_rng(seed)
    if name in ("Q4_0", "Q4_1", "Q8_0"):
        w = (rng.standard_normal((n, k)) * 0.05).astype(np.float32)
        return gguf.quants.quantize(w, gguf.GGMLQuantizationType[name])
    nb = k // fmt.block_elems
    blocks = rng.integers(0, 256, (n, nb, fmt.block_bytes), dtype=np.uint8)
    scale = lambda: (rng.uniform(0.2, 1.0, (n, nb)) * 1e-3).astype(np.float16)  # noqa: E731
    if name == "Q6_K":
        blocks[..., 208:210] = scale().view(np.uint8).reshape(n, nb, 2)
    else:
        blocks[..., 0:2] = scale().view(np.uint8).reshape(n, nb, 2)
        blocks[..., 2:4] = scale().view(np.uint8).reshape(n, nb, 2)
    return blocks.reshape(n, nb * fmt.block_bytes)


def gguf_weights(name: str, rows: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(gguf.quants.dequantize(rows, gguf.GGMLQuantizationType[name])).float()


def packed(name: str, n: int, k: int, seed: int = 0):
    rows = quantized_rows(name, n, k, seed)
    fmt = formats.BY_NAME[name]
    return fmt.qtype, formats.pack(fmt.qtype, torch.from_numpy(rows), k), gguf_weights(name, rows)


@pytest.mark.parametrize("name", TYPES)
@pytest.mark.parametrize("n", [1, 16, 37])
def test_repack_is_lossless(name, n):
    k = 512
    rows = quantized_rows(name, n, k)
    qtype = formats.BY_NAME[name].qtype
    expected = gguf_weights(name, rows)
    assert torch.equal(formats.decode(qtype, torch.from_numpy(rows), k).dequantize(), expected)
    tiles = formats.pack(qtype, torch.from_numpy(rows), k)
    assert tiles.shape == formats.BY_NAME[name].packed_shape(n, k)
    assert torch.equal(ops.quant_dequantize(tiles, qtype, n, k), expected)
    picked = torch.tensor([n - 1, 0, n // 2])
    assert torch.equal(ops.quant_dequantize(tiles, qtype, n, k, rows=picked), expected[picked])
    bf16 = ops.quant_dequantize(tiles, qtype, n, k, dtype=torch.bfloat16)
    assert torch.equal(bf16, expected.bfloat16())


@pytest.mark.parametrize("name", TYPES)
@pytest.mark.parametrize("tokens", [1, 2, 5, 6, 7, 13, 16, 33])
@pytest.mark.parametrize("n", [5, 16, 37])
def test_quant_linear(name, tokens, n):
    k = 768 if formats.BY_NAME[name].block_elems == 256 else 352
    qtype, tiles, w = packed(name, n, k)
    x = torch.randn(tokens, k)
    x[:, 3] = 40.0  # an outlier channel, as real hidden states have
    bias = torch.randn(n)
    out = ops.quant_linear(x, tiles, qtype, n, bias)
    exact = x.double() @ w.double().T + bias.double()
    error = (out.double() - exact).abs()
    assert (error <= quant_linear_bound(x, w)).all(), error.max()
    portable = ops.quant_linear(x, tiles, qtype, n, bias, portable=True)
    assert torch.equal(out, portable)


@pytest.mark.parametrize("name", ["Q4_1", "Q6_K"])
def test_quant_linear_bf16_and_float32_out(name):
    n, k = 40, 512
    qtype, tiles, w = packed(name, n, k)
    x = torch.randn(3, k, dtype=torch.bfloat16)
    exact = x.double() @ w.double().T
    fp32 = ops.quant_linear(x, tiles, qtype, n, out_dtype=torch.float32)
    assert fp32.dtype == torch.float32
    assert ((fp32.double() - exact).abs() <= quant_linear_bound(x.float(), w)).all()
    bf16 = ops.quant_linear(x, tiles, qtype, n)
    assert bf16.dtype == torch.bfloat16 and torch.equal(bf16, fp32.bfloat16())


def test_quant_linear_writes_a_column_slice():
    """A fused layer whose parts have different types writes each part into its columns."""
    qtype, tiles, w = packed("Q8_0", 24, 256)
    x = torch.randn(4, 256)
    out = torch.full((4, 40), 7.0)
    ops.quant_linear(x, tiles, qtype, 24, out=out.narrow(1, 10, 24))
    assert torch.equal(out[:, :10], torch.full((4, 10), 7.0))
    assert torch.equal(out[:, 34:], torch.full((4, 6), 7.0))
    assert torch.equal(out[:, 10:34], ops.quant_linear(x, tiles, qtype, 24))


def test_a_token_does_not_depend_on_its_batch():
    qtype, tiles, _ = packed("Q4_K", 33, 512)
    x = torch.randn(9, 512)
    batch = ops.quant_linear(x, tiles, qtype, 33)
    for i in (0, 5, 8):
        assert torch.equal(batch[i:i + 1], ops.quant_linear(x[i:i + 1], tiles, qtype, 33))


def test_quantized_tensor_shards_rows_and_whole_blocks():
    rows = quantized_rows("Q4_K", 8, 512)
    t = QuantizedTensor(12, torch.from_numpy(rows), 512)
    assert t.shape == (8, 512)
    w = gguf_weights("Q4_K", rows)
    assert torch.equal(t.narrow(0, 2, 3).dequantize(), w[2:5])
    assert torch.equal(t.narrow(1, 256, 256).dequantize(), w[:, 256:])
    with pytest.raises(ValueError, match="whole blocks of 256"):
        t.narrow(1, 128, 256)


def test_int8_per_channel():
    w = torch.randn(37, 320) * torch.linspace(0.01, 3, 37).unsqueeze(1)
    scale, decoded = formats.quantize_int8_per_channel(w)
    deq = decoded.dequantize()
    # one scale per row, every |q| <= 127, and each weight within half a step of its value
    assert ((deq - w).abs() <= scale.float().unsqueeze(1) / 2 + 1e-7).all()
    tiles = formats.pack_decoded(decoded)
    x = torch.randn(2, 320)
    out = ops.quant_linear(x, tiles, 8, 37)
    assert ((out.double() - x.double() @ deq.double().T).abs() <= quant_linear_bound(x, deq)).all()


def test_bad_arguments_are_errors():
    qtype, tiles, _ = packed("Q4_1", 16, 64)
    x = torch.randn(2, 64)
    with pytest.raises(RuntimeError, match="unsupported quantization type 7"):
        ops.quant_linear(x, tiles, 7, 16)
    with pytest.raises(RuntimeError, match="packed must be"):
        ops.quant_linear(x, tiles, qtype, 17 + 16)
    with pytest.raises(RuntimeError, match="multiple of Q4_1's block of 32"):
        ops.quant_linear(torch.randn(2, 48), tiles, qtype, 16)
    with pytest.raises(RuntimeError, match="out of range"):
        ops.quant_dequantize(tiles, qtype, 16, 64, rows=torch.tensor([16]))
    with pytest.raises(ValueError, match="blocks of 20 bytes"):
        formats.decode(qtype, torch.zeros(4, 30, dtype=torch.uint8), 64)


requires_cuda = [pytest.mark.gpu,
                 pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("name", TYPES)
@pytest.mark.parametrize("tokens", [1, 3, 8, 11])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("_", [pytest.param(0, marks=requires_cuda)])
def test_cuda_quant_linear_and_dequantize(name, tokens, dtype, _):
    """The dequantize-GEMV (float activations, no int8 digits) against the float64 product of
    gguf's weights: float32 rounding of K products only; the dequantizer exactly."""
    n, k = 37, 768 if formats.BY_NAME[name].block_elems == 256 else 352
    qtype, tiles, w = packed(name, n, k)
    tiles = tiles.cuda()
    assert torch.equal(ops.quant_dequantize(tiles, qtype, n, k).cpu(), w)
    picked = torch.tensor([36, 0, 17], device="cuda")
    assert torch.equal(ops.quant_dequantize(tiles, qtype, n, k, rows=picked).cpu(), w[[36, 0, 17]])
    x = torch.randn(tokens, k, dtype=dtype)
    bias = torch.randn(n)
    out = ops.quant_linear(x.cuda(), tiles, qtype, n, bias.cuda(), out_dtype=torch.float32).cpu()
    exact = x.double() @ w.double().T + bias.double()
    bound = 16 * k * torch.finfo(torch.float32).eps * (x.double().abs() @ w.double().abs().T) + 1e-6
    assert ((out.double() - exact).abs() <= bound).all()
    same_dtype = ops.quant_linear(x.cuda(), tiles, qtype, n, bias.cuda()).cpu()
    assert same_dtype.dtype == dtype


def test_quantized_experts_dequantize_to_gguf_values():
    """QuantizedExperts.dense (CUDA's experts, for fused_moe) holds gguf's own dequantization of
    each expert's quantized rows, and float rows as they are, in place."""
    from fastgen.quantization import QuantizedExperts

    experts = QuantizedExperts(3, 40, 64, "gguf")
    want = torch.empty(3, 40, 64)
    for e, name in enumerate(("Q8_0", "Q4_1", "Q4_0")):
        kind = gguf.GGMLQuantizationType[name]
        data = quantized_rows(name, 24, 64, seed=e)
        floats = torch.randn(16, 64, generator=torch.Generator().manual_seed(e))
        experts.experts[e].store(floats, 24)
        experts.experts[e].store(QuantizedTensor(int(kind), torch.from_numpy(data), 64), 0)
        want[e, :24] = torch.from_numpy(gguf.quants.dequantize(data, kind))
        want[e, 24:] = floats
    torch.testing.assert_close(experts.dense(torch.float32), want, rtol=0, atol=0)


def moe_reference(x, w13, w2, weights, ids, weight_on_input):
    """fused_moe in float64 over dequantized experts w13 [E, 2I, H], w2 [E, H, I]."""
    out = torch.zeros(x.shape, dtype=torch.float64)
    inter = w2.shape[2]
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e, w = int(ids[t, j]), float(weights[t, j])
            if e < 0:
                continue
            h = w13[e].double() @ (x[t].double() * (w if weight_on_input else 1.0))
            y = w2[e].double() @ (torch.nn.functional.silu(h[:inter]) * h[inter:])
            out[t] += y if weight_on_input else w * y
    return out


@pytest.mark.parametrize("types,hidden,inter", [(("Q4_1", "Q8_0"), 96, 64),
                                                (("Q4_K", "Q6_K"), 256, 256)])
@pytest.mark.parametrize("tokens", [1, 5, 40])  # 40: past max_stream_tokens, dequantize + oneDNN
@pytest.mark.parametrize("weight_on_input", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quant_fused_moe(types, hidden, inter, tokens, weight_on_input, dtype):
    """quant_fused_moe over stacked packed experts against float64 fused_moe of gguf's
    dequantized experts, both of its paths (streamed, dequantized), with a skipped (-1) slot."""
    num_experts, k = 5, 2
    stacks, dense = [], []
    for name, n, kk in ((types[0], 2 * inter, hidden), (types[1], hidden, inter)):
        per_expert = [packed(name, n, kk, seed=10 * len(stacks) + e) for e in range(num_experts)]
        stacks.append((per_expert[0][0], torch.stack([p[1] for p in per_expert])))
        dense.append(torch.stack([p[2] for p in per_expert]))
    g = torch.Generator().manual_seed(tokens)
    x = torch.randn(tokens, hidden, generator=g).to(dtype)
    ids = torch.stack([torch.randperm(num_experts, generator=g)[:k] for _ in range(tokens)]).int()
    ids[0, 1] = -1
    weights = torch.rand(tokens, k, generator=g)
    (q13, w13), (q2, w2) = stacks
    got = ops.quant_fused_moe(x, w13, q13, w2, q2, inter, weights, ids, weight_on_input,
                              max_stream_tokens=8)
    want = moe_reference(x.float(), dense[0], dense[1], weights, ids, weight_on_input)
    tol = (2e-3 if dtype == torch.float32 else 3e-2) * want.abs().max().item()
    torch.testing.assert_close(got.double(), want, rtol=0, atol=tol)


def test_quant_fused_moe_bad_arguments_are_errors():
    qtype, w, _ = packed("Q8_0", 64, 32)
    w13 = torch.stack([w, w])  # 2 experts of [2I = 64, H = 32]
    _, w2, _ = packed("Q8_0", 32, 32)
    w2 = torch.stack([w2, w2])
    x, weights = torch.randn(3, 32), torch.rand(3, 1)
    ids = torch.tensor([[0], [1], [2]], dtype=torch.int32)
    with pytest.raises(RuntimeError, match=r"topk_ids\[2, 0\] = 2 is not an expert id"):
        ops.quant_fused_moe(x, w13, qtype, w2, qtype, 32, weights, ids, max_stream_tokens=8)
    with pytest.raises(RuntimeError, match=r"w13 has shape \[2, 4, 1, 544\], expected \[2, 8, 1"):
        ops.quant_fused_moe(x, w13, qtype, w2, qtype, 64, weights, ids.clamp(max=1),
                            max_stream_tokens=8)  # I = 64
    with pytest.raises(RuntimeError, match="w2 has shape"):
        ops.quant_fused_moe(x, w13, qtype, w2[:1], qtype, 32, weights, ids.clamp(max=1),
                            max_stream_tokens=8)
    with pytest.raises(RuntimeError, match="not a supported GGML type"):
        ops.quant_fused_moe(x, w13, 1, w2, qtype, 32, weights, ids.clamp(max=1),
                            max_stream_tokens=8)
