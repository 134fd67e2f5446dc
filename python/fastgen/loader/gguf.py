"""llama.cpp GGUF checkpoints (architectures llama, qwen2, qwen3, and the mixture-of-experts
qwen2moe, qwen3moe and llama with experts, i.e. Mixtral): their weights read as they are stored,
and a Hugging Face folder converted once for everything else.

The converted folder holds the file's metadata as a transformers config (LlamaConfig,
Qwen2Config, Qwen3Config; a Llama 3.1 file's per-frequency `rope_freqs` become the llama3 rope
parameters they were computed from), its tokenizer and chat template as tokenizer files (through
transformers), and the weights dequantized to float32 with the `gguf` package (for --dequantize
and the HF backend). Tensors get Hugging Face names, and the row permutation llama.cpp's
converter applies to a llama file's q and k is undone (rows are independent, so it is undone on
quantized rows too, losslessly; qwen files are not permuted).

By default (quantization "gguf") the engine reads the tensors straight from the file with
iter_gguf_quantized: quantized ones stay quantized (fastgen.quantization.QuantizedTensor) and the
layers pack them for fastgen's kernels. Experts (ffn_{gate,up,down}_exps, one [E, rows, cols]
tensor each) are split into Hugging Face's per-expert tensors, their quantized rows kept as they
are (fastgen.layers.moe packs them expert by expert).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from fastgen.loader.hf import ModelLoadError, one_line
from fastgen.quantization import FORMATS, QuantizedTensor

SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "qwen3", "qwen2moe", "qwen3moe")
PERMUTED_QK = ("llama",)  # architectures whose q/k rows llama.cpp's converter permutes
_SKIPPED = ("rope_freqs.weight",)  # tensors the config carries instead

# llama.cpp tensor name -> Hugging Face name ({} is the layer index)
_GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
}
# Mixture-of-experts tensors: the router and the experts ("{e}": one tensor per expert, split out
# of the file's [E, ...] tensor), and Qwen2-MoE's shared expert. Mixtral's (a llama file with
# experts) use its own names.
_MOE_NAMES = {
    "ffn_gate_inp": "mlp.gate",
    "ffn_gate_exps": "mlp.experts.{e}.gate_proj",
    "ffn_up_exps": "mlp.experts.{e}.up_proj",
    "ffn_down_exps": "mlp.experts.{e}.down_proj",
    "ffn_gate_inp_shexp": "mlp.shared_expert_gate",
    "ffn_gate_shexp": "mlp.shared_expert.gate_proj",
    "ffn_up_shexp": "mlp.shared_expert.up_proj",
    "ffn_down_shexp": "mlp.shared_expert.down_proj",
}
_MIXTRAL_NAMES = {
    "ffn_gate_inp": "block_sparse_moe.gate",
    "ffn_gate_exps": "block_sparse_moe.experts.{e}.w1",
    "ffn_up_exps": "block_sparse_moe.experts.{e}.w3",
    "ffn_down_exps": "block_sparse_moe.experts.{e}.w2",
}
_LAYER_TENSOR = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")


def _gguf_package():
    """The optional `gguf` package, imported only when a .gguf file is read, so that Hugging Face
    folders load where it is not installed."""
    try:
        import gguf
        import gguf.quants
    except ImportError:
        raise ModelLoadError("reading .gguf files needs the gguf package: pip install gguf") from None
    return gguf


def _open_reader(gguf_path: Path):
    gguf = _gguf_package()
    try:
        return gguf.GGUFReader(gguf_path)
    except Exception as e:  # ValueError for a bad magic or version, OSError, struct errors
        raise ModelLoadError(f"cannot read GGUF file {gguf_path}: {one_line(e)}") from e


def _field(reader, key: str, default=None):
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def hf_name(gguf_name: str, arch: str = "llama") -> str:
    """llama.cpp's name for a tensor -> the Hugging Face name, e.g.
    blk.3.attn_q.weight -> model.layers.3.self_attn.q_proj.weight; an expert tensor's has "{e}"
    for the expert (blk.3.ffn_up_exps.weight -> model.layers.3.mlp.experts.{e}.up_proj.weight)."""
    base, _, suffix = gguf_name.rpartition(".")
    if base in _GLOBAL_NAMES:
        return f"{_GLOBAL_NAMES[base]}.{suffix}"
    match = _LAYER_TENSOR.fullmatch(gguf_name)
    names = {**_LAYER_NAMES, **(_MIXTRAL_NAMES if arch == "llama" else _MOE_NAMES)}
    if match and match[2] in names:
        return f"model.layers.{match[1]}.{names[match[2]]}.{match[3]}"
    raise ModelLoadError(f"GGUF tensor {gguf_name} has no counterpart in fastgen's model")


def _split_experts(name: str, values: np.ndarray) -> Iterator[tuple[str, np.ndarray]]:
    """(name, values) as Hugging Face holds it: an expert tensor [E, ...] as E tensors, Qwen2-MoE's
    shared-expert gate [H] as [1, H]."""
    if "{e}" in name:
        for e in range(values.shape[0]):
            yield name.format(e=e), values[e]
    elif name.endswith("shared_expert_gate.weight") and values.ndim == 1:
        yield name, values.reshape(1, -1)
    else:
        yield name, values


def unpermute_qk(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """Undoes convert_hf_to_gguf.py's permute(), which reorders each head's rows from rotate-half
    pairs (i, i + D/2) to interleaved pairs (2i, 2i + 1).   weight: [heads * D, ...]"""
    half = weight.shape[0] // num_heads // 2
    w = weight.reshape(num_heads, half, 2, *weight.shape[1:])
    return w.swapaxes(1, 2).reshape(weight.shape)


def gguf_config(reader, gguf_path: Path):
    """A transformers config from the file's <arch>.* metadata."""
    from transformers import (LlamaConfig, MixtralConfig, Qwen2Config, Qwen2MoeConfig,
                              Qwen3Config, Qwen3MoeConfig)

    arch = _field(reader, "general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ModelLoadError(f"unsupported GGUF architecture {arch!r} in {gguf_path}; fastgen "
                             f"reads: {', '.join(SUPPORTED_ARCHITECTURES)}")
    tensors = {t.name: t for t in reader.tensors}

    def meta(key, default=None):
        value = _field(reader, f"{arch}.{key}", default)
        if value is None:
            raise ModelLoadError(f"GGUF file {gguf_path} lacks the metadata key {arch}.{key}")
        return value

    hidden, heads = int(meta("embedding_length")), int(meta("attention.head_count"))
    kv_heads = int(meta("attention.head_count_kv", heads))
    head_dim = int(_field(reader, f"{arch}.attention.key_length")
                   or meta("rope.dimension_count", hidden // heads))
    vocab = _field(reader, f"{arch}.vocab_size") or len(reader.fields["tokenizer.ggml.tokens"].data)
    theta = _float32_value(meta("rope.freq_base", 10000.0))
    rope = {"rope_type": "default", "rope_theta": theta}
    if "rope_freqs.weight" in tensors:
        original = (_field(reader, f"{arch}.rope.scaling.original_context_length")
                    or min(8192, int(meta("context_length"))))
        rope = llama3_rope_parameters(np.array(tensors["rope_freqs.weight"].data, dtype=np.float64),
                                      theta, head_dim, original, gguf_path)
    common = dict(
        vocab_size=int(vocab),
        hidden_size=hidden,
        num_hidden_layers=int(meta("block_count")),
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=int(meta("context_length")),
        rms_norm_eps=_float32_value(meta("attention.layer_norm_rms_epsilon")),
        rope_parameters=rope,
        tie_word_embeddings="output.weight" not in tensors,
        bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_id=_field(reader, "tokenizer.ggml.eos_token_id"),
        pad_token_id=_field(reader, "tokenizer.ggml.padding_token_id"),
    )
    experts = int(_field(reader, f"{arch}.expert_count") or 0)
    if experts:  # llama.cpp renormalises Qwen3-MoE's and Mixtral's top-k weights, not Qwen2-MoE's
        moe = dict(num_experts_per_tok=int(meta("expert_used_count")))
        common["intermediate_size"] = int(meta("feed_forward_length"))  # Mixtral: an expert's
        if arch != "llama":
            moe.update(num_experts=experts, moe_intermediate_size=int(meta("expert_feed_forward_length")),
                       decoder_sparse_step=1, mlp_only_layers=[])
            common["intermediate_size"] = int(_field(reader, f"{arch}.feed_forward_length")
                                              or moe["moe_intermediate_size"])
    elif "moe" in arch:
        raise ModelLoadError(f"{gguf_path}: a {arch} file without {arch}.expert_count")
    else:
        common["intermediate_size"] = int(meta("feed_forward_length"))
    if arch == "qwen2":
        return Qwen2Config(architectures=["Qwen2ForCausalLM"], **common)
    if arch == "qwen3":
        return Qwen3Config(architectures=["Qwen3ForCausalLM"], head_dim=head_dim,
                           attention_bias="blk.0.attn_q.bias" in tensors, **common)
    if arch == "qwen2moe":
        shared = int(_field(reader, f"{arch}.expert_shared_feed_forward_length") or 0)
        return Qwen2MoeConfig(architectures=["Qwen2MoeForCausalLM"], norm_topk_prob=False,
                              shared_expert_intermediate_size=shared, **moe, **common)
    if arch == "qwen3moe":
        return Qwen3MoeConfig(architectures=["Qwen3MoeForCausalLM"], head_dim=head_dim,
                              norm_topk_prob=True,
                              attention_bias="blk.0.attn_q.bias" in tensors, **moe, **common)
    if experts:
        return MixtralConfig(architectures=["MixtralForCausalLM"], head_dim=head_dim,
                             num_local_experts=experts, sliding_window=None, **moe, **common)
    return LlamaConfig(architectures=["LlamaForCausalLM"], head_dim=head_dim,
                       attention_bias="blk.0.attn_q.bias" in tensors, **common)


def llama3_factors(inv_freq: np.ndarray, factor: float, low: float, high: float,
                   original: float) -> np.ndarray:
    """The per-frequency divisors llama.cpp's converter stores as rope_freqs for Llama 3.1's
    scaling (transformers' llama3 rope, written as divisors of the unscaled frequencies)."""
    wavelen = 2 * np.pi / inv_freq
    smooth = (original / wavelen - low) / (high - low)
    medium = 1 / ((1 - smooth) / factor + smooth)
    return np.where(wavelen < original / high, 1.0, np.where(wavelen > original / low, factor, medium))


def llama3_rope_parameters(freqs: np.ndarray, theta: float, head_dim: int, original,
                           gguf_path: Path) -> dict:
    """transformers' llama3 rope parameters that give exactly the file's rope_freqs (divisors of
    each frequency): factor is the largest divisor, and low / high_freq_factor follow from the
    divisors between 1 and factor (any values fitting them give the same rotary when there are
    fewer than two). ModelLoadError when no llama3 scaling gives those divisors."""
    inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    if freqs.shape != inv_freq.shape:
        raise ModelLoadError(f"{gguf_path}: rope_freqs has {freqs.size} values for a rotary of "
                             f"{inv_freq.size} frequencies")
    factor = float(freqs.max())
    original = float(original or 8192)
    wavelen = 2 * np.pi / inv_freq
    medium = (freqs > 1 + 1e-6) & (freqs < factor * (1 - 1e-6))
    if factor <= 1 + 1e-6:
        return {"rope_type": "default", "rope_theta": theta}
    if medium.sum() >= 2:  # smooth = original / (wavelen (high - low)) - low / (high - low)
        smooth = (1 / freqs[medium] - 1 / factor) / (1 - 1 / factor)
        slope, intercept = np.polyfit(1 / wavelen[medium], smooth, 1)
        span = original / slope
        low = -intercept * span
        high = low + span
    else:  # too few points to fit: any boundaries between the neighbouring wavelengths will do
        ones, fulls = wavelen[freqs <= 1 + 1e-6], wavelen[freqs >= factor * (1 - 1e-6)]
        last_one = ones.max() * 1.0001 if ones.size else None     # just above the last 1
        first_full = fulls.min() / 1.0001                          # just below the first factor
        candidates = []  # (high_wavelen, low_wavelen) = (original / high, original / low)
        if medium.sum() == 1:  # smooth = (1/w - 1/low_wl) / (1/high_wl - 1/low_wl) at that w
            w, s = wavelen[medium][0], (1 / freqs[medium][0] - 1 / factor) / (1 - 1 / factor)
            candidates.append((1 / (1 / first_full + (1 / w - 1 / first_full) / s), first_full))
            if last_one is not None:
                candidates.append((last_one, (1 - s) / (1 / w - s / last_one)))
        else:
            candidates.append((last_one or first_full / 2, first_full))
        for high_wavelen, low_wavelen in candidates:
            high, low = original / high_wavelen, original / low_wavelen
            if np.allclose(llama3_factors(inv_freq, factor, low, high, original), freqs, rtol=1e-4):
                break
    params = {"rope_type": "llama3", "rope_theta": theta, "factor": factor,
              "low_freq_factor": float(low), "high_freq_factor": float(high),
              "original_max_position_embeddings": int(round(original))}
    if not np.allclose(llama3_factors(inv_freq, factor, low, high, original), freqs, rtol=1e-4):
        raise ModelLoadError(f"{gguf_path}: its rope_freqs are not a Llama 3 rope scaling; fastgen "
                             "cannot run this file's rotary")
    return params


def _float32_value(value) -> float:
    """GGUF stores floats as float32: 1e-5 reads back as 9.999999747e-06. Take the shortest
    decimal that rounds to the same float32, which is what the original config said."""
    return float(str(np.float32(value)))


def gguf_eos_token_ids(reader) -> list[int]:
    """End-of-sequence ids: eos, plus end-of-turn / end-of-message where the file names them."""
    ids = []
    for key in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id",
                "tokenizer.ggml.eom_token_id"):
        value = _field(reader, key)
        if value is not None and int(value) not in ids:
            ids.append(int(value))
    return ids


def _in_hf_order(reader, name: str, values: np.ndarray, hf_config) -> np.ndarray:
    """A llama file's q / k rows back in Hugging Face's order (other architectures are stored
    in it). values: [rows, ...] (floats, or a quantized tensor's byte rows)"""
    if _field(reader, "general.architecture") in PERMUTED_QK:
        if ".q_proj." in name:
            return unpermute_qk(values, hf_config.num_attention_heads)
        if ".k_proj." in name:
            return unpermute_qk(values, hf_config.num_key_value_heads)
    return values


def iter_gguf_tensors(reader, hf_config) -> Iterator[tuple[str, torch.Tensor]]:
    """(Hugging Face name, float32 tensor) for every tensor in the file, dequantized."""
    dequantize = _gguf_package().quants.dequantize
    arch = _field(reader, "general.architecture")
    for tensor in tqdm(reader.tensors, desc="Dequantizing GGUF", unit="tensor"):
        if tensor.name in _SKIPPED:
            continue
        name = hf_name(tensor.name, arch)
        values = dequantize(tensor.data, tensor.tensor_type).astype(np.float32, copy=False)
        for name, part in _split_experts(name, _in_hf_order(reader, name, values, hf_config)):
            # F32 tensors come back as read-only views of the memory-mapped file: copy those.
            yield name, torch.from_numpy(np.require(part, requirements=("C", "W")))


def iter_gguf_quantized(gguf_path: Path, hf_config) -> Iterator[tuple[str, torch.Tensor | QuantizedTensor]]:
    """(Hugging Face name, tensor) for every tensor in the file: the quantized types fastgen's
    kernels run (Q4_0, Q4_1, Q8_0, Q4_K, Q5_K, Q6_K) as QuantizedTensor rows, as stored; float
    tensors, and quantized types it has no kernel for (dequantized, with a warning), as float32."""
    gguf = _gguf_package()
    reader = _open_reader(gguf_path)
    arch = _field(reader, "general.architecture")
    others: set[str] = set()
    for tensor in tqdm(reader.tensors, desc="Reading GGUF", unit="tensor"):
        if tensor.name in _SKIPPED:
            continue
        name = hf_name(tensor.name, arch)
        qtype = int(tensor.tensor_type)
        if "{e}" in name and qtype in FORMATS:  # [E, rows, row bytes]: each expert's rows
            values = np.array(tensor.data)
            for name, part in _split_experts(name, values):
                yield name, QuantizedTensor(qtype, torch.from_numpy(part), int(tensor.shape[0]))
            continue
        if qtype in FORMATS:
            values = np.array(tensor.data)  # [N, row bytes], copied out of the memory map
        else:
            if qtype not in (0, 1, 30):
                others.add(tensor.tensor_type.name)
            values = gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32)
        values = _in_hf_order(reader, name, values, hf_config)
        if qtype in FORMATS:
            yield name, QuantizedTensor(qtype, torch.from_numpy(np.require(values, requirements=("C", "W"))),
                                        int(tensor.shape[0]))
            continue
        for name, part in _split_experts(name, values):
            yield name, torch.from_numpy(np.require(part, requirements=("C", "W")))
    if others:
        import logging
        logging.getLogger(__name__).warning(
            "%s: tensors of type %s have no fastgen kernel and run dequantized", gguf_path.name,
            ", ".join(sorted(others)))


