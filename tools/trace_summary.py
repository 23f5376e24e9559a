"""Sums the device kernels of a jax.profiler perfetto trace by name.

  python -m tools.trace_summary TRACE_DIR_OR_FILE [--top 25] [--steps 3]

``jax.profiler.trace(dir, create_perfetto_trace=True)`` writes
``perfetto_trace.json.gz`` under ``dir/plugins/profile/<run>/``. Device work
shows there as complete ("X") events in processes whose name names the device
(``/device:GPU:0``...). Host-side events are left out unless no device process
exists (a CPU run), in which case the XLA ops of the host threads are summed.
"""
from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import sys


def find_traces(path: str) -> list[str]:
  if os.path.isfile(path):
    return [path]
  perfetto = glob.glob(os.path.join(path, "**", "perfetto_trace.json.gz"), recursive=True)
  return sorted(perfetto or glob.glob(os.path.join(path, "**", "*.trace.json.gz"),
                                      recursive=True))


def _load(path: str) -> dict:
  opener = gzip.open if path.endswith(".gz") else open
  with opener(path, "rt") as f:
    return json.load(f)


def kernel_times(path: str) -> dict[str, tuple[int, float]]:
  """name -> (count, total microseconds) over the device processes of one trace."""
  trace = _load(path)
  events = trace["traceEvents"] if isinstance(trace, dict) else trace
  names = {e["pid"]: e.get("args", {}).get("name", "") for e in events
           if e.get("ph") == "M" and e.get("name") == "process_name"}
  device_pids = {pid for pid, name in names.items() if "/device:" in name}
  if not device_pids:  # CPU run: no device streams, use the host's XLA ops
    device_pids = set(names)
  totals: dict[str, list] = collections.defaultdict(lambda: [0, 0.0])
  for e in events:
    if e.get("ph") == "X" and e.get("pid") in device_pids and "dur" in e:
      entry = totals[e["name"]]
      entry[0] += 1
      entry[1] += float(e["dur"])
  return {name: (count, us) for name, (count, us) in totals.items()}


def print_summary(times: dict[str, tuple[int, float]], *, steps: int = 1, top: int = 25,
                  out=sys.stdout) -> None:
  total = sum(us for _, us in times.values())
  print(f"  device time per step: {total / steps / 1e3:.3f} ms over {len(times)} kernel names",
        file=out)
  print(f"  {'ms/step':>9} {'share':>6} {'calls/step':>10}  kernel", file=out)
  ranked = sorted(times.items(), key=lambda kv: -kv[1][1])
  for name, (count, us) in ranked[:top]:
    print(f"  {us / steps / 1e3:9.3f} {us / max(total, 1e-9):6.1%} {count / steps:10.1f}  "
          f"{name[:110]}", file=out)


def main(argv: list[str]) -> int:
  import argparse  # pylint: disable=g-import-not-at-top
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("path")
  parser.add_argument("--top", type=int, default=25)
  parser.add_argument("--steps", type=int, default=1)
  args = parser.parse_args(argv)
  paths = find_traces(args.path)
  if not paths:
    print(f"no perfetto trace under {args.path!r}", file=sys.stderr)
    return 1
  for path in paths:
    print(path)
    print_summary(kernel_times(path), steps=args.steps, top=args.top)
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
