#!/usr/bin/env bash
# Nsight Compute profile of one Mosaic kernel variant:
#   bash tools/ncu_profile.sh MODE IMPL SHAPE [DIST [ROWS]]
# e.g. bash tools/ncu_profile.sh tgmm tgmm_mosaic dsv3
#      bash tools/ncu_profile.sh fwd pallas_mosaic@split=m dsv3 skewed
# Compiles and runs the variant once on random inputs (tools.ptxas_report's
# child; DIST balanced by default, or skewed; ROWS the shape's M by default)
# under ncu's full set, then writes the per-kernel details and the
# per-SASS-instruction source page (stall samples) as CSV under $OUT (or /tmp/ncu).
# ncu is taken from PATH, else from /opt/nvidia/nsight-compute/*/.
set -uo pipefail
mode="$1"; impl="$2"; shape="$3"; dist="${4:-balanced}"; rows="${5:-0}"
out="${OUT:-/tmp/ncu}"
python="${PYTHON:-python3}"
mkdir -p "$out"
source "$(dirname "$0")/gpu_env.sh"
cd "$(dirname "$0")/.."
ncu_bin="$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)"
if [ -z "$ncu_bin" ]; then
  echo "ncu not found (PATH, /opt/nvidia/nsight-compute/*/ncu)" >&2
  exit 1
fi
echo "ncu: $ncu_bin"
report="${TMPDIR:-/tmp}/ncu_profile"  # large; only the CSV pages go to $OUT
"$ncu_bin" --clock-control none --kernel-name regex:mosaic --launch-count 1 --set full \
  --import-source no -f -o "$report" \
  "$python" -m tools.ptxas_report --child="$impl" --mode="$mode" --shape="$shape" \
  --rows="$rows" --dist="$dist" > "$out/ncu_run.log" 2>&1
echo "ncu rc $?"; tail -5 "$out/ncu_run.log"
"$ncu_bin" -i "$report.ncu-rep" --page details --csv > "$out/details.csv" 2>&1
"$ncu_bin" -i "$report.ncu-rep" --page source --csv --print-source sass > "$out/source.csv" 2>&1
wc -c "$out"/*.csv
grep -i "duration\|warp cycles per issued\|stall\|issued ipc\|throughput" "$out/details.csv" | head -40
