"""Plots of logged MoE metrics (matplotlib Agg; no display needed)."""

from __future__ import annotations

import math
import os
import re
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from moe_jax.training import metric_logging

_EXPERT_LOAD_KEY = re.compile(r"^moe/layer_(\d+)/expert_load$")


def _expert_load_series(
    records: list[dict[str, Any]],
) -> dict[int, tuple[np.ndarray, np.ndarray]]:
  """{layer: (steps [T], loads [T, E])}; a re-logged step keeps its last value."""
  by_layer: dict[int, dict[int, list[float]]] = {}
  for record in records:
    for key, value in record.items():
      match = _EXPERT_LOAD_KEY.match(key)
      if match and isinstance(value, list) and value:
        by_layer.setdefault(int(match.group(1)), {})[record["step"]] = value
  series = {}
  for layer, points in sorted(by_layer.items()):
    steps = sorted(points)
    num_experts = len(points[steps[-1]])
    steps = [s for s in steps if len(points[s]) == num_experts]
    series[layer] = (np.array(steps), np.array([points[s] for s in steps]))
  return series


def plot_expert_load(metrics_jsonl_path: str | os.PathLike[str],
                     out_png_path: str | os.PathLike[str]) -> str:
  """Per-expert load fraction over training, one subplot per MoE layer.

  Reads `moe/layer_<i>/expert_load` lists (fraction of routed assignments per
  expert) from the metrics JSONL; the dashed line is the balanced load 1/E.
  Returns `out_png_path` as a string.

  Raises:
    ValueError: when the file has no expert-load records.
  """
  records = metric_logging.read_jsonl(metrics_jsonl_path)
  series = _expert_load_series(records)
  if not series:
    raise ValueError(
        f"{metrics_jsonl_path}: no 'moe/layer_<i>/expert_load' metrics found "
        f"in {len(records)} records; nothing to plot.")

  cols = min(len(series), 2)
  rows = math.ceil(len(series) / cols)
  fig = Figure(figsize=(6 * cols, 3.5 * rows), layout="constrained")
  FigureCanvasAgg(fig)
  axes = fig.subplots(rows, cols, squeeze=False).reshape(-1)
  for ax, (layer, (steps, loads)) in zip(axes, series.items()):
    num_experts = loads.shape[1]
    for expert in range(num_experts):
      ax.plot(steps, loads[:, expert], linewidth=1, label=f"expert {expert}")
    ax.axhline(1.0 / num_experts, color="black", linestyle="--", linewidth=1,
               label="balanced (1/E)")
    ax.set_title(f"MoE layer {layer}")
    ax.set_xlabel("step")
    ax.set_ylabel("fraction of assignments")
    ax.set_ylim(bottom=0)
    if num_experts <= 16:
      ax.legend(fontsize="x-small", loc="upper left", bbox_to_anchor=(1.01, 1))
  for ax in axes[len(series):]:
    ax.set_visible(False)
  fig.savefig(out_png_path, dpi=100)
  return str(out_png_path)
