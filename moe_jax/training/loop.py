"""The training loop: config -> sharded state -> steps, eval, checkpoints, logs."""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import os
import time
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from moe_jax import data as data_lib
from moe_jax import sharding as sharding_lib
from moe_jax.config_validation import validate_config
from moe_jax.layers.transformer import TransformerLM
from moe_jax.training import steps
from moe_jax.training.checkpointing import Checkpointer, abstract_with_sharding
from moe_jax.training.metric_logging import MetricLogger, format_progress
from moe_jax.training.plots import plot_expert_load


class NonFiniteLossError(FloatingPointError):
  """The loss (or the state about to be saved) became NaN or inf; training
  stopped before saving anything non-finite."""


@dataclasses.dataclass(frozen=True)
class RunSummary:
  final_step: int
  heldout_loss: Optional[float]
  heldout_bits_per_byte: Optional[float]
  unigram_entropy_bits: float
  checkpoint_dir: str
  plot_path: Optional[str]


def _say(message: str) -> None:
  if jax.process_index() == 0:
    print(message, flush=True)


class _Run:
  """Everything built from the config once, before the first step."""

  def __init__(self, config: Any, workdir: str, devices=None):
    devices = list(jax.devices() if devices is None else devices)
    config = validate_config(config, len(devices))
    self.config = config
    self.workdir = workdir
    self.corpus = data_lib.load_corpus(config.data)
    self.mesh = sharding_lib.make_mesh(config.mesh.shape, devices)
    self.rules = sharding_lib.rules_from(config.mesh.rules)
    self.model = TransformerLM(config.model)
    self.optimizer = steps.make_optimizer(config.optimizer, config.train.num_steps)
    self.local_batch = config.data.batch_size // jax.process_count()
    sample = jnp.zeros((config.data.batch_size, config.data.seq_len), jnp.int32)
    init = functools.partial(steps.init_state, self.model, self.optimizer, sample_tokens=sample)
    with self.context():
      boxed = jax.eval_shape(init, jax.random.key(0))
    self.state_sharding = nn.logical_to_mesh_sharding(
        nn.get_partition_spec(boxed), self.mesh, self.rules)
    self.abstract_state = abstract_with_sharding(nn.meta.unbox(boxed), self.state_sharding)
    self._init = jax.jit(lambda rng: nn.meta.unbox(init(rng)),
                         out_shardings=self.state_sharding)
    self.batch_sharding = sharding_lib.batch_sharding(self.mesh, self.rules)
    replicated = sharding_lib.replicated(self.mesh)
    self.train_step = jax.jit(
        functools.partial(steps.train_step, model=self.model, optimizer=self.optimizer),
        in_shardings=(self.state_sharding, self.batch_sharding, replicated),
        out_shardings=(self.state_sharding, replicated), donate_argnums=(0,))
    self.eval_step = jax.jit(functools.partial(steps.eval_step, model=self.model),
                             in_shardings=(self.state_sharding, self.batch_sharding),
                             out_shardings=replicated)

  def context(self):
    return _Context(self.mesh, self.rules)

  def init_state(self):
    with self.context():
      return self._init(jax.random.key(self.config.seed))

  def global_batch(self, local: dict) -> dict:
    return {k: jax.make_array_from_process_local_data(self.batch_sharding, np.asarray(v))
            for k, v in local.items()}

  def train_iterator(self):
    return iter(data_lib.make_train_dataset(
        self.corpus.train, self.config.data.seq_len, self.local_batch,
        seed=self.config.seed, shard_index=jax.process_index(),
        shard_count=jax.process_count()))

  def evaluate(self, state) -> tuple[float, float]:
    total, count = 0.0, 0.0
    with self.context():
      for batch in data_lib.make_eval_batches(
          self.corpus.heldout, self.config.data.seq_len, self.local_batch,
          self.config.train.eval_batches, shard_index=jax.process_index(),
          shard_count=jax.process_count()):
        out = jax.device_get(self.eval_step(state, self.global_batch(batch)))
        total, count = total + float(out["loss_sum"]), count + float(out["count"])
    loss = total / count
    return loss, data_lib.bits_per_byte(loss)


class _Context:
  """The mesh and the logical-axis rules, entered together."""

  def __init__(self, mesh, rules):
    self._stack = contextlib.ExitStack()
    self._mesh, self._rules = mesh, rules

  def __enter__(self):
    self._stack.enter_context(jax.set_mesh(self._mesh))
    self._stack.enter_context(nn.logical_axis_rules(self._rules))

  def __exit__(self, *exc):
    return self._stack.__exit__(*exc)


def _stop(what: str, step: int, checkpointer: Checkpointer) -> None:
  checkpointer.wait()
  last = checkpointer.latest_step()
  where = (f"the last good checkpoint (step {last}) in {checkpointer.directory} is intact"
           if last is not None else "no checkpoint had been saved yet")
  raise NonFiniteLossError(
      f"{what} at step {step}; training stopped and nothing after step {last} was saved: "
      f"{where}. Lower optimizer.learning_rate or check the data.")


