#!/usr/bin/env bash
# Incremental rebuild of fastgen._C (into python/fastgen/, for an editable install) and of the
# kernel microbenchmark (build/dev/fastgen_bench_kernels), in a persistent build folder, with a
# lock so parallel callers don't collide. Configures through setup.py's cmake_configure, so the
# flags are the ones `pip install .` uses.
#   scripts/dev_build.sh
#   FASTGEN_CUDA=0 scripts/dev_build.sh   # CPU only
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p build
exec 9>build/dev.lock
flock 9
if [ ! -f build/dev/build.ninja ]; then
  python -c "from pathlib import Path; import setup; setup.cmake_configure(Path('build/dev').resolve(), Path('python/fastgen').resolve(), bench=True)" >/dev/null
fi
TORCH_CUDA_ARCH_LIST=$(python -c "import setup; print(setup.cuda_arch_list())") cmake --build build/dev -j "${MAX_JOBS:-2}"
