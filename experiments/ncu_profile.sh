#!/usr/bin/env bash
# Nsight Compute profile of one Mosaic kernel variant (Firecracker GPU machines):
#   bash experiments/ncu_profile.sh MODE IMPL SHAPE [DIST [ROWS]]
# e.g. bash experiments/ncu_profile.sh tgmm tgmm_mosaic dsv3
#      bash experiments/ncu_profile.sh fwd pallas_mosaic@split=m dsv3 skewed
# Compiles and runs the variant once on random inputs (experiments.ptxas_report's
# child; DIST balanced by default, or skewed; ROWS the shape's M by default)
# under ncu's full set, then writes the per-kernel details and the
# per-SASS-instruction source page (stall samples) as CSV under $OUT.
set -uo pipefail
mode="$1"; impl="$2"; shape="$3"; dist="${4:-balanced}"; rows="${5:-0}"
out="${OUT:-/tmp/ncu}"
mkdir -p "$out"
source "$(dirname "$0")/gpu_env.sh"
ncu_bin="$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)"
echo "ncu: $ncu_bin"
"$ncu_bin" --clock-control none --kernel-name regex:mosaic --launch-count 1 --set full \
  --import-source no -f -o /tmp/prof \
  python3 -m experiments.ptxas_report --child="$impl" --mode="$mode" --shape="$shape" \
  --rows="$rows" --dist="$dist" > "$out/ncu_run.log" 2>&1
echo "ncu rc $?"; tail -5 "$out/ncu_run.log"
"$ncu_bin" -i /tmp/prof.ncu-rep --page details --csv > "$out/details.csv" 2>&1
"$ncu_bin" -i /tmp/prof.ncu-rep --page source --csv --print-source sass > "$out/source.csv" 2>&1
wc -c "$out"/*.csv
grep -i "duration\|warp cycles per issued\|stall\|issued ipc\|throughput" "$out/details.csv" | head -40
