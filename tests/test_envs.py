"""fastgen.envs is the one table of environment variables: every FASTGEN_* variable the tree
mentions (python/, csrc/, scripts/, setup.py, found by grepping them) and every variable the tree
reads by name is in it, it has no stale FASTGEN_* rows, the accessors read the environment when
called, and the README's table is the one envs.markdown_table() renders."""

import re
from pathlib import Path

import pytest

from fastgen import envs
from fastgen.loader import hub

ROOT = Path(__file__).resolve().parents[1]
SUFFIXES = {".py", ".cpp", ".cu", ".h", ".cuh", ".sh"}
# A FASTGEN_* name used as an environment variable: a quoted string ("FASTGEN_CACHE"), a shell
# or docstring reference ($FASTGEN_CACHE, ${FASTGEN_CACHE}) or an assignment on a command line
# (FASTGEN_CUDA=0 ...). Macros (FASTGEN_CHECK_DIM) and CMake's -DFASTGEN_CUDA=ON are neither.
FASTGEN_VAR = re.compile(r"""(?:["'$]|\$\{)(FASTGEN_[A-Z0-9_]+)|(?<![\w-])(FASTGEN_[A-Z0-9_]+)=""")
# Any variable read by name: os.environ.get("X"), os.environ["X"], getenv("X"), ${X:-default}.
READ_VAR = re.compile(r"""(?:environ(?:\.get)?\(?\[?|getenv\()\s*["']([A-Z][A-Z0-9_]*)["']"""
                      r"""|\$\{([A-Z][A-Z0-9_]*):-""")


def tree_files() -> list[Path]:
    files = [ROOT / "setup.py"]
    for folder in ("python", "csrc", "scripts"):
        files += [p for p in (ROOT / folder).rglob("*") if p.suffix in SUFFIXES and p.is_file()]
    return files


def names(pattern: re.Pattern, files: list[Path]) -> set[str]:
    found = set()
    for path in files:
        for match in pattern.finditer(path.read_text(errors="replace")):
            found.add(next(group for group in match.groups() if group))
    return found


def test_every_fastgen_variable_in_the_tree_is_in_the_table():
    mentioned = names(FASTGEN_VAR, tree_files())
    assert {"FASTGEN_CACHE", "FASTGEN_API_KEY", "FASTGEN_ATTENTION_KERNELS",
            "FASTGEN_CUDA", "FASTGEN_CPU_NATIVE"} <= mentioned  # the grep finds what it should
    assert mentioned <= envs.ENV_VAR_NAMES


def test_every_variable_read_by_name_is_in_the_table():
    read = names(READ_VAR, tree_files())
    assert {"FASTGEN_CUDA", "MAX_JOBS", "TORCH_CUDA_ARCH_LIST", "OUT"} <= read  # setup.py, scripts
    assert read <= envs.ENV_VAR_NAMES


def test_no_stale_fastgen_rows():
    others = [p for p in tree_files() if p.name != "envs.py"]
    rows = {name for name in envs.ENV_VAR_NAMES if name.startswith("FASTGEN_")}
    assert rows <= names(FASTGEN_VAR, others)


def test_accessors_read_the_environment_when_called(monkeypatch, tmp_path):
    monkeypatch.delenv("FASTGEN_CACHE", raising=False)
    assert envs.cache_dir() == Path("~/.cache/fastgen").expanduser() == hub.cache_dir()
    monkeypatch.setenv("FASTGEN_CACHE", str(tmp_path))
    assert envs.cache_dir() == tmp_path == hub.cache_dir()
    monkeypatch.setenv("FASTGEN_API_KEY", "")
    assert envs.api_key() is None
    monkeypatch.setenv("FASTGEN_API_KEY", "k3y")
    assert envs.api_key() == "k3y"
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert (envs.torchrun_rank(), envs.torchrun_world_size(), envs.torchrun_local_rank()) == \
        (0, 1, 0)
    monkeypatch.setenv("RANK", "5")
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert (envs.torchrun_rank(), envs.torchrun_world_size(), envs.torchrun_local_rank()) == \
        (5, 8, 1)


def test_the_readme_table_is_the_modules():
    assert envs.markdown_table() in (ROOT / "README.md").read_text()


def test_cpu_token_thresholds_follow_the_machine_and_the_environment(monkeypatch):
    """Without AMX fastgen's streaming kernels win to 32 (bf16) / 64 (quantized) tokens; with
    it oneDNN's AMX GEMM takes bf16 over from 8, and the AMX-INT8 quantized kernel runs to 32;
    both are settable."""
    from fastgen import quantization
    from fastgen.layers import linear

    monkeypatch.delenv("FASTGEN_CPU_LINEAR_MAX_TOKENS", raising=False)
    monkeypatch.delenv("FASTGEN_QUANT_MAX_TOKENS", raising=False)
    amx = "amx_bf16" in envs.cpu_flags()
    assert envs.cpu_linear_max_tokens() == (8 if amx else 32)
    assert envs.quant_max_tokens() == (32 if amx else 64)
    monkeypatch.setenv("FASTGEN_CPU_LINEAR_MAX_TOKENS", "12")
    monkeypatch.setenv("FASTGEN_QUANT_MAX_TOKENS", "3")
    linear.configure_cpu_thresholds()
    try:
        assert (linear.CPU_LINEAR_MAX_TOKENS, quantization.QUANT_MAX_TOKENS) == (12, 3)
    finally:
        monkeypatch.undo()
        linear.configure_cpu_thresholds()
    monkeypatch.setenv("FASTGEN_QUANT_MAX_TOKENS", "many")
    with pytest.raises(ValueError, match="FASTGEN_QUANT_MAX_TOKENS must be a whole number"):
        envs.quant_max_tokens()
