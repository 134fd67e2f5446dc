#!/usr/bin/env bash
# One command for the GPU machine: build the extension (with the microbenchmark), run the `gpu`
# tests and the benchmarks, and write a short report under $OUT (default: ./gpu_report).
#   scripts/gpu_check.sh --prepare        # here, once: copy what the GPU machine cannot download
#   scripts/gpu_check.sh                  # there (device tool: carry .gpu_assets): every stage
#   scripts/gpu_check.sh build tests      # there: only these stages, in this order
# Stages, with rough H100 estimates (none measured yet): build (3-6 min cold), tests (1-3 min),
# kernels (~1 min), e2e (1-2 min), decode-8b (Llama-3.1-8B shapes, fastgen and HF at batch 1-256:
# 2-5 min, cut at $DECODE_TIMEOUT_S, default 480 s), prefill-8b (the same shapes, time to first
# token at 2k, 8k and 32k tokens, fastgen chunked and in one step, and HF: 0.74 PFLOP a 32k
# prefill, ~2 s at 400 TFLOP/s, so ~2 min with loading; cut at $PREFILL_TIMEOUT_S, default 360 s),
# decode-smollm2 (1-2 min), moe (the grouped expert MLP beside transformers' expert loops and
# grouped_mm on Mixtral-, Qwen3-MoE- and Scout-shaped layers, and MLA attention absorbed vs
# expanded, ~2-3 min), decode-mixtral (8 of
# Mixtral-8x7B's layers, 23 GB of random bf16 weights, fastgen and HF at batch 1, 8 and 64: 2-4
# min, cut at $DECODE_TIMEOUT_S). A device call may run 10 minutes, so split them, e.g. `build tests`,
# then `kernels e2e decode-smollm2`, then `decode-8b`, then `prefill-8b`: a warm machine keeps
# the build between calls, and every stage after `build` needs it. Each stage appends to
# $OUT/report.md and leaves its log (and JSON / PNG) beside it.
# The GPU machine has torch but no package index, so the build uses the installed torch
# (--no-build-isolation --no-deps) and optional dependencies are imported only where used. It
# cannot fetch the default model either, so the end-to-end benchmarks run the default model's
# shapes with random weights, from its config and tokenizer files carried in .gpu_assets/; the
# 8B model's config and tokenizer are written by bench_decode.py (and bench_prefill.py) itself.
set -uo pipefail
cd "$(dirname "$0")/.."
ASSETS=.gpu_assets/smollm2
STAGES=(build tests nccl kernels moe e2e decode-8b prefill-8b decode-smollm2 decode-mixtral)

