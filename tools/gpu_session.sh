#!/usr/bin/env bash
# Several steps of GPU work in one call (one machine start-up), each step logged:
#   bash tools/gpu_session.sh STEP [STEP ...]
# STEP is MODULE=ARGS and runs `python3 -m MODULE ARGS` (ARGS split at spaces;
# comma lists stay one argument), e.g.
#   'pytest=-m gpu tests/test_gpu_kernels.py'
#   'benchmarks.gmm=--shapes=fine-768 --impls=pallas_mosaic,pallas_mosaic@split=m --baseline=first'
#   'tools.ptxas_report=--shape=dsv3 --impls=pallas_mosaic@split=m'
# Logs go to $OUT (or /tmp/gpu_session); a failing step does not stop the others.
# The interpreter is $PYTHON (default python3). Run from anywhere; works without
# the project installed (tools/gpu_env.sh).
set -uo pipefail
out="${OUT:-/tmp/gpu_session}"
python="${PYTHON:-python3}"
mkdir -p "$out"
source "$(dirname "$0")/gpu_env.sh"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=name,clocks.max.sm,clocks.sm,temperature.gpu,memory.total \
    --format=csv | tee "$out/gpu.txt"
fi
"$python" -c 'import jax; print("jax", jax.__version__, jax.devices())' | tee -a "$out/gpu.txt"
i=0
for step in "$@"; do
  i=$((i + 1))
  module="${step%%=*}"
  args="${step#*=}"
  [ "$args" = "$step" ] && args=""
  log="$out/step${i}_${module}.log"
  start=$(date +%s)
  # shellcheck disable=SC2086
  "$python" -m "$module" $args > "$log" 2>&1
  rc=$?
  echo "== step $i: $module $args: rc $rc in $(( $(date +%s) - start )) s" | tee -a "$out/summary.txt"
done
for log in "$out"/step*.log; do
  [ -e "$log" ] || continue
  echo "#### $(basename "$log")"
  grep -v '^{' "$log" | grep -v '^ *$' | tail -n "${TAIL_LINES:-24}"
done
[ -e "$out/summary.txt" ] && cat "$out/summary.txt"
exit 0
