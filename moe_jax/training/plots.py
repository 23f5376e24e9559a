"""PNG plots of a run's metrics file (matplotlib Agg; no pyplot, no display).

Reads `<workdir>/metrics.jsonl` as `metric_logging.MetricLogger` writes it:
one `{"step": s, ...}` record per log call, where training records hold the
mean over the steps since the previous log (so the value at step s covers the
interval from the previous logged step to s) and held-out evaluations are
separate records holding `eval/...` keys. A resumed run may log a step again;
for each metric the last record holding it at that step wins.

- `plot_losses`: training and held-out loss over step.
- `plot_expert_load`: one heatmap per MoE layer of each expert's load relative
  to balanced routing (1.0 = 1/E of the assignments).
- `plot_run`: both, into the workdir, skipping what the file has no data for.

The series extraction (`scalar_series`, `loss_series`, `expert_load_series`,
`merge_intervals`, `heatmap_grid`) is pure and apart from the drawing, so it
can be tested.
"""

from __future__ import annotations

import math
import os
import pathlib
import re
import io
from typing import Any, Iterable, Mapping

import numpy as np
from matplotlib import colors
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from moe_jax.training import metric_logging
from moe_jax.training.files import atomic_write

LOSS_PNG = "loss.png"
EXPERT_LOAD_PNG = "expert_load.png"

TRAIN_LOSS_KEYS = ("loss", "ce_loss")
EVAL_LOSS_KEY = "eval/loss"

_EXPERT_LOAD_KEY = re.compile(r"^moe/layer_(\d+)/expert_load$")

Series = tuple[np.ndarray, np.ndarray]  # (steps [T], values [T] or [T, E])


# ------------------------------------------------------------ series (pure)


def _is_number(value: Any) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool)


def _last_per_step(records: Iterable[Mapping[str, Any]],
                   key: str) -> dict[int, Any]:
  """{step: value of `key`} over the records holding it; later records win."""
  points = {}
  for record in records:
    if key in record:
      points[int(record["step"])] = record[key]
  return points


def scalar_series(records: Iterable[Mapping[str, Any]], key: str) -> Series:
  """(steps, values) of a numeric metric, sorted by step, one value per step."""
  points = {s: v for s, v in _last_per_step(records, key).items()
            if _is_number(v)}
  steps = sorted(points)
  return (np.array(steps, dtype=np.int64),
          np.array([points[s] for s in steps], dtype=np.float64))


def loss_series(records: Iterable[Mapping[str, Any]]) -> dict[str, Series]:
  """{key: (steps, values)} for "loss", "ce_loss", "eval/loss" when present."""
  records = list(records)
  series = {}
  for key in (*TRAIN_LOSS_KEYS, EVAL_LOSS_KEY):
    steps, values = scalar_series(records, key)
    if steps.size:
      series[key] = (steps, values)
  return series


def _as_load_vector(value: Any) -> np.ndarray | None:
  if not isinstance(value, list) or not value or not all(map(_is_number, value)):
    return None
  return np.array(value, dtype=np.float64)


def expert_load_series(
    records: Iterable[Mapping[str, Any]]) -> dict[int, Series]:
  """{layer: (steps [T], loads [T, E])} from `moe/layer_<i>/expert_load`.

  Layers are in increasing order. The number of experts E of a layer is that
  of its last record; records with another count (e.g. from an earlier run
  with another config in the same workdir) are skipped.
  """
  records = list(records)
  layers = sorted({int(m.group(1)) for record in records for key in record
                   if (m := _EXPERT_LOAD_KEY.match(key))})
  series = {}
  for layer in layers:
    points = {}
    for step, value in _last_per_step(
        records, f"moe/layer_{layer}/expert_load").items():
      load = _as_load_vector(value)
      if load is not None:
        points[step] = load
    if not points:
      continue
    steps = sorted(points)
    num_experts = points[steps[-1]].size
    steps = [s for s in steps if points[s].size == num_experts]
    series[layer] = (np.array(steps, dtype=np.int64),
                     np.stack([points[s] for s in steps]))
  return series


