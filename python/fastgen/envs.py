"""Every environment variable fastgen reads, in one table: its name, what unset means, what it
does, and who reads it (the Python package, the C++ extension, the build, a script).

Python code reads the run-time ones through the accessors below, never through os.environ
itself, so this table cannot miss one (tests/test_envs.py greps the tree for FASTGEN_* names and
checks every one is here). The accessors read the environment when they are called, not at
import: a variable set after `import fastgen` (or by a test's monkeypatch) takes effect, and this
module holds no state. Build-time variables are read by setup.py and scripts/dev_build.sh, which
run before the package is importable; the C++ extension reads its own with getenv. Both are
listed here all the same, so that the table is the one place to look.

    from fastgen import envs
    envs.cache_dir()      # Path: $FASTGEN_CACHE, default ~/.cache/fastgen
    print(envs.markdown_table())   # the README's "Environment variables" table
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class EnvVar:
    name: str
    default: str   # what unset means, in words or as the value used
    meaning: str
    read_by: str   # the module, extension or tool that reads it, and when


ENV_VARS: tuple[EnvVar, ...] = (
    EnvVar("FASTGEN_CACHE", "`~/.cache/fastgen`",
           "where models fetched from the hub or converted from GGUF are kept",
           "`fastgen.loader.hub` (run time)"),
    EnvVar("FASTGEN_API_KEY", "unset: no key",
           "the default of `fastgen-serve --api-key`: clients must send "
           "`Authorization: Bearer <key>`",
           "`fastgen.entrypoints.serve` (run time)"),
    EnvVar("FASTGEN_ATTENTION_KERNELS", "unset: each batch gets its fastest kernel",
           "`plain` sends every CUDA attention batch to the plain kernel (not the split-KV decode "
           "or tensor-core prefill one), for bisecting a wrong result; read once per process",
           "the C++ extension, `csrc/cuda/attention.cu` (run time)"),
    EnvVar("FASTGEN_TP_TIMEOUT_S", "`300`",
           "how long a tensor-parallel rank waits for a peer in a collective before it fails "
           "with an error naming the peer (a peer whose process exited is reported at once)",
           "`fastgen.distributed` (run time)"),
    EnvVar("FASTGEN_CPU_COLLECTIVES", "`shm` between the ranks of one host",
           "`gloo` sends CPU tensor-parallel collectives through torch.distributed's gloo even "
           "on one host (for comparison; ranks on several hosts always use gloo)",
           "`fastgen.distributed` (run time)"),
    EnvVar("FASTGEN_CPU_LINEAR_MAX_TOKENS", "`8` where the CPU has AMX, else `32`",
           "most tokens for which a bf16 / fp16 / fp32 linear layer on the CPU streams its weight "
           "through fastgen's kernel; more go to oneDNN (F.linear). With AMX oneDNN's tiles win "
           "from ~16 tokens; without, fastgen's kernel wins to ~32",
           "`fastgen.layers.linear` (at model load)"),
    EnvVar("FASTGEN_QUANT_MAX_TOKENS", "`32` where the CPU has AMX, else `64`",
           "most tokens for which a quantized linear layer on the CPU runs fastgen's int8 kernel "
           "on its packed blocks (in a quantized MoE layer, rows per expert); more dequantize the "
           "weight and use oneDNN",
           "`fastgen.quantization` (at model load)"),
    EnvVar("GOMP_SPINCOUNT", "`10000`, set by `import fastgen` when unset (libgomp's own: 300000)",
           "how long an idle OpenMP thread spins before it sleeps. libgomp's default keeps torch's "
           "threads spinning ~1 ms after every parallel region, which is harmless on an idle "
           "machine but collapses decode when another program keeps the cores busy (measured: "
           "batch-1 decode 96 -> 1.7-30 tok/s beside a 2-thread matmul on 2 cores); 10000 "
           "bounds the spin to tens of microseconds. Read once, when torch loads OpenMP: set it "
           "before starting Python, or import fastgen before torch",
           "libgomp; set by `fastgen` (import time)"),
    EnvVar("OMP_NUM_THREADS", "all cores", "torch's CPU threads (`torch.set_num_threads`)",
           "torch / OpenMP"),
    EnvVar("RANK", "`0`", "this process's global rank under torchrun",
           "`fastgen.generation.distributed` (run time)"),
    EnvVar("WORLD_SIZE", "`1`", "the number of processes under torchrun",
           "`fastgen.generation.distributed` (run time)"),
    EnvVar("LOCAL_RANK", "`0`", "this process's rank on its node under torchrun (its GPU)",
           "`fastgen.generation.distributed` (run time)"),
    EnvVar("TQDM_DISABLE", "progress bars on",
           "set to `1` by the CLIs when stderr is not a terminal (unless already set), so logs "
           "hold no progress bars",
           "tqdm; set by `fastgen.entrypoints.cli` (run time)"),
    EnvVar("FASTGEN_CUDA", "`1`: CUDA kernels too, when torch is a CUDA build and nvcc is found",
           "`0` builds the CPU kernels only", "`setup.py` (build time)"),
    EnvVar("FASTGEN_CPU_NATIVE", "`1`: `-march=native`, tuned to the building machine",
           "`0` builds portable CPU kernels", "`setup.py` (build time)"),
    EnvVar("TORCH_CUDA_ARCH_LIST", "the visible GPU's, else `9.0`",
           "CUDA architectures to compile for, e.g. `9.0` or `8.0;9.0a`",
           "`setup.py`, `scripts/dev_build.sh` (build time)"),
    EnvVar("MAX_JOBS", "all cores (`scripts/dev_build.sh`: 2)", "parallel compile jobs",
           "`setup.py`, `scripts/dev_build.sh` (build time)"),
    EnvVar("CUDA_HOME", "the toolkit `nvcc` belongs to",
           "the CUDA toolkit to build against (`CUDA_PATH` is tried next)",
           "`setup.py` (build time)"),
    EnvVar("CUDA_PATH", "unset", "the CUDA toolkit, when `CUDA_HOME` is not set",
           "`setup.py` (build time)"),
    EnvVar("OUT", "`./gpu_report`", "where the GPU check writes its report and logs",
           "`scripts/gpu_check.sh`"),
    EnvVar("DECODE_TIMEOUT_S", "`480`", "time limit of the GPU check's decode-8b stage, seconds",
           "`scripts/gpu_check.sh`"),
    EnvVar("PREFILL_TIMEOUT_S", "`360`", "time limit of the GPU check's prefill-8b stage, seconds",
           "`scripts/gpu_check.sh`"),
)
ENV_VAR_NAMES = frozenset(var.name for var in ENV_VARS)


def _declared(name: str) -> str:
    """name itself; KeyError for a variable missing from ENV_VARS (add its row first)."""
    if name not in ENV_VAR_NAMES:
        raise KeyError(f"{name} is not in fastgen.envs.ENV_VARS; add it there first")
    return name


def _get(name: str) -> str | None:
    """The variable's value now; None when it is unset or empty."""
    return os.environ.get(_declared(name)) or None


