"""Drives CMake to build ``fastgen._C``; the build itself is described once, in CMakeLists.txt.

Environment:
  FASTGEN_CUDA=0          build CPU kernels only (default: CUDA too when torch is a CUDA build and nvcc is found)
  FASTGEN_CPU_NATIVE=0    portable CPU kernels (default: -march=native, tuned to the building machine)
  TORCH_CUDA_ARCH_LIST    CUDA architectures, e.g. "9.0" or "8.0;9.0a" (default: the visible GPU's, else 9.0)
  MAX_JOBS                parallel compile jobs (default: all cores)
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


def cuda_arch_list() -> str:
    """The one place architectures are chosen."""
    if os.environ.get("TORCH_CUDA_ARCH_LIST"):
        return os.environ["TORCH_CUDA_ARCH_LIST"]
    import torch

    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        return f"{major}.{minor}"
    return "9.0"


def cuda_home() -> str:
    """The CUDA toolkit nvcc belongs to (torch's CMake still uses FindCUDA, which must be told)."""
    for candidate in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"),
                      str(Path(shutil.which("nvcc")).resolve().parent.parent), "/usr/local/cuda"):
        if candidate and (Path(candidate) / "include" / "cuda_runtime.h").exists():
            return candidate
    raise RuntimeError("nvcc was found but not the CUDA headers; set CUDA_HOME (or FASTGEN_CUDA=0)")


def want_cuda() -> bool:
    import torch

    if os.environ.get("FASTGEN_CUDA", "1") == "0":
        return False
    return torch.version.cuda is not None and shutil.which("nvcc") is not None


def cmake_configure(build_dir: Path, out_dir: Path, bench: bool, debug: bool = False) -> dict:
    """Configure the CMake build in build_dir (writing fastgen._C to out_dir); returns the
    environment the build step must run with. scripts/dev_build.sh calls this too."""
    import torch

    cuda = want_cuda()
    env = dict(os.environ)
    configure = [
        "cmake", str(ROOT), "-G", "Ninja",
        f"-DCMAKE_BUILD_TYPE={'Debug' if debug else 'Release'}",
        f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}",
        f"-DFASTGEN_TORCH_DIR={Path(torch.__file__).parent}",
        f"-DPython_EXECUTABLE={sys.executable}",
        f"-DFASTGEN_OUTPUT_DIR={out_dir}",
        f"-DFASTGEN_CUDA={'ON' if cuda else 'OFF'}",
        f"-DFASTGEN_CPU_NATIVE={'OFF' if os.environ.get('FASTGEN_CPU_NATIVE') == '0' else 'ON'}",
        f"-DFASTGEN_BENCH={'ON' if bench else 'OFF'}",
    ]
    if cuda:
        env["TORCH_CUDA_ARCH_LIST"] = cuda_arch_list()
        configure += [f"-DCUDA_TOOLKIT_ROOT_DIR={cuda_home()}", f"-DCUDAToolkit_ROOT={cuda_home()}",
                      f"-DCMAKE_CUDA_COMPILER={shutil.which('nvcc')}"]
    build_dir.mkdir(parents=True, exist_ok=True)
    subprocess.run(configure, cwd=build_dir, env=env, check=True)
    return env


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_dir = Path(self.build_temp).resolve() / "cmake"
        env = cmake_configure(build_dir, out_dir, bench=False, debug=self.debug)
        jobs = os.environ.get("MAX_JOBS", str(os.cpu_count() or 1))
        subprocess.run(["cmake", "--build", ".", "-j", jobs], cwd=build_dir, env=env, check=True)


if __name__ == "__main__":
    setup(ext_modules=[Extension("fastgen._C", sources=[])], cmdclass={"build_ext": CMakeBuild})