if [ "${1:-}" = "--prepare" ]; then
  mkdir -p "$ASSETS"
  src=$(python3 -c "from fastgen.loader.hub import default_model_dir; print(default_model_dir())") || exit 1
  cp "$src"/*.json "$src"/*.jinja "$ASSETS"/
  grep -qx '/.gpu_assets/' .git/info/exclude 2>/dev/null || echo '/.gpu_assets/' >> .git/info/exclude
  echo "prepared $ASSETS ($(du -sh "$ASSETS" | cut -f1)); carry .gpu_assets in the device call"
  exit 0
fi
stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=("${STAGES[@]}")
for stage in "${stages[@]}"; do
  if [[ " ${STAGES[*]} " != *" $stage "* ]]; then
    echo "unknown stage '$stage'; stages: ${STAGES[*]}" >&2
    exit 2
  fi
done

OUT=${OUT:-$PWD/gpu_report}
mkdir -p "$OUT"
report="$OUT/report.md"
export PYTHONUNBUFFERED=1

{
  echo "# fastgen GPU check: ${stages[*]}"
  echo "date: $(date -u +%Y-%m-%dT%H:%MZ)  commit: $(git describe --always --dirty 2>/dev/null)"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | sed 's/^/device: /'
  python3 -c "import torch, transformers as t
print('torch:', torch.__version__, 'cuda:', torch.version.cuda, 'transformers:', t.__version__)"
} >> "$report"

step() {  # step NAME COMMAND...: run, log to $OUT/NAME.log, record pass/fail in the report
  local name=$1; shift
  local start=$SECONDS
  if "$@" > "$OUT/$name.log" 2>&1; then status=ok; else status="FAILED (rc $?)"; fi
  echo "- $name: $status in $((SECONDS - start)) s" | tee -a "$report"
}

section() {  # section TITLE FILE LINES: the tail of a log under a heading in the report
  { echo; echo "## $1"; echo '```'; tail -n "$3" "$2"; echo '```'; echo; } >> "$report"
}

built() {  # the extension imports (a stage after `build`, on a machine the build stayed on)
  python3 -c "import fastgen.ops" 2>/dev/null && return 0
  echo "- $1: skipped, fastgen is not built here (run the build stage first)" | tee -a "$report"
  return 1
}

plot_flag() {  # --plot PATH where matplotlib is installed (else draw it later with --plot-from)
  python3 -c "import matplotlib" 2>/dev/null && echo "--plot $1"
}

sass_report() {  # the instructions the attention kernels compiled to, and their spills
  command -v cuobjdump >/dev/null || { echo "cuobjdump not found"; return 1; }
  local lib
  lib=$(python3 -c "import fastgen._C as c; print(c.__file__)") || return 1
  # Each kernel's registers, stack (spills) and shared memory: a "Function" line, then usage.
  cuobjdump -res-usage "$lib" | grep -A1 -E "prefill_attention|decode_attention" | cut -c1-160
  for kernel in prefill_attention_kernel decode_attention_kernel; do
    echo "$kernel: $(cuobjdump -sass "$lib" | awk -v k="$kernel" '/Function :/ {on = index($0, k) > 0} on' \
      | grep -oE "HMMA|LDSM|LDGSTS|LDG.E.128|SHFL" | sort | uniq -c | tr '\n' ' ')"
  done
}

decode() {  # decode NAME BENCH_ARGS...: the decode roofline benchmark on one model
  local name=$1; shift
  # Under its own limit, so a slow baseline cannot eat the device call; the JSON is written
  # after every measurement, so a run cut short keeps what it measured.
  # shellcheck disable=SC2046
  step "decode-$name" timeout "${DECODE_TIMEOUT_S:-480}" python3 bench/e2e/bench_decode.py \
    --device cuda "$@" --json "$OUT/decode-$name.json" $(plot_flag "$OUT/decode-$name.png")
  section "decode roofline: $name" "$OUT/decode-$name.log" 16
}

for stage in "${stages[@]}"; do
  case $stage in
    build)
      step build pip install --no-build-isolation --no-deps -e .
      step build_bench scripts/dev_build.sh ;;
    tests)
      built tests || continue
      step gpu_tests python3 -m pytest -m gpu -q -rs tests
      section "gpu tests" "$OUT/gpu_tests.log" 5 ;;
    nccl)
      built nccl || continue
      step nccl python3 -c "from fastgen import ops; print('NCCL', ops.nccl_version())"
      step nccl_tests python3 -m pytest -q -rs tests/parallel/test_nccl.py
      section "NCCL through the extension (one rank; two on one GPU where NCCL allows)" \
        "$OUT/nccl_tests.log" 8 ;;
    kernels)
      built kernels || continue
      step kernel_bench build/dev/fastgen_bench_kernels --device cuda
      section "kernel microbenchmark" "$OUT/kernel_bench.log" 1000
      # shellcheck disable=SC2046
      step ops_bench python3 bench/kernels/bench_ops.py --device cuda --json "$OUT/ops.json" \
        $(plot_flag "$OUT/decode_attention.png")
      section "ops beside torch" "$OUT/ops_bench.log" 40
      # shellcheck disable=SC2046
      step attention_bench python3 bench/kernels/bench_attention.py --device cuda \
        --json "$OUT/attention.json" $(plot_flag "$OUT/attention.png")
      section "prefill attention beside SDPA" "$OUT/attention_bench.log" 16
      step sass sass_report
      section "SASS of the attention kernels" "$OUT/sass.log" 40 ;;
    e2e)
      built e2e || continue
      # shellcheck disable=SC2046
      step e2e_bench python3 bench/e2e/bench_e2e.py --device cuda --model "$ASSETS" \
        --load-format random --batch-sizes 1,8,32,64 --json "$OUT/e2e.json" \
        $(plot_flag "$OUT/e2e.png")
      section "end-to-end" "$OUT/e2e_bench.log" 30 ;;
    decode-8b)
      built decode-8b && decode llama3.1-8b --model llama3.1-8b ;;
    prefill-8b)
      built prefill-8b || continue
      # Under its own limit, as the decode stages; the JSON keeps every point measured.
      # shellcheck disable=SC2046
      step prefill-8b timeout "${PREFILL_TIMEOUT_S:-360}" python3 bench/e2e/bench_prefill.py \
        --device cuda --model llama3.1-8b --json "$OUT/prefill-8b.json" \
        $(plot_flag "$OUT/prefill-8b.png")
      section "time to first token: llama3.1-8b" "$OUT/prefill-8b.log" 17 ;;
    decode-smollm2)
      built decode-smollm2 && decode smollm2 --model "$ASSETS" --load-format random ;;
    moe)
      built moe || continue
      step moe_bench python3 bench/kernels/bench_moe.py --device cuda --json "$OUT/moe.json"
      section "grouped expert MLP beside transformers" "$OUT/moe_bench.log" 40
      step mla_bench python3 bench/kernels/bench_mla.py --device cuda --json "$OUT/mla.json"
      section "MLA attention: absorbed, expanded, expanded cache" "$OUT/mla_bench.log" 20 ;;
    decode-mixtral)
      built decode-mixtral && decode mixtral --model mixtral-8x7b-8l --batch-sizes 1,8,64 ;;
  esac
done
cat "$report"