def step_edges(steps: np.ndarray) -> np.ndarray:
  """[T + 1] x edges: the value logged at steps[t] covers (steps[t-1], steps[t]].

  The first interval is taken as wide as the second (as wide as steps[0] for a
  single record), but starts no earlier than step 0.
  """
  steps = np.asarray(steps, dtype=np.float64)
  width = steps[1] - steps[0] if steps.size > 1 else max(steps[0], 1.0)
  first = steps[0] - width
  if steps[0] > 0:
    first = max(first, 0.0)
  return np.concatenate([[first], steps])


def merge_intervals(edges: np.ndarray, values: np.ndarray,
                    max_intervals: int) -> tuple[np.ndarray, np.ndarray]:
  """At most `max_intervals` runs of consecutive intervals, each value their mean.

  `values` [T, ...] are per-interval means over `edges` [T+1]; a merged
  interval's value is the step-weighted mean, i.e. the mean over its steps,
  just as if it had been logged as one interval.
  """
  group = math.ceil(len(values) / max_intervals)
  if group <= 1:
    return edges, values
  starts = np.arange(0, len(values), group)
  widths = np.diff(edges).reshape(-1, *[1] * (values.ndim - 1))
  sums = np.add.reduceat(values * widths, starts, axis=0)
  return (np.append(edges[starts], edges[-1]),
          sums / np.add.reduceat(widths, starts, axis=0))


