"""Training: sharded step == single-device step, resume == uninterrupted, NaN stop."""
import json
import os

import jax
import numpy as np
import pytest

from configs.base import base_config
from moe_jax.training import loop


def tiny_config(router="topk", steps=6, **router_overrides):
  c = base_config(router)
  m = c.model
  m.d_model, m.num_layers, m.num_heads, m.head_dim, m.d_ff, m.moe_every = 32, 2, 2, 16, 64, 1
  m.moe.num_experts, m.moe.d_expert = 8, 32
  for k, v in router_overrides.items():
    m.moe.router[k] = v
  c.data.max_bytes, c.data.seq_len, c.data.batch_size = 60_000, 16, 8
  c.train.num_steps, c.train.log_every, c.train.eval_every = steps, 1, 1000
  c.train.checkpoint_every, c.train.eval_batches, c.train.keep_checkpoints = 3, 2, 3
  c.optimizer.warmup_steps = 2
  return c


def leaves(tree):
  return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(tree))]


def run_steps(config, devices, num_steps):
  run = loop._Run(config, "/unused", devices=devices)
  state = run.init_state()
  iterator = run.train_iterator()
  base_rng = jax.random.key(1)
  metrics = None
  with run.context():
    for _ in range(num_steps):
      state, metrics = run.train_step(state, run.global_batch(next(iterator)), base_rng)
  return state, jax.device_get(metrics), run


@pytest.mark.parametrize("router,dispatch,mesh", [
    ("topk", "dropless", dict(data=2, fsdp=2, expert=2, tensor=1)),
    ("sigmoid_topk", "capacity", dict(data=2, fsdp=2, expert=2, tensor=1)),
    ("topk", "capacity", dict(data=1, fsdp=2, expert=2, tensor=2)),
])
def test_sharded_train_step_matches_single_device(router, dispatch, mesh):
  assert jax.device_count() >= 8, "conftest sets 8 simulated CPU devices"
  groups = dict(num_groups=2, topk_groups=2) if router == "sigmoid_topk" else {}
  config = tiny_config(router, **groups)
  config.model.moe.dispatch = dispatch
  single_state, single_metrics, _ = run_steps(config, jax.devices()[:1], 2)
  config.mesh.shape.update(**mesh)
  sharded_state, sharded_metrics, run = run_steps(config, jax.devices()[:8], 2)
  # Expert weights really are split over the expert axis.
  w_gate_up = sharded_state.params["layer_0"]["moe"]["experts"]["w_gate_up"]
  assert w_gate_up.sharding.spec[0] == "expert" and len(w_gate_up.sharding.device_set) == 8
  for a, b in zip(leaves(single_state), leaves(sharded_state)):
    np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6)
  for name in ("loss", "aux_loss", "grad_norm"):
    np.testing.assert_allclose(single_metrics[name], sharded_metrics[name], rtol=2e-5)


def read_losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return {r["step"]: r["loss"] for r in map(json.loads, f) if "loss" in r}


def test_resume_continues_the_same_run(tmp_path):
  config = tiny_config("sigmoid_topk", steps=6)  # router bias state must survive too
  full = loop.train_and_evaluate(config, str(tmp_path / "full"))
  part = loop.train_and_evaluate(config, str(tmp_path / "resumed"), stop_after_steps=3)
  assert part.final_step == 3 and part.heldout_loss is None
  resumed = loop.train_and_evaluate(config, str(tmp_path / "resumed"))
  assert resumed.final_step == full.final_step == 6
  # Same data order and parameters: per-step losses and final eval are bitwise equal.
  assert read_losses(tmp_path / "full") == read_losses(tmp_path / "resumed")
  assert resumed.heldout_loss == full.heldout_loss
  run = loop._Run(config, str(tmp_path))
  ckpt_full = loop.Checkpointer(str(tmp_path / "full"), 3)
  ckpt_res = loop.Checkpointer(str(tmp_path / "resumed"), 3)
  a, data_a = ckpt_full.restore(6, run.abstract_state)
  b, data_b = ckpt_res.restore(6, run.abstract_state)
  assert data_a == data_b
  for x, y in zip(leaves(a), leaves(b)):
    np.testing.assert_array_equal(x, y)
  assert np.any(leaves(a.router_state)[0] != 0)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
  config = tiny_config(steps=12)
  config.train.checkpoint_every = 2
  workdir = str(tmp_path)
  loop.train_and_evaluate(config, workdir, stop_after_steps=2)
  run = loop._Run(config, workdir)
  good, _ = loop.Checkpointer(workdir, 3).restore(2, run.abstract_state)
  good = leaves(good)
  config.optimizer.learning_rate = 1e38  # updates overflow float32 within a few steps
  with pytest.raises(loop.NonFiniteLossError,
                     match=r"(loss became (nan|inf)|parameters .* became nan/inf) at step \d+.*"
                     r"last good checkpoint \(step \d+\)"):
    loop.train_and_evaluate(config, workdir, allow_config_change=["optimizer.learning_rate"])
  checkpointer = loop.Checkpointer(workdir, 3)
  steps = checkpointer.all_steps()
  assert steps and max(steps) < 12
  for step in steps:  # nothing non-finite was ever written
    state, _ = checkpointer.restore(step, run.abstract_state)
    assert all(np.isfinite(x).all() for x in leaves(state.params))
  if 2 in steps:
    restored, _ = checkpointer.restore(2, run.abstract_state)
    for x, y in zip(good, leaves(restored)):
      np.testing.assert_array_equal(x, y)


def test_short_run_loss_falls_and_leaves_artifacts(tmp_path):
  config = tiny_config(steps=40)
  config.optimizer.learning_rate = 1e-2
  config.train.log_every = 5
  summary = loop.train_and_evaluate(config, str(tmp_path))
  losses = read_losses(tmp_path)
  assert losses[40] < losses[5] - 0.5, losses
  # 40 steps on 60 kB: better than a uniform byte model (8 bits); the demo shows more.
  assert summary.heldout_bits_per_byte < 8.0
  assert all(os.path.getsize(summary.plots[name]) > 1000 for name in ("loss", "expert_load"))
  assert os.listdir(tmp_path / "tensorboard")
  # Every 3 steps and at the end, keeping the last keep_checkpoints=3.
  assert loop.Checkpointer(str(tmp_path), 3).all_steps() == [36, 39, 40]
