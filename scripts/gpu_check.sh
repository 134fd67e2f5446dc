#!/usr/bin/env bash
# One command for the GPU machine: build the extension (with the microbenchmark), run the `gpu`
# tests and the benchmarks, and write a short report under $OUT (default: ./gpu_report).
#   scripts/gpu_check.sh --prepare   # here, once: copy what the GPU machine cannot download
#   scripts/gpu_check.sh             # there (device tool: carry .gpu_assets)
# The GPU machine has torch but no package index, so the build uses the installed torch
# (--no-build-isolation --no-deps) and optional dependencies are imported only where used. It
# cannot fetch the default model either, so the end-to-end benchmark runs the default model's
# shapes with random weights, from its config and tokenizer files carried in .gpu_assets/.
set -uo pipefail
cd "$(dirname "$0")/.."
ASSETS=.gpu_assets/smollm2

if [ "${1:-}" = "--prepare" ]; then
  mkdir -p "$ASSETS"
  src=$(python3 -c "from fastgen.loader.hub import default_model_dir; print(default_model_dir())") || exit 1
  cp "$src"/*.json "$src"/*.jinja "$ASSETS"/
  grep -qx '/.gpu_assets/' .git/info/exclude 2>/dev/null || echo '/.gpu_assets/' >> .git/info/exclude
  echo "prepared $ASSETS ($(du -sh "$ASSETS" | cut -f1)); carry .gpu_assets in the device call"
  exit 0
fi
OUT=${OUT:-$PWD/gpu_report}
mkdir -p "$OUT"
report="$OUT/report.md"
export PYTHONUNBUFFERED=1

{
  echo "# fastgen GPU check"
  echo "date: $(date -u +%Y-%m-%dT%H:%MZ)"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | sed 's/^/device: /'
  python3 -c "import torch; print('torch:', torch.__version__, 'cuda:', torch.version.cuda)"
} > "$report"

step() {  # step NAME COMMAND...: run, log to $OUT/NAME.log, record pass/fail in the report
  local name=$1; shift
  local start=$SECONDS
  if "$@" > "$OUT/$name.log" 2>&1; then status=ok; else status="FAILED (rc $?)"; fi
  echo "- $name: $status in $((SECONDS - start)) s" | tee -a "$report"
}

step build pip install --no-build-isolation --no-deps -e .
step build_bench scripts/dev_build.sh
step gpu_tests python3 -m pytest -m gpu -q -rs tests
step kernel_bench build/dev/fastgen_bench_kernels --device cuda
step e2e_bench python3 bench/e2e/bench_e2e.py --device cuda --model "$ASSETS" --load-format random \
  --batch-sizes 1,8,32,64 --json "$OUT/e2e.json" --plot "$OUT/e2e.png"

{
  echo; echo "## gpu tests"; tail -n 5 "$OUT/gpu_tests.log"
  echo; echo "## kernel microbenchmark"; cat "$OUT/kernel_bench.log"
  echo; echo "## end-to-end"; tail -n 30 "$OUT/e2e_bench.log"
} >> "$report"
cat "$report"
