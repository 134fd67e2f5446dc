#!/usr/bin/env bash
# Incremental rebuild of fastgen._C into python/fastgen/ for an editable install, in a persistent
# build folder (build/dev), serialised with a lock so parallel callers don't collide.
#   scripts/dev_build.sh            # CPU + CUDA (when available)
#   FASTGEN_CUDA=0 scripts/dev_build.sh
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p build/dev
exec 9>build/dev.lock
flock 9
cuda=ON
if [ "${FASTGEN_CUDA:-1}" = "0" ] || ! command -v nvcc >/dev/null; then cuda=OFF; fi
if [ ! -f build/dev/build.ninja ]; then
  python - "$cuda" <<'PY'
import os, subprocess, sys
sys.path.insert(0, ".")
import torch
from setup import cuda_arch_list, cuda_home
cuda = sys.argv[1] == "ON"
env = dict(os.environ)
args = ["cmake", "-S", ".", "-B", "build/dev", "-G", "Ninja", "-DCMAKE_BUILD_TYPE=Release",
        f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}", f"-DPython_EXECUTABLE={sys.executable}",
        f"-DFASTGEN_OUTPUT_DIR={os.path.abspath('python/fastgen')}", f"-DFASTGEN_CUDA={sys.argv[1]}"]
if cuda:
    env["TORCH_CUDA_ARCH_LIST"] = cuda_arch_list()
    args += [f"-DCUDA_TOOLKIT_ROOT_DIR={cuda_home()}", f"-DCUDAToolkit_ROOT={cuda_home()}"]
subprocess.run(args, check=True, env=env, stdout=subprocess.DEVNULL)
PY
fi
cmake --build build/dev -j "${MAX_JOBS:-2}"
