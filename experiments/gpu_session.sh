#!/usr/bin/env bash
# One device call's worth of GPU work: checks, then benchmarks, each step logged.
#   bash experiments/gpu_session.sh STEP [STEP ...]
# STEP is NAME=COMMAND-ARGS for `python3 -m experiments.NAME ARGS` (spaces in ARGS
# as ',' lists already are), e.g. 'benchmark_gmm=--check --impls=pallas_mosaic'.
# Logs go to $OUT (or /tmp/gpu_session); a failing step does not stop the others.
# Run from the repository root on a machine without the project installed: it
# puts the checkout and kernels/ (as moe_kernels) on PYTHONPATH.
set -uo pipefail
out="${OUT:-/tmp/gpu_session}"
mkdir -p "$out"
source "$(dirname "$0")/gpu_env.sh"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,clocks.max.sm,clocks.sm,temperature.gpu,memory.total \
  --format=csv | tee "$out/gpu.txt"
python3 -c 'import jax; print("jax", jax.__version__, jax.devices())' | tee -a "$out/gpu.txt"
i=0
for step in "$@"; do
  i=$((i + 1))
  name="${step%%=*}"
  args="${step#*=}"
  log="$out/step${i}_${name}.log"
  start=$(date +%s)
  # shellcheck disable=SC2086
  python3 -m "experiments.$name" $args > "$log" 2>&1
  rc=$?
  echo "== step $i: $name $args: rc $rc in $(( $(date +%s) - start )) s" | tee -a "$out/summary.txt"
done
for log in "$out"/step*.log; do
  echo "#### $(basename "$log")"
  grep -v '^{' "$log" | grep -v '^ *$' | tail -n "${TAIL_LINES:-24}"
done
cat "$out/summary.txt"