# Written into every converted folder; bump it when the conversion changes, so cached folders made
# by an older fastgen are converted again instead of being reused as they are.
CONVERSION_STAMP = "fastgen-conversion.json"
CONVERSION_VERSION = 3  # 2: chat template taken from the GGUF metadata; 3: MoE files


def convert_gguf(gguf_path: str | Path, out_dir: str | Path) -> Path:
    """Writes a Hugging Face folder for a GGUF file into out_dir: config.json,
    model.safetensors (float32), tokenizer files with the chat template, generation_config.json.
    Returns out_dir. Not atomic; the cache in hub.py writes into a temporary folder and renames."""
    from safetensors.torch import save_file
    from transformers import AutoTokenizer, GenerationConfig

    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    if not gguf_path.is_file():
        raise ModelLoadError(f"GGUF file {gguf_path} does not exist")
    reader = _open_reader(gguf_path)
    hf_config = gguf_config(reader, gguf_path)
    out_dir.mkdir(parents=True, exist_ok=True)

    tensors = dict(iter_gguf_tensors(reader, hf_config))
    hf_config.save_pretrained(out_dir)
    save_file(tensors, out_dir / "model.safetensors", metadata={"format": "pt"})
    del tensors

    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    except Exception as e:
        raise ModelLoadError(f"cannot build a tokenizer from {gguf_path}: {one_line(e)}") from e
    # transformers' GGUF tokenizer conversion leaves the chat template behind; the file has it.
    tokenizer.chat_template = _field(reader, "tokenizer.chat_template", tokenizer.chat_template)
    tokenizer.save_pretrained(out_dir)

    eos = gguf_eos_token_ids(reader)
    GenerationConfig(bos_token_id=hf_config.bos_token_id,
                     eos_token_id=eos if len(eos) > 1 else (eos[0] if eos else None),
                     pad_token_id=hf_config.pad_token_id).save_pretrained(out_dir)
    (out_dir / CONVERSION_STAMP).write_text(json.dumps({"version": CONVERSION_VERSION,
                                                        "source": gguf_path.name}))
    return out_dir


def conversion_is_current(folder: Path) -> bool:
    """True when folder was converted by this version of convert_gguf."""
    try:
        return json.loads((folder / CONVERSION_STAMP).read_text())["version"] == CONVERSION_VERSION
    except (OSError, ValueError, KeyError):
        return False
