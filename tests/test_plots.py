"""Tests for moe_jax.training.plots."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest

from moe_jax.training import plots

_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_LAYERS = {1: 4, 3: 64, 5: 4}  # MoE layer -> number of experts.
_STEPS = list(range(10, 110, 10))
_EVAL_STEPS = (50, 100)
_RELOGGED = 30


def _load(rng, num_experts):
  return rng.dirichlet(np.ones(num_experts)).tolist()


def _train_record(rng, step):
  record = {"step": step, "loss": 3.0 - step / 100, "ce_loss": 2.9 - step / 100,
            "aux_loss": 0.01, "learning_rate": 1e-3}
  for layer, num_experts in _LAYERS.items():
    record[f"moe/layer_{layer}/expert_load"] = _load(rng, num_experts)
    record[f"moe/layer_{layer}/load_max_over_mean"] = 1.0 + step / 1000
  return record


def _synthetic_records():
  """Training records at 10..100, evals at 50 and 100, step 30 logged twice.

  Also an early layer-1 record with 8 experts (to be skipped) and a record
  lacking most keys.
  """
  rng = np.random.default_rng(0)
  records = [{"step": 5, "moe/layer_1/expert_load": _load(rng, 8)}]
  for step in _STEPS:
    records.append(_train_record(rng, step))
    if step in _EVAL_STEPS:
      records.append({"step": step, "eval/loss": 2.5 - step / 200,
                      "eval/bits_per_byte": 3.6})
  relogged = _train_record(rng, _RELOGGED)  # As a resumed run re-logs it.
  relogged["loss"] = relogged["ce_loss"] = 7.0
  records.append(relogged)
  records.append({"step": 110, "perf/tokens_per_sec": 1e4, "note": "text"})
  return records, relogged


def _write_jsonl(path, records):
  path.write_text("".join(json.dumps(r) + "\n" for r in records))
  return path


def _assert_png(path, min_bytes=5_000):
  data = path.read_bytes()
  assert data[:8] == _PNG_MAGIC
  assert len(data) > min_bytes
  width, height = struct.unpack(">II", data[16:24])  # IHDR chunk.
  return width, height


# ------------------------------------------------------------------- series


def test_loss_series_keeps_last_value_of_a_relogged_step():
  records, relogged = _synthetic_records()
  series = plots.loss_series(records)
  assert list(series) == ["loss", "ce_loss", "eval/loss"]
  steps, values = series["loss"]
  np.testing.assert_array_equal(steps, _STEPS)
  assert values.shape == (len(_STEPS),)
  assert values[_STEPS.index(_RELOGGED)] == relogged["loss"] == 7.0
  assert values[0] == pytest.approx(2.9)
  eval_steps, eval_values = series["eval/loss"]
  np.testing.assert_array_equal(eval_steps, _EVAL_STEPS)
  np.testing.assert_allclose(eval_values, [2.25, 2.0])


def test_scalar_series_skips_non_numeric_values():
  records = [{"step": 2, "loss": 1.0}, {"step": 1, "loss": 2.0},
             {"step": 3, "loss": None}, {"step": 4, "loss": True},
             {"step": 5}]
  steps, values = plots.scalar_series(records, "loss")
  np.testing.assert_array_equal(steps, [1, 2])
  np.testing.assert_array_equal(values, [2.0, 1.0])


def test_expert_load_series_shapes_and_last_value_of_a_relogged_step():
  records, relogged = _synthetic_records()
  series = plots.expert_load_series(records)
  assert list(series) == sorted(_LAYERS)
  for layer, num_experts in _LAYERS.items():
    steps, loads = series[layer]
    # Layer 1's 8-expert record at step 5 is skipped: its last record has 4.
    np.testing.assert_array_equal(steps, _STEPS)
    assert loads.shape == (len(_STEPS), num_experts)
    np.testing.assert_allclose(loads.sum(axis=1), 1.0)
    np.testing.assert_array_equal(loads[_STEPS.index(_RELOGGED)],
                                  relogged[f"moe/layer_{layer}/expert_load"])


def test_last_max_over_mean():
  records, _ = _synthetic_records()
  assert plots.last_max_over_mean(records, 3) == pytest.approx(1.1)
  assert plots.last_max_over_mean(records, 2) is None


def test_step_edges_cover_the_interval_each_record_averages():
  np.testing.assert_array_equal(plots.step_edges(np.array([10, 20, 25, 40])),
                                [0, 10, 20, 25, 40])
  np.testing.assert_array_equal(plots.step_edges(np.array([100, 300])),
                                [0, 100, 300])
  np.testing.assert_array_equal(plots.step_edges(np.array([600])), [0, 600])
  np.testing.assert_array_equal(plots.step_edges(np.array([0, 5])), [-5, 0, 5])


def test_heatmap_grid_is_load_times_num_experts():
  steps = np.array([10, 20, 35])  # Uneven spacing.
  loads = np.array([[0.25, 0.25, 0.25, 0.25],
                    [0.5, 0.25, 0.125, 0.125],
                    [1.0, 0.0, 0.0, 0.0]])
  x_edges, y_edges, relative = plots.heatmap_grid(steps, loads)
  np.testing.assert_array_equal(x_edges, [0, 10, 20, 35])
  np.testing.assert_array_equal(y_edges, [-0.5, 0.5, 1.5, 2.5, 3.5])
  assert relative.shape == (4, 3)  # [E, T]: experts on y, steps on x.
  np.testing.assert_array_equal(relative, loads.T * 4)
  np.testing.assert_array_equal(relative[:, 0], 1.0)  # Balanced.
  np.testing.assert_array_equal(relative[:, 2], [4, 0, 0, 0])


def test_merge_intervals_takes_the_mean_over_the_merged_steps():
  edges = np.array([0, 10, 20, 40, 50, 60])  # Interval widths 10, 10, 20, 10, 10.
  values = np.array([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5], [1.0, 0.0], [0.0, 1.0]])
  merged_edges, merged = plots.merge_intervals(edges, values, max_intervals=2)
  np.testing.assert_array_equal(merged_edges, [0, 40, 60])
  np.testing.assert_allclose(merged, [[0.5, 0.5], [0.5, 0.5]])
  merged_edges, merged = plots.merge_intervals(edges, values, max_intervals=3)
  np.testing.assert_array_equal(merged_edges, [0, 20, 50, 60])
  np.testing.assert_allclose(merged, [[0.5, 0.5], [2 / 3, 1 / 3], [0.0, 1.0]])
  same_edges, same = plots.merge_intervals(edges, values, max_intervals=5)
  np.testing.assert_array_equal(same_edges, edges)
  np.testing.assert_array_equal(same, values)


def test_heatmap_grid_with_max_columns_merges_records():
  steps = np.arange(1, 1001) * 10
  loads = np.tile([[0.7, 0.1, 0.1, 0.1]], (1000, 1))
  loads[1::2] = [0.1, 0.1, 0.1, 0.7]
  x_edges, _, relative = plots.heatmap_grid(steps, loads, max_columns=300)
  assert relative.shape == (4, 250)  # Pairs of records.
  np.testing.assert_array_equal(x_edges, np.arange(0, 10001, 40))
  np.testing.assert_allclose(relative, np.full((4, 250), [[1.6], [0.4], [0.4], [1.6]]))


# ------------------------------------------------------------------ figures


def test_expert_load_figure_draws_relative_load_at_real_steps():
  records, _ = _synthetic_records()
  series = plots.expert_load_series(records)
  fig = plots.expert_load_figure(
      series, {layer: plots.last_max_over_mean(records, layer)
               for layer in series})
  axes = [ax for ax in fig.axes if ax.get_title().startswith("MoE layer")]
  assert [ax.get_title() for ax in axes] == [
      "MoE layer 1: max/mean 1.1", "MoE layer 3: max/mean 1.1",
      "MoE layer 5: max/mean 1.1"]
  for ax, (steps, loads) in zip(axes, series.values()):
    (mesh,) = ax.collections
    drawn = np.asarray(mesh.get_array()).reshape(loads.shape[1], len(steps))
    np.testing.assert_allclose(drawn, loads.T * loads.shape[1])
    assert ax.get_xlim() == (0, _STEPS[-1])  # Step values, not indices.
    assert mesh.norm.vcenter == 1.0 and mesh.norm.vmin == 0.0
  (colorbar_ax,) = [ax for ax in fig.axes if ax not in axes and ax.get_visible()]
  assert colorbar_ax.get_ylabel() == "load / balanced (1 = 1/E)"
  # Two columns at most; the fourth grid cell is hidden.
  assert len({ax.get_position().x0 for ax in axes}) == 2


def test_expert_load_figure_height_grows_with_experts_but_is_capped():
  def height(num_experts):
    loads = np.full((3, num_experts), 1.0 / num_experts)
    fig = plots.expert_load_figure({0: (np.array([1, 2, 3]), loads)}, {})
    assert fig.axes[0].get_title() == "MoE layer 0"  # No max/mean logged.
    return fig.get_figheight()
  assert height(4) < height(64) < 8
  assert height(1024) == height(4096)


def test_loss_figure_has_train_and_held_out_lines():
  records, _ = _synthetic_records()
  fig = plots.loss_figure(plots.loss_series(records))
  (ax,) = fig.axes
  assert ax.get_title() == "loss"
  labels = [t.get_text() for t in ax.get_legend().get_texts()]
  assert labels == ["train loss", "train ce_loss", "held-out (eval/loss)"]
  held_out = ax.get_lines()[2]
  assert held_out.get_marker() == "o"
  np.testing.assert_array_equal(held_out.get_xdata(), _EVAL_STEPS)


# ------------------------------------------------------------------ writing


def test_plot_run_writes_both_pngs(tmp_path):
  _write_jsonl(tmp_path / "metrics.jsonl", _synthetic_records()[0])
  written = plots.plot_run(tmp_path)
  assert written == {"loss": str(tmp_path / "loss.png"),
                     "expert_load": str(tmp_path / "expert_load.png")}
  _assert_png(tmp_path / "loss.png")
  _assert_png(tmp_path / "expert_load.png")
  assert sorted(p.name for p in tmp_path.iterdir()) == [
      "expert_load.png", "loss.png", "metrics.jsonl"]  # No temporary files.


def test_plot_functions_return_their_paths(tmp_path):
  rng = np.random.default_rng(4)
  metrics = _write_jsonl(
      tmp_path / "metrics.jsonl",
      [{"step": s, "loss": 1.0 / s, "moe/layer_0/expert_load": _load(rng, 4)}
       for s in _STEPS])
  assert plots.plot_losses(metrics, tmp_path / "a.png") == str(tmp_path / "a.png")
  assert plots.plot_expert_load(str(metrics), str(tmp_path / "b.png")) == str(
      tmp_path / "b.png")
  _assert_png(tmp_path / "a.png")
  _assert_png(tmp_path / "b.png")


def test_plot_run_with_only_loss_records_writes_loss_png_only(tmp_path):
  _write_jsonl(tmp_path / "metrics.jsonl",
               [{"step": s, "loss": 1.0 / s} for s in _STEPS])
  assert plots.plot_run(tmp_path) == {"loss": str(tmp_path / "loss.png")}
  _assert_png(tmp_path / "loss.png")
  assert not (tmp_path / "expert_load.png").exists()


def test_plot_run_with_only_expert_load_records_skips_loss_png(tmp_path):
  rng = np.random.default_rng(1)
  _write_jsonl(tmp_path / "metrics.jsonl",
               [{"step": s, "moe/layer_0/expert_load": _load(rng, 4)}
                for s in _STEPS])
  assert plots.plot_run(tmp_path) == {
      "expert_load": str(tmp_path / "expert_load.png")}
  assert not (tmp_path / "loss.png").exists()


def test_plot_run_without_metrics_file(tmp_path):
  assert plots.plot_run(tmp_path) == {}
  assert list(tmp_path.iterdir()) == []


def test_plot_expert_load_without_expert_load_records(tmp_path):
  metrics = _write_jsonl(tmp_path / "metrics.jsonl",
                         [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 0.9}])
  with pytest.raises(ValueError, match=r"metrics\.jsonl.*expert_load.* 2 records"):
    plots.plot_expert_load(metrics, tmp_path / "x.png")
  assert not (tmp_path / "x.png").exists()


def test_plot_losses_without_loss_records(tmp_path):
  rng = np.random.default_rng(2)
  metrics = _write_jsonl(tmp_path / "metrics.jsonl",
                         [{"step": 1, "moe/layer_0/expert_load": _load(rng, 4)}])
  with pytest.raises(ValueError, match=r"metrics\.jsonl.*'eval/loss'.* 1 records"):
    plots.plot_losses(metrics, tmp_path / "x.png")
  assert not (tmp_path / "x.png").exists()


def test_many_experts_and_many_steps(tmp_path):
  rng = np.random.default_rng(3)
  steps = np.cumsum(rng.integers(1, 20, size=2000))  # Uneven spacing.
  records = [{"step": int(s), "loss": 1.0,
              "moe/layer_0/expert_load": _load(rng, 64)} for s in steps]
  fig = plots.expert_load_figure(plots.expert_load_series(records), {})
  (mesh,) = fig.axes[0].collections
  assert np.asarray(mesh.get_array()).size <= 64 * 300  # Records merged.
  assert fig.axes[0].get_xlim() == (2 * steps[0] - steps[1], steps[-1])
  metrics = _write_jsonl(tmp_path / "metrics.jsonl", records)
  plots.plot_expert_load(metrics, tmp_path / "load.png")
  width, height = _assert_png(tmp_path / "load.png", min_bytes=50_000)
  assert width <= 800 and height <= 700
