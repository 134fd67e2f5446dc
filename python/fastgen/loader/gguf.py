"""llama.cpp GGUF checkpoints (Llama architecture), converted once into a Hugging Face folder.

fastgen does not run quantized weights: a .gguf file is dequantized to float32 with the `gguf`
package, its tensors renamed to Hugging Face names (undoing the row permutation llama.cpp's
converter applies to q and k), its metadata turned into a LlamaConfig and its tokenizer and chat
template into tokenizer files through transformers. The result is an ordinary folder, so a GGUF
model and its converted folder load through one path and hold identical weights.
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

SUPPORTED_ARCHITECTURES = ("llama",)

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


def hf_name(gguf_name: str) -> str:
    """llama.cpp's name for a tensor -> the Hugging Face Llama name, e.g.
    blk.3.attn_q.weight -> model.layers.3.self_attn.q_proj.weight"""
    base, _, suffix = gguf_name.rpartition(".")
    if base in _GLOBAL_NAMES:
        return f"{_GLOBAL_NAMES[base]}.{suffix}"
    match = _LAYER_TENSOR.fullmatch(gguf_name)
    if match and match[2] in _LAYER_NAMES:
        return f"model.layers.{match[1]}.{_LAYER_NAMES[match[2]]}.{match[3]}"
    raise ModelLoadError(f"GGUF tensor {gguf_name} has no counterpart in fastgen's Llama model")


def unpermute_qk(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """Undoes convert_hf_to_gguf.py's permute(), which reorders each head's rows from rotate-half
    pairs (i, i + D/2) to interleaved pairs (2i, 2i + 1).   weight: [heads * D, ...]"""
    half = weight.shape[0] // num_heads // 2
    w = weight.reshape(num_heads, half, 2, *weight.shape[1:])
    return w.swapaxes(1, 2).reshape(weight.shape)


def gguf_config(reader, gguf_path: Path):
    """A transformers LlamaConfig from the file's llama.* metadata."""
    from transformers import LlamaConfig

    arch = _field(reader, "general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ModelLoadError(f"unsupported GGUF architecture {arch!r} in {gguf_path}; fastgen "
                             f"converts: {', '.join(SUPPORTED_ARCHITECTURES)}")
    names = {t.name for t in reader.tensors}
    if "rope_freqs.weight" in names:
        raise ModelLoadError(f"{gguf_path} uses per-frequency rope scaling (rope_freqs), which the "
                             "GGUF converter does not support; load the Hugging Face checkpoint")

    def meta(key, default=None):
        value = _field(reader, f"{arch}.{key}", default)
        if value is None:
            raise ModelLoadError(f"GGUF file {gguf_path} lacks the metadata key {arch}.{key}")
        return value

    hidden, heads = int(meta("embedding_length")), int(meta("attention.head_count"))
    kv_heads = int(meta("attention.head_count_kv", heads))
    vocab = _field(reader, f"{arch}.vocab_size") or len(reader.fields["tokenizer.ggml.tokens"].data)
    eos = _field(reader, "tokenizer.ggml.eos_token_id")
    return LlamaConfig(
        architectures=["LlamaForCausalLM"],
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=int(meta("feed_forward_length")),
        num_hidden_layers=int(meta("block_count")),
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=int(meta("rope.dimension_count", hidden // heads)),
        max_position_embeddings=int(meta("context_length")),
        rms_norm_eps=_float32_value(meta("attention.layer_norm_rms_epsilon")),
        rope_theta=_float32_value(meta("rope.freq_base", 10000.0)),
        attention_bias="blk.0.attn_q.bias" in names,
        tie_word_embeddings="output.weight" not in names,
        bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_id=eos,
        pad_token_id=_field(reader, "tokenizer.ggml.padding_token_id"),
    )


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


def iter_gguf_tensors(reader, hf_config) -> Iterator[tuple[str, torch.Tensor]]:
    """(Hugging Face name, float32 tensor) for every tensor in the file, dequantized."""
    dequantize = _gguf_package().quants.dequantize
    for tensor in tqdm(reader.tensors, desc="Dequantizing GGUF", unit="tensor"):
        name = hf_name(tensor.name)
        values = dequantize(tensor.data, tensor.tensor_type).astype(np.float32, copy=False)
        if ".q_proj." in name:
            values = unpermute_qk(values, hf_config.num_attention_heads)
        elif ".k_proj." in name:
            values = unpermute_qk(values, hf_config.num_key_value_heads)
        # F32 tensors come back as read-only views of the memory-mapped file: copy those.
        yield name, torch.from_numpy(np.require(values, requirements=("C", "W")))


# Written into every converted folder; bump it when the conversion changes, so cached folders made
# by an older fastgen are converted again instead of being reused as they are.
CONVERSION_STAMP = "fastgen-conversion.json"
CONVERSION_VERSION = 2  # 2: chat template taken from the GGUF metadata


def convert_gguf(gguf_path: str | Path, out_dir: str | Path) -> Path:
    """Writes a Hugging Face folder for a Llama GGUF file into out_dir: config.json,
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
