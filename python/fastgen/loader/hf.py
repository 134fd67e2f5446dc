"""Reading a Hugging Face model folder: config.json, the tokenizer, generation_config.json, and the
weights from one or several *.safetensors files, streamed tensor by tensor (so peak memory is the
model plus one tensor) into the model's parameters.

Every failure a user can cause (a missing or corrupt file, a config transformers cannot read)
becomes a ModelLoadError with a one-line message naming the file.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm.auto import tqdm

from fastgen.errors import ModelLoadError

SAFETENSORS_INDEX = "model.safetensors.index.json"


def one_line(error: BaseException) -> str:
    """An exception's first line (or its type name), for one-line ModelLoadError messages."""
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


def load_hf_config(model_dir: Path):
    """config.json through transformers' AutoConfig, with the published configs transformers 5
    refuses mended first (_mend_config)."""
    from transformers import AutoConfig

    path = model_dir / "config.json"
    if not path.is_file():
        raise ModelLoadError(f"{model_dir} has no config.json; expected a Hugging Face model folder")
    try:
        config = json.loads(path.read_text())
        mended = _mend_config(config)
        if mended:
            model_type = config.pop("model_type")
            return AutoConfig.for_model(model_type, **config)
        return AutoConfig.from_pretrained(model_dir)
    except Exception as e:  # transformers raises ValueError, OSError, KeyError, JSONDecodeError
        raise ModelLoadError(f"cannot read {path}: {one_line(e)}") from e


def _mend_config(config: dict) -> bool:
    """Older Llama 4 Scout configs carry "attn_temperature_tuning": 4 (an int where transformers
    5 wants a bool, as the reference code treats it): read as true. Returns whether anything
    changed."""
    mended = False
    for part in (config, config.get("text_config") or {}):
        value = part.get("attn_temperature_tuning")
        if isinstance(value, int) and not isinstance(value, bool):
            part["attn_temperature_tuning"] = bool(value)
            mended = True
    return mended


def load_tokenizer(model_dir: Path):
    """The folder's tokenizer (with its chat template) through transformers' AutoTokenizer."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model_dir)
    except Exception as e:
        raise ModelLoadError(f"cannot load the tokenizer in {model_dir}: {one_line(e)}") from e


def eos_token_ids(model_dir: Path, hf_config, tokenizer) -> list[int]:
    """The ids that end generation: generation_config.json's eos_token_id when the folder has one,
    else config.json's, else the tokenizer's."""
    candidates = []
    generation_config = model_dir / "generation_config.json"
    if generation_config.is_file():
        try:
            candidates.append(json.loads(generation_config.read_text()).get("eos_token_id"))
        except (OSError, json.JSONDecodeError) as e:
            raise ModelLoadError(f"cannot read {generation_config}: {one_line(e)}") from e
    candidates += [getattr(hf_config, "eos_token_id", None), tokenizer.eos_token_id]
    for ids in candidates:
        if ids is not None and ids != []:
            return [int(i) for i in ids] if isinstance(ids, (list, tuple)) else [int(ids)]
    return []


def safetensors_files(model_dir: Path) -> list[Path]:
    """The checkpoint's shards: those named by model.safetensors.index.json, else every
    *.safetensors file in the folder."""
    index = model_dir / SAFETENSORS_INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
            raise ModelLoadError(f"cannot read {index}: {one_line(e)}") from e
        files = [model_dir / name for name in sorted(set(weight_map.values()))]
        for file in files:
            if not file.is_file():
                raise ModelLoadError(f"checkpoint shard {file.name} listed in {index.name} is "
                                     f"missing from {model_dir}")
        return files
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        other = sorted(p.name for p in model_dir.glob("*.bin")) + sorted(p.name for p in model_dir.glob("*.pt"))
        hint = f" (found {', '.join(other)}; fastgen reads safetensors only)" if other else ""
        raise ModelLoadError(f"no *.safetensors weights in {model_dir}{hint}")
    return files


def _open(file: Path):
    try:
        return safe_open(file, framework="pt", device="cpu")
    except Exception as e:  # SafetensorError for a bad header, OSError for an unreadable file
        raise ModelLoadError(f"cannot read safetensors file {file}: {one_line(e)}") from e


def iter_safetensors(model_dir: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for every tensor of the checkpoint, on CPU in the file's dtype, with a
    progress bar over tensors."""
    files = safetensors_files(model_dir)
    total = 0
    for file in files:
        with _open(file) as f:
            total += len(f.keys())
    with tqdm(total=total, desc="Loading weights", unit="tensor") as progress:
        for file in files:
            with _open(file) as f:
                for name in f.keys():
                    try:
                        tensor = f.get_tensor(name)
                    except Exception as e:
                        raise ModelLoadError(f"cannot read tensor {name} from {file}: "
                                             f"{one_line(e)}") from e
                    yield name, tensor
                    progress.update()
