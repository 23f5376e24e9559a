"""Metric logging: JSON lines + TensorBoard event files, progress lines.

Records go to `<workdir>/metrics.jsonl` (one `{"step": s, ...}` object per
`log` call, 1-D values kept as lists) and to TensorBoard event files under
`<workdir>/tensorboard` (tensorboardX; no TensorFlow). A 1-D value `v` under
tag `name` becomes scalars `name/0`, `name/1`, ... (e.g.
`moe/layer_1/expert_load/3`). Only the chief process writes anything.

Resuming: call `truncate_after(resume_step)` before logging again. It drops
JSONL records with step > resume_step (they are about to be re-logged) and
makes TensorBoard purge events after resume_step.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import time
from typing import Any, Callable, Mapping, NamedTuple

import numpy as np

from moe_jax.training.files import atomic_write

JSONL_NAME = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


def _to_json_value(name: str, value: Any) -> Any:
  """Python scalar / list (1-D) / str for `value`; rejects higher ranks."""
  if isinstance(value, str):
    return value
  array = np.asarray(value)
  if array.ndim > 1:
    raise ValueError(f"metric {name!r}: expected a scalar or 1-D value, "
                     f"got shape {array.shape}.")
  if array.dtype.kind not in "biuf":
    raise TypeError(f"metric {name!r}: unsupported dtype {array.dtype}.")
  return array.tolist()  # Python float/int (0-D) or list of them (1-D).


class Rate(NamedTuple):
  """Throughput over the latest interval; None when there is none yet."""
  tokens_per_sec: float | None
  eta_seconds: float | None


class StepTimer:
  """Tokens/s and ETA from the wall time between consecutive `update` calls.

  Rates come from the latest interval only, so a slow first interval (jit
  compilation) stops mattering after the next update. The first call only
  sets the baseline and returns Rate(None, None); call it once after the
  first (compiling) step so that no reported interval contains compile time.
  A call whose step is not past the previous one (e.g. eval metrics logged at
  the same step) returns Rate(None, None) and only moves the baseline to now,
  so time spent between the two calls (the eval) is not counted.
  """

  def __init__(self, total_steps: int, tokens_per_step: int,
               clock: Callable[[], float] = time.perf_counter):
    self._total_steps = total_steps
    self._tokens_per_step = tokens_per_step
    self._clock = clock
    self._last: tuple[int, float] | None = None

  def update(self, step: int) -> Rate:
    """Rate over the interval from the previous call to now."""
    now = self._clock()
    last, self._last = self._last, (step, now)
    if last is None or step <= last[0] or now <= last[1]:
      return Rate(None, None)
    seconds_per_step = (now - last[1]) / (step - last[0])
    tokens_per_sec = self._tokens_per_step / seconds_per_step
    eta = max(0, self._total_steps - step) * seconds_per_step
    return Rate(tokens_per_sec, eta)


def _format_rate(tokens_per_sec: float | None) -> str:
  if tokens_per_sec is None or not math.isfinite(tokens_per_sec):
    return "-- tok/s"
  for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
    if tokens_per_sec >= scale:
      return f"{tokens_per_sec / scale:.1f}{suffix} tok/s"
  return f"{tokens_per_sec:.0f} tok/s"


def _format_duration(seconds: float | None) -> str:
  if seconds is None or not math.isfinite(seconds):
    return "--"
  seconds = int(round(seconds))
  hours, rest = divmod(seconds, 3600)
  minutes, secs = divmod(rest, 60)
  if hours:
    return f"{hours}h{minutes:02d}m"
  if minutes:
    return f"{minutes}m{secs:02d}s"
  return f"{secs}s"


def _format_value(value: Any) -> str:
  if isinstance(value, (float, np.floating)):
    return f"{value:.4g}"
  return str(value)


def _format_flops(model_tflops: float | None, mfu: float | None) -> list[str]:
  if mfu is not None:
    return [f"MFU {mfu:.0%}" if mfu >= 0.1 else f"MFU {mfu:.1%}"]
  if model_tflops is not None:
    return [f"{model_tflops:.3g} TFLOP/s"]
  return []


def format_progress(step: int, total_steps: int, loss: float,
                    tokens_per_sec: float | None, eta_seconds: float | None,
                    extra: Mapping[str, Any] | None = None, *,
                    model_tflops: float | None = None, mfu: float | None = None) -> str:
  """E.g. `step   120/600 | loss 2.3145 | 41.2k tok/s | MFU 31% | ETA 3m12s`.

  The model FLOP rate shows as MFU when known, else as TFLOP/s.
  """
  width = max(5, len(str(total_steps)))
  parts = [f"step {step:>{width}d}/{total_steps}", f"loss {float(loss):.4f}",
           _format_rate(tokens_per_sec), *_format_flops(model_tflops, mfu),
           f"ETA {_format_duration(eta_seconds)}"]
  parts += [f"{k} {_format_value(v)}" for k, v in (extra or {}).items()]
  return " | ".join(parts)


def read_jsonl(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
  """Parsed records of a metrics file; unparsable (torn) lines are skipped."""
  records = []
  with open(path, encoding="utf-8") as f:
    for line in f:
      try:
        record = json.loads(line)
      except json.JSONDecodeError:
        continue
      if isinstance(record, dict) and "step" in record:
        records.append(record)
  return records


class MetricLogger:
  """Writes metrics of a (possibly resumed) run; no-op unless `is_chief`."""

  def __init__(self, workdir: str | os.PathLike[str], total_steps: int,
               tokens_per_step: int, is_chief: bool = True,
               rate_metrics: Callable[[float], Mapping[str, float]] | None = None):
    self.workdir = pathlib.Path(workdir)
    self.jsonl_path = self.workdir / JSONL_NAME
    self.tensorboard_dir = self.workdir / TENSORBOARD_DIR
    self.total_steps = total_steps
    self.is_chief = is_chief
    self.rate_metrics = rate_metrics
    self.timer = StepTimer(total_steps, tokens_per_step)
    self._jsonl = None
    self._writer = None
    self._purge_step: int | None = None

  # File handles are opened lazily so that `truncate_after` can run first.
  def _jsonl_file(self):
    if self._jsonl is None:
      self.workdir.mkdir(parents=True, exist_ok=True)
      self._jsonl = open(self.jsonl_path, "a", encoding="utf-8")
    return self._jsonl

  def _tb_writer(self):
    if self._writer is None:
      import tensorboardX  # pylint: disable=g-import-not-at-top
      self._writer = tensorboardX.SummaryWriter(
          logdir=str(self.tensorboard_dir), purge_step=self._purge_step,
          flush_secs=30)
    return self._writer

  def log(self, step: int, metrics: Mapping[str, Any]) -> Rate:
    """Logs scalars / 1-D arrays (numpy, jax, lists) / strings for `step`.

    Also ticks `self.timer` (on every process) and returns its Rate; when
    known, the rate is logged too, as `perf/tokens_per_sec`, with what
    `rate_metrics(tokens_per_sec)` derives from it (e.g. model TFLOP/s, MFU).
    """
    step = int(step)
    rate = self.timer.update(step)
    if not self.is_chief:
      return rate
    record = {"step": step}
    record.update((k, _to_json_value(k, v)) for k, v in metrics.items())
    if rate.tokens_per_sec is not None:
      record["perf/tokens_per_sec"] = rate.tokens_per_sec
      if self.rate_metrics is not None:
        record.update(self.rate_metrics(rate.tokens_per_sec))
    writer = self._tb_writer()
    for name, value in record.items():
      if name == "step" or isinstance(value, str):
        continue
      if isinstance(value, list):
        for i, element in enumerate(value):
          writer.add_scalar(f"{name}/{i}", element, step)
      else:
        writer.add_scalar(name, value, step)
    f = self._jsonl_file()
    f.write(json.dumps(record) + "\n")
    f.flush()
    return rate

  log_scalars = log

  def log_text(self, tag: str, text: str, step: int = 0) -> None:
    """A text entry in TensorBoard (markdown), e.g. the run's config."""
    if self.is_chief:
      self._tb_writer().add_text(tag, text, step)

  def truncate_after(self, step: int) -> None:
    """Keeps only JSONL records with step <= `step`; purges later TB events.

    The file is rewritten to a temporary file and swapped in with
    `os.replace`, so a crash leaves either the old or the new file intact.
    """
    if not self.is_chief:
      return
    self._purge_step = int(step) + 1
    if self._writer is not None:  # Reopen so the purge takes effect.
      self._writer.close()
      self._writer = None
    if self._jsonl is not None:
      self._jsonl.close()
      self._jsonl = None
    if not self.jsonl_path.exists():
      return
    kept = [r for r in read_jsonl(self.jsonl_path) if r["step"] <= step]
    atomic_write(self.jsonl_path, "".join(json.dumps(r) + "\n" for r in kept))

  def flush(self) -> None:
    if self._jsonl is not None:
      self._jsonl.flush()
    if self._writer is not None:
      self._writer.flush()

  def close(self) -> None:
    if self._jsonl is not None:
      self._jsonl.close()
      self._jsonl = None
    if self._writer is not None:
      self._writer.close()
      self._writer = None

  def __enter__(self) -> MetricLogger:
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()