def heatmap_grid(
    steps: np.ndarray, loads: np.ndarray, max_columns: int | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(x edges [T'+1], y edges [E+1], colour [E, T'] = load * E) for pcolormesh.

  With `max_columns`, runs of consecutive records are merged (see
  `merge_intervals`) so that T' <= max_columns.
  """
  loads = np.asarray(loads, dtype=np.float64)
  x_edges = step_edges(steps)
  if max_columns is not None:
    x_edges, loads = merge_intervals(x_edges, loads, max_columns)
  num_experts = loads.shape[1]
  return x_edges, np.arange(num_experts + 1) - 0.5, loads.T * num_experts


def last_max_over_mean(records: Iterable[Mapping[str, Any]],
                       layer: int) -> float | None:
  """The latest logged `moe/layer_<layer>/load_max_over_mean`, if any."""
  _, values = scalar_series(records, f"moe/layer_{layer}/load_max_over_mean")
  return float(values[-1]) if values.size else None


# ------------------------------------------------------------------ figures


def loss_figure(series: Mapping[str, Series]) -> Figure:
  """Training losses as lines and held-out loss as markers, in nats."""
  fig = Figure(figsize=(8, 4.5), layout="constrained")
  FigureCanvasAgg(fig)
  ax = fig.add_subplot()
  for key in TRAIN_LOSS_KEYS:
    if key in series:
      ax.plot(*series[key], linewidth=1.2, label=f"train {key}")
  if EVAL_LOSS_KEY in series:
    ax.plot(*series[EVAL_LOSS_KEY], marker="o", markersize=4, linewidth=1,
            color="black", label=f"held-out ({EVAL_LOSS_KEY})")
  ax.set_title("loss")
  ax.set_xlabel("step")
  ax.set_ylabel("loss (nats)")
  ax.grid(True, alpha=0.3)
  ax.legend()
  return fig


# Columns per heatmap: about two pixels each at the subplot's width. More
# records than that would alias (Agg keeps one of the quads sharing a pixel).
_MAX_COLUMNS = 300


def _row_height(num_experts: int) -> float:
  """Inches per subplot row: grows with E so expert rows stay legible, capped."""
  return min(2.5 + 0.05 * num_experts, 6.0)


def expert_load_figure(series: Mapping[int, Series],
                       max_over_mean: Mapping[int, float | None]) -> Figure:
  """One load heatmap per layer (at most two columns) with a shared colorbar."""
  grids = {layer: heatmap_grid(steps, loads, _MAX_COLUMNS)
           for layer, (steps, loads) in series.items()}
  observed = [c[np.isfinite(c)].max() for _, _, c in grids.values()
              if np.isfinite(c).any()]
  # One norm for all layers so equal colours mean equal imbalance everywhere.
  norm = colors.TwoSlopeNorm(vcenter=1.0, vmin=0.0,
                             vmax=max([2.0, *observed]))

  cols = min(len(grids), 2)
  rows = math.ceil(len(grids) / cols)
  max_experts = max(c.shape[0] for _, _, c in grids.values())
  fig = Figure(figsize=(6.5 * cols + 1.0, _row_height(max_experts) * rows),
               layout="constrained")
  FigureCanvasAgg(fig)
  axes = fig.subplots(rows, cols, squeeze=False).reshape(-1)
  mesh = None
  for ax, (layer, (x_edges, y_edges, relative)) in zip(axes, grids.items()):
    mesh = ax.pcolormesh(x_edges, y_edges, relative, cmap="RdBu_r", norm=norm,
                         shading="flat")
    title = f"MoE layer {layer}"
    if max_over_mean.get(layer) is not None:
      title += f": max/mean {max_over_mean[layer]:.3g}"
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.set_ylabel("expert")
    ax.yaxis.set_major_locator(MaxNLocator(nbins=16, integer=True))
  for ax in axes[len(grids):]:
    ax.set_visible(False)
  colorbar = fig.colorbar(mesh, ax=axes[:len(grids)].tolist(), shrink=0.9)
  colorbar.set_label("load / balanced (1 = 1/E)")
  return fig


def _save_png(fig: Figure, out_png_path: str | os.PathLike[str]) -> str:
  """Written atomically, so a viewer never reads a half-written PNG."""
  buffer = io.BytesIO()
  fig.savefig(buffer, format="png", dpi=100)
  atomic_write(out_png_path, buffer.getvalue())
  return str(out_png_path)


# --------------------------------------------------------------- public API


def _write_losses(records: list[dict[str, Any]],
                  out_png_path: str | os.PathLike[str]) -> str | None:
  series = loss_series(records)
  if not series:
    return None
  return _save_png(loss_figure(series), out_png_path)


def _write_expert_load(records: list[dict[str, Any]],
                       out_png_path: str | os.PathLike[str]) -> str | None:
  series = expert_load_series(records)
  if not series:
    return None
  max_over_mean = {layer: last_max_over_mean(records, layer) for layer in series}
  return _save_png(expert_load_figure(series, max_over_mean), out_png_path)


def plot_losses(metrics_jsonl_path: str | os.PathLike[str],
                out_png_path: str | os.PathLike[str]) -> str:
  """Training ("loss", "ce_loss") and held-out ("eval/loss") loss over step.

  Returns `out_png_path` as a string.

  Raises:
    ValueError: when the file has neither training nor held-out loss.
  """
  records = metric_logging.read_jsonl(metrics_jsonl_path)
  out = _write_losses(records, out_png_path)
  if out is None:
    keys = ", ".join(repr(k) for k in (*TRAIN_LOSS_KEYS, EVAL_LOSS_KEY))
    raise ValueError(
        f"{metrics_jsonl_path}: no training or held-out loss ({keys}) found "
        f"in {len(records)} records; nothing to plot.")
  return out


def plot_expert_load(metrics_jsonl_path: str | os.PathLike[str],
                     out_png_path: str | os.PathLike[str]) -> str:
  """Per-layer heatmaps of each expert's load relative to balanced, over step.

  Colour is `load * E` from the `moe/layer_<i>/expert_load` lists: white is
  balanced (1/E of the assignments), red overloaded, blue underused.
  Returns `out_png_path` as a string.

  Raises:
    ValueError: when the file has no expert-load records.
  """
  records = metric_logging.read_jsonl(metrics_jsonl_path)
  out = _write_expert_load(records, out_png_path)
  if out is None:
    raise ValueError(
        f"{metrics_jsonl_path}: no 'moe/layer_<i>/expert_load' metrics found "
        f"in {len(records)} records; nothing to plot.")
  return out


def plot_run(workdir: str | os.PathLike[str]) -> dict[str, str]:
  """Writes `loss.png` and `expert_load.png` into `workdir` where data exists.

  Returns {"loss": path, "expert_load": path} for the files written; {} when
  `workdir` has no metrics file.
  """
  workdir = pathlib.Path(workdir)
  metrics_path = workdir / metric_logging.JSONL_NAME
  if not metrics_path.exists():
    return {}
  records = metric_logging.read_jsonl(metrics_path)
  written = {
      "loss": _write_losses(records, workdir / LOSS_PNG),
      "expert_load": _write_expert_load(records, workdir / EXPERT_LOAD_PNG),
  }
  return {name: path for name, path in written.items() if path is not None}