def _check_finite(step: int, metrics: dict, checkpointer: Checkpointer) -> float:
  loss = float(jax.device_get(metrics["loss"]))
  if not math.isfinite(loss):
    _stop(f"loss became {loss}", step, checkpointer)
  return loss


@jax.jit
def _state_is_finite(state) -> jax.Array:
  checks = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(state)
            if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack(checks))


def _check_state_finite(step: int, state, checkpointer: Checkpointer) -> None:
  # The step's loss was computed before its update; the saved state must be checked itself.
  if not bool(jax.device_get(_state_is_finite(state))):
    _stop("parameters or optimiser state became nan/inf", step, checkpointer)


def _host_metrics(metrics: dict) -> dict:
  out = {}
  for name, value in jax.device_get(metrics).items():
    value = np.asarray(value)
    out[name] = value.tolist() if value.ndim else float(value)
  return out


def train_and_evaluate(config: Any, workdir: str,
                       stop_after_steps: Optional[int] = None) -> RunSummary:
  """Trains (resuming from ``workdir`` if it holds checkpoints) and evaluates.

  ``stop_after_steps`` ends this invocation after that many steps with a
  checkpoint, as a preemption would; running again resumes the same run.
  """
  run = _Run(config, workdir)
  config = run.config
  tcfg = config.train
  entropy = data_lib.unigram_entropy_bits(run.corpus.train)
  checkpointer = Checkpointer(workdir, tcfg.keep_checkpoints)
  iterator = run.train_iterator()
  start = checkpointer.latest_step()
  if start is None:
    state, start = run.init_state(), 0
    _say(f"new run in {workdir}: {run.corpus.description}")
  else:
    state, data_state = checkpointer.restore(start, run.abstract_state)
    iterator.set_state(data_state)
    _say(f"resuming from step {start} in {checkpointer.directory}")
  num_params = sum(math.prod(x.shape) for x in jax.tree.leaves(run.abstract_state.params))
  _say(f"model: {num_params / 1e6:.2f}M parameters; devices: {jax.device_count()} "
       f"({jax.default_backend()}); mesh {dict(run.mesh.shape)}")

  tokens_per_step = config.data.batch_size * config.data.seq_len
  logger = MetricLogger(workdir, tcfg.num_steps, tokens_per_step,
                        is_chief=jax.process_index() == 0)
  logger.truncate_after(start)
  end = tcfg.num_steps if stop_after_steps is None else min(
      tcfg.num_steps, start + stop_after_steps)
  try:
    base_rng = jax.random.key(config.seed + 1)
    pending = None   # (step, metrics) whose loss has not been checked yet
    with run.context():
      for step in range(start, end):
        batch = run.global_batch(next(iterator))
        state, metrics = run.train_step(state, batch, base_rng)
        if pending is not None:
          _check_finite(*pending, checkpointer)
        pending = (step + 1, metrics)
        done = step + 1
        if done % tcfg.log_every == 0 or done == end:
          _check_finite(done, metrics, checkpointer)
          pending = None
          host = _host_metrics(metrics)
          rate = logger.log(done, host)
          _say(format_progress(done, tcfg.num_steps, host["loss"], rate.tokens_per_sec,
                               rate.eta_seconds))
        if done % tcfg.eval_every == 0 and done != tcfg.num_steps:
          loss, bpb = run.evaluate(state)
          logger.log(done, {"eval/loss": loss, "eval/bits_per_byte": bpb})
          _say(f"step {done}: held-out loss {loss:.4f} nats, {bpb:.4f} bits/byte")
        if done % tcfg.checkpoint_every == 0 or done == end:
          _check_finite(done, metrics, checkpointer)
          _check_state_finite(done, state, checkpointer)
          pending = None
          checkpointer.save(done, state, iterator.get_state())

    final = int(jax.device_get(state.step))
    heldout_loss = bpb = plot = None
    if final >= tcfg.num_steps:
      heldout_loss, bpb = run.evaluate(state)
      logger.log(final, {"eval/loss": heldout_loss, "eval/bits_per_byte": bpb})
      logger.flush()
      if jax.process_index() == 0 and config.model.moe_every > 0:
        plot = plot_expert_load(os.path.join(workdir, "metrics.jsonl"),
                                os.path.join(workdir, "expert_load.png"))
      _say(f"final held-out: {heldout_loss:.4f} nats/byte = {bpb:.4f} bits/byte; "
           f"unigram entropy of the training bytes: {entropy:.4f} bits/byte")
  finally:
    # Also on errors and interrupts: flush logs, finish any checkpoint in flight.
    checkpointer.close()
    logger.close()
  return RunSummary(final, heldout_loss, bpb, entropy, checkpointer.directory, plot)
