"""Where a run's device time and memory go: profiler traces of chosen steps, summed
by kernel, and the devices' peak memory.

``jax.profiler.start_trace(dir, create_perfetto_trace=True)`` writes
``perfetto_trace.json.gz`` under ``dir/plugins/profile/<run>/``. Device work
shows there as complete ("X") events in processes whose name names the device
(``/device:GPU:0``...). ``kernel_times`` sums those by name; host-side events
are left out unless no device process exists (a CPU run), in which case the
XLA ops of the host threads are summed. ``tools/trace_summary.py`` is the
command line over the same functions.
"""
from __future__ import annotations

import collections
import glob
import gzip
import io
import json
import os
import sys
from typing import Any, Callable, Iterable, Optional

import jax


def find_traces(path: str) -> list[str]:
  """The perfetto traces under ``path`` (or the file itself), else the raw trace files."""
  if os.path.isfile(path):
    return [path]
  perfetto = glob.glob(os.path.join(path, "**", "perfetto_trace.json.gz"), recursive=True)
  return sorted(perfetto or glob.glob(os.path.join(path, "**", "*.trace.json.gz"),
                                      recursive=True))


def _load(path: str) -> Any:
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
                  out=None) -> None:
  """A table of the ``top`` kernels by time, per step, with their share of the total."""
  out = sys.stdout if out is None else out
  total = sum(us for _, us in times.values())
  print(f"  device time per step: {total / steps / 1e3:.3f} ms over {len(times)} kernel names",
        file=out)
  print(f"  {'ms/step':>9} {'share':>6} {'calls/step':>10}  kernel", file=out)
  ranked = sorted(times.items(), key=lambda kv: -kv[1][1])
  for name, (count, us) in ranked[:top]:
    print(f"  {us / steps / 1e3:9.3f} {us / max(total, 1e-9):6.1%} {count / steps:10.1f}  "
          f"{name[:110]}", file=out)


def peak_memory_bytes(devices: Iterable[jax.Device]) -> Optional[int]:
  """The largest ``peak_bytes_in_use`` of ``devices`` since the process started;
  None where no device reports it (CPU)."""
  peaks = []
  for device in devices:
    stats = device.memory_stats()
    if stats and "peak_bytes_in_use" in stats:
      peaks.append(int(stats["peak_bytes_in_use"]))
  return max(peaks) if peaks else None


def parse_steps(text: str) -> tuple[int, int]:
  """``"A:B"`` -> (A, B): steps A to B-1, counted from 0. Raises ValueError."""
  parts = text.split(":")
  try:
    first, stop = (int(p) for p in parts)
  except ValueError:
    raise ValueError(f"{text!r} is not A:B (two integers, e.g. 10:13)") from None
  if not 0 <= first < stop:
    raise ValueError(f"{text!r}: allowed A:B with 0 <= A < B")
  return first, stop


class StepProfiler:
  """Traces the training steps ``first`` to ``stop - 1`` into ``directory`` and
  then says the top kernels of those steps.

  The loop calls ``before_step(step)`` before dispatching each step,
  ``after_step(step, outputs)`` after, and ``close()`` when it ends (early
  stops and errors included). A run resumed inside the range traces from its
  first step; one that ends inside it stops the trace at its last step.
  """

  def __init__(self, steps: Optional[tuple[int, int]], directory: str,
               say: Callable[[str], None], top: int = 15):
    self._steps, self._directory, self._say, self._top = steps, directory, say, top
    self._began: Optional[int] = None      # first step traced, while tracing
    self._last: Optional[int] = None
    self._known: set[str] = set()

  def before_step(self, step: int) -> None:
    if self._steps is None or self._began is not None:
      return
    first, stop = self._steps
    if first <= step < stop:
      self._known = set(find_traces(self._directory))
      jax.profiler.start_trace(self._directory, create_perfetto_trace=True)
      self._began, self._steps = step, (step, stop)

  def after_step(self, step: int, outputs: Any) -> None:
    if self._began is None:
      return
    self._last = step
    if step == self._steps[1] - 1:
      jax.block_until_ready(outputs)   # the trace must hold the last step's device work
      self._finish()

  def close(self) -> None:
    if self._began is not None:
      self._finish()

  def _finish(self) -> None:
    jax.profiler.stop_trace()
    began, last = self._began, self._last if self._last is not None else self._began
    self._began, self._steps = None, None     # one trace per run
    steps = last - began + 1
    new = [p for p in find_traces(self._directory) if p not in self._known]
    if not new:
      self._say(f"profile of steps {began}:{last + 1}: no trace found in {self._directory}")
      return
    text = io.StringIO()
    print(f"profile of steps {began}:{last + 1} in {new[-1]}; top kernels:", file=text)
    print_summary(kernel_times(new[-1]), steps=steps, top=self._top, out=text)
    self._say(text.getvalue().rstrip("\n"))