def cache_dir() -> Path:
    """$FASTGEN_CACHE, default ~/.cache/fastgen."""
    return Path(_get("FASTGEN_CACHE") or "~/.cache/fastgen").expanduser()


def api_key() -> str | None:
    """$FASTGEN_API_KEY; None when unset or empty (no key)."""
    return _get("FASTGEN_API_KEY")


def torchrun_rank() -> int:
    """$RANK, default 0: this process's global rank."""
    return int(_get("RANK") or "0")


def torchrun_world_size() -> int:
    """$WORLD_SIZE, default 1: the number of processes."""
    return int(_get("WORLD_SIZE") or "1")


def torchrun_local_rank() -> int:
    """$LOCAL_RANK, default 0: this process's rank on its node."""
    return int(_get("LOCAL_RANK") or "0")


def tp_timeout_s() -> float:
    """$FASTGEN_TP_TIMEOUT_S, default 300: a collective's wait for a peer, seconds."""
    return float(_get("FASTGEN_TP_TIMEOUT_S") or "300")


def cpu_collectives() -> str:
    """$FASTGEN_CPU_COLLECTIVES, default "shm"; "gloo" forces torch.distributed's gloo."""
    value = _get("FASTGEN_CPU_COLLECTIVES") or "shm"
    if value not in ("shm", "gloo"):
        raise ValueError(f"FASTGEN_CPU_COLLECTIVES must be shm or gloo, got {value!r}")
    return value


def cpu_flags() -> frozenset[str]:
    """The processor's feature flags as Linux names them (avx512_vnni, amx_bf16, ...); empty
    where /proc/cpuinfo cannot be read."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def _tokens(name: str, with_amx: int, without: int) -> int:
    value = _get(name)
    if value is None:
        return with_amx if "amx_bf16" in cpu_flags() else without
    if not value.isdigit():
        raise ValueError(f"{name} must be a whole number of tokens, got {value!r}")
    return int(value)


def cpu_linear_max_tokens() -> int:
    """$FASTGEN_CPU_LINEAR_MAX_TOKENS; default 8 with AMX (oneDNN's AMX GEMM wins above), else 32."""
    return _tokens("FASTGEN_CPU_LINEAR_MAX_TOKENS", 8, 32)


def quant_max_tokens() -> int:
    """$FASTGEN_QUANT_MAX_TOKENS; default 32 with AMX (the AMX-INT8 kernel, against dequantizing
    for oneDNN's AMX GEMM), else 64."""
    return _tokens("FASTGEN_QUANT_MAX_TOKENS", 32, 64)


OPENMP_SPIN_COUNT = "10000"


def bound_openmp_spinning() -> None:
    """Sets GOMP_SPINCOUNT=10000 unless it is set (see its row in ENV_VARS). Must run before
    torch is imported: libgomp reads it once, when it loads."""
    os.environ.setdefault(_declared("GOMP_SPINCOUNT"), OPENMP_SPIN_COUNT)


def disable_progress_bars() -> None:
    """Sets TQDM_DISABLE=1 unless it is set already. Must run before torch is imported: torch
    imports tqdm, which reads its TQDM_* settings once, at import."""
    os.environ.setdefault(_declared("TQDM_DISABLE"), "1")


def markdown_table() -> str:
    """ENV_VARS as the Markdown table the README holds (a test keeps the two equal)."""
    rows = ["| variable | default | meaning | read by |", "|---|---|---|---|"]
    rows += [f"| `{v.name}` | {v.default} | {v.meaning} | {v.read_by} |" for v in ENV_VARS]
    return "\n".join(rows)
