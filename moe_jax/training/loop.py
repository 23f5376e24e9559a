"""The training loop: config -> sharded state -> steps, eval, checkpoints, logs."""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
import signal
import time
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from moe_jax import data as data_lib
from moe_jax import flops as flops_lib
from moe_jax import profiling
from moe_jax import sharding as sharding_lib
from moe_jax.config_fields import ConfigError
from moe_jax.config_validation import attention_for, validate_config
from moe_jax.layers.transformer import TransformerLM
from moe_jax.ops import device
from moe_jax.training import steps
from moe_jax.training import workdir as workdir_lib
from moe_jax.training.checkpointing import Checkpointer, abstract_with_sharding
from moe_jax.training.metric_logging import MetricLogger, format_progress
from moe_jax.training.plots import plot_run
from moe_jax.training.resume_check import record_config
from moe_jax.training.preemption import StopSignals, StopVote, TrainingInterrupted


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
  plots: dict          # {"loss": path, "expert_load": path}, those written


def _say(message: str) -> None:
  if jax.process_index() == 0:
    print(message, flush=True)


class _Run:
  """Everything built from the config once, before the first step."""

  def __init__(self, config: Any, workdir: str, devices=None, load_data: bool = True):
    devices = list(jax.devices() if devices is None else devices)
    where = dict(platform=devices[0].platform,
                 compute_capability=device.compute_capability(devices[0]))
    config = validate_config(config, len(devices), **where)
    self.config = config
    self.attention = attention_for(config, len(devices), **where).name
    self.workdir = workdir
    # Without data (benchmarks of the step alone) there is no iterator or evaluation.
    self.corpus = data_lib.load_corpus(config.data) if load_data else None
    self.mesh = sharding_lib.make_mesh(config.mesh.shape, devices)
    self.rules = sharding_lib.rules_from(config.mesh.rules)
    self.model = TransformerLM(config.model)
    self.optimizer = steps.make_optimizer(config.optimizer, config.train.num_steps)
    self.schedule = steps.learning_rate_schedule(config.optimizer, config.train.num_steps)
    self.local_batch = config.data.batch_size // jax.process_count()
    init = _init_fn(config, self.model, self.optimizer)
    with self.context():
      boxed = jax.eval_shape(init, jax.random.key(0))
    self.state_sharding = nn.logical_to_mesh_sharding(
        nn.get_partition_spec(boxed), self.mesh, self.rules)
    self.abstract_state = abstract_with_sharding(nn.meta.unbox(boxed), self.state_sharding)
    self._init = jax.jit(lambda rng: nn.meta.unbox(init(rng)),
                         out_shardings=self.state_sharding)
    self.batch_sharding = sharding_lib.batch_sharding(self.mesh, self.rules)
    self.vote_sharding = NamedSharding(self.mesh, PartitionSpec(self.batch_sharding.spec[0]))
    replicated = sharding_lib.replicated(self.mesh)
    self.state_summary = jax.jit(_state_summary, out_shardings=replicated)
    self.train_step = jax.jit(
        functools.partial(steps.train_step, model=self.model, optimizer=self.optimizer),
        in_shardings=(self.state_sharding, self.batch_sharding, replicated),
        out_shardings=(self.state_sharding, replicated), donate_argnums=(0,))
    self.eval_step = jax.jit(functools.partial(steps.eval_step, model=self.model),
                             in_shardings=(self.state_sharding, self.batch_sharding),
                             out_shardings=replicated)

  def context(self):
    return _Context(self.mesh, self.rules)

  def state_shapes(self, config) -> Any:
    """(shape, dtype) of every leaf of the train state ``config`` would build."""
    init = _init_fn(config, TransformerLM(config.model),
                    steps.make_optimizer(config.optimizer, config.train.num_steps))
    with self.context():
      boxed = jax.eval_shape(init, jax.random.key(0))
    return jax.tree.map(lambda x: (x.shape, str(x.dtype)), nn.meta.unbox(boxed))

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

  def evaluate(self, state, max_batches: int) -> "Evaluation":
    """Held-out loss over the first ``max_batches`` batches (0: the whole split)."""
    total, count = 0.0, 0.0
    with self.context():
      for batch in data_lib.make_eval_batches(
          self.corpus.heldout, self.config.data.seq_len, self.local_batch, max_batches,
          shard_index=jax.process_index(), shard_count=jax.process_count()):
        out = jax.device_get(self.eval_step(state, self.global_batch(batch)))
        total, count = total + float(out["loss_sum"]), count + float(out["count"])
    loss = total / count
    targets = max(len(self.corpus.heldout) - 1, 1)
    return Evaluation(loss, data_lib.bits_per_byte(loss), int(count), min(1.0, count / targets))


@dataclasses.dataclass(frozen=True)
class Evaluation:
  loss: float                # nats per byte
  bits_per_byte: float
  targets: int               # held-out bytes predicted
  coverage: float            # their share of the held-out split

  def describe(self) -> str:
    return (f"held-out loss {self.loss:.4f} nats = {self.bits_per_byte:.4f} bits/byte over "
            f"{self.targets:,} bytes ({100 * self.coverage:.0f}% of the held-out split)")


def _init_fn(config, model, optimizer):
  sample = jnp.zeros((config.data.batch_size, config.data.seq_len), jnp.int32)
  return functools.partial(steps.init_state, model, optimizer, sample_tokens=sample)


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


def _host_means(sums: dict, num_steps: int) -> dict:
  """Per-step means of metrics summed over ``num_steps`` steps, as Python values."""
  out = {}
  for name, value in jax.device_get(sums).items():
    value = np.asarray(value, np.float64) / num_steps
    out[name] = value.tolist() if value.ndim else float(value)
  return out


@jax.jit
def _add(a, b):
  return jax.tree.map(jnp.add, a, b)


def _state_summary(router_state) -> dict:
  """Mean, std, min and max of each router state leaf (e.g. the sigmoid router's bias)."""
  stats = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(router_state)[0]:
    name = "router_state/" + "/".join(str(getattr(k, "key", k)) for k in path)
    leaf = leaf.astype(jnp.float32)
    stats.update({f"{name}/mean": jnp.mean(leaf), f"{name}/std": jnp.std(leaf),
                  f"{name}/min": jnp.min(leaf), f"{name}/max": jnp.max(leaf)})
  return stats


def check_profile_steps(profile_steps: Optional[tuple[int, int]], num_steps: int) -> None:
  """Steps A to B-1 of a run of ``num_steps``: 0 <= A < B <= num_steps."""
  if profile_steps is None:
    return
  first, stop = profile_steps
  if not 0 <= first < stop <= num_steps:
    raise ConfigError(f"profile_steps={first}:{stop}; allowed: A:B with 0 <= A < B <= "
                      f"train.num_steps ({num_steps}), tracing steps A to B-1")


def train_and_evaluate(config: Any, workdir: str, stop_after_steps: Optional[int] = None,
                       strict_resume: bool = False,
                       allow_config_change: Sequence[str] = (),
                       profile_steps: Optional[tuple[int, int]] = None) -> RunSummary:
  """Trains (resuming from ``workdir`` if it holds checkpoints) and evaluates.

  ``stop_after_steps`` ends this invocation after that many steps with a
  checkpoint, as a preemption would; running again resumes the same run.
  SIGTERM or SIGINT stop the run the same way and raise TrainingInterrupted.
  A resume refuses a config that differs from the recorded one, except in the
  fields (or ``section.*`` patterns) that ``allow_config_change`` lists; a
  latest checkpoint that fails to restore is set aside for the previous one
  unless ``strict_resume``. ``profile_steps=(A, B)`` traces steps A to B-1 (counted
  from 0) into ``<workdir>/profile`` and prints their top device kernels.
  """
  run = _Run(config, workdir)   # every config error is raised here, before anything is written
  config = run.config
  tcfg = config.train
  check_profile_steps(profile_steps, tcfg.num_steps)
  chief = jax.process_index() == 0
  lock = workdir_lib.WorkdirLock(workdir) if chief else None
  if lock is not None:
    note = lock.acquire()
    if note:
      _say(note)
  checkpointer = None
  try:
    with StopSignals(_say) as signals:
      checkpointer = Checkpointer(workdir, tcfg.keep_checkpoints)
      record = record_config(run.config, run.state_shapes, workdir,
                             checkpointer.latest_step() is not None, allow_config_change, _say)
      summary = _train(run, workdir, checkpointer, signals, stop_after_steps, strict_resume,
                       record, profile_steps)
  finally:
    if checkpointer is not None:
      checkpointer.close()
    if lock is not None:
      lock.release()
  return summary


def _train(run: _Run, workdir: str, checkpointer: Checkpointer, signals: StopSignals,
           stop_after_steps: Optional[int], strict_resume: bool, record: dict,
           profile_steps: Optional[tuple[int, int]]) -> RunSummary:
  config, tcfg = run.config, run.config.train
  entropy = data_lib.unigram_entropy_bits(run.corpus.train)
  iterator = run.train_iterator()
  restored = checkpointer.restore_latest_good(run.abstract_state, strict_resume, say=_say)
  if restored is None:
    state, start = run.init_state(), 0
    _say(f"new run in {workdir}: {run.corpus.description}")
  else:
    state, start = restored.state, restored.step
    iterator.set_state(restored.data_state)
    for note in restored.notes:
      _say(note)
    _say(f"resuming from step {start} in {checkpointer.directory}")
  num_params = sum(math.prod(x.shape) for x in jax.tree.leaves(run.abstract_state.params))
  flop_count = flops_lib.model_flops_per_token(config.model, config.data.seq_len,
                                               batch_size=config.data.batch_size)
  device_kind = jax.devices()[0].device_kind
  peak = flops_lib.peak_tflops(device_kind)
  _say(f"model: {num_params / 1e6:.2f}M parameters; {flop_count.describe()}; devices: "
       f"{jax.device_count()} ({jax.default_backend()}); mesh {dict(run.mesh.shape)}; "
       + (f"{device_kind}: peak {peak:g} bf16 TFLOP/s a device" if peak else
          f"{device_kind}: bf16 peak unknown (no MFU)"))
  perf = functools.partial(flops_lib.throughput, flops_per_token=flop_count.total,
                           num_devices=jax.device_count(), peak=peak)

  tokens_per_step = config.data.batch_size * config.data.seq_len
  logger = MetricLogger(workdir, tcfg.num_steps, tokens_per_step,
                        is_chief=jax.process_index() == 0, rate_metrics=perf)
  logger.truncate_after(start)
  if start == 0:
    logger.log_text("config", "```\n" + json.dumps(record, indent=2) + "\n```")
  end = tcfg.num_steps if stop_after_steps is None else min(
      tcfg.num_steps, start + stop_after_steps)
  try:
    profiler = profiling.StepProfiler(profile_steps, _profile_dir(workdir), _say)
    try:
      state, stopped_by = _train_steps(run, state, iterator, start, end, checkpointer, logger,
                                       signals, perf, profiler)
    finally:
      profiler.close()
    signals.restore()   # from here on (the final evaluation), a signal acts as usual
    final = int(jax.device_get(state.step))
    if stopped_by is not None:
      logger.flush()
      name = signal.Signals(stopped_by).name
      raise TrainingInterrupted(
          f"stopped by {name} at step {final}; its checkpoint is in {checkpointer.directory}. "
          "Run the same command again to resume.", stopped_by, final)
    heldout = None
    plots = {}
    if final >= tcfg.num_steps:
      heldout = run.evaluate(state, tcfg.final_eval_batches)
      logger.log(final, {"eval/loss": heldout.loss, "eval/bits_per_byte": heldout.bits_per_byte,
                         "eval/coverage": heldout.coverage})
      logger.flush()
      if jax.process_index() == 0:
        plots = plot_run(workdir)
      _say(f"final {heldout.describe()}; unigram entropy of the training bytes: "
           f"{entropy:.4f} bits/byte")
      if plots:
        _say("plots: " + ", ".join(plots.values()))
  finally:
    logger.close()   # also on errors and interrupts
  return RunSummary(final, heldout and heldout.loss, heldout and heldout.bits_per_byte, entropy,
                    checkpointer.directory, plots)


def _profile_dir(workdir: str) -> str:
  directory = os.path.join(workdir, "profile")
  if jax.process_count() > 1:
    directory = os.path.join(directory, f"process_{jax.process_index()}")
  return directory


def _train_steps(run: _Run, state, iterator, start: int, end: int, checkpointer: Checkpointer,
                 logger: MetricLogger, signals: StopSignals, perf, profiler):
  """Steps ``start`` to ``end`` (fewer when a signal stops them); returns the
  state and the signal that stopped them, if one did."""
  tcfg = run.config.train
  if start >= end:
    return state, None
  base_rng = jax.random.key(run.config.seed + 1)
  first_batch = run.global_batch(next(iterator))
  _say(f"compiling the train step (attention: {run.attention})...")
  began = time.perf_counter()
  with run.context():
    train_step = run.train_step.lower(state, first_batch, base_rng).compile()
  _say(f"compiled in {time.perf_counter() - began:.1f} s; training")
  logger.timer.update(start)
  vote = StopVote(run.vote_sharding, run.local_batch)
  pending = None          # (step, metrics) whose loss has not been checked yet
  sums, summed = None, 0  # metrics summed since the last log, over that many steps
  stop = False
  with run.context():
    for step in range(start, end):
      batch = first_batch if step == start else run.global_batch(next(iterator))
      profiler.before_step(step)
      state, metrics = train_step(state, batch, base_rng)
      profiler.after_step(step, (state, metrics))
      sums, summed = (metrics if sums is None else _add(sums, metrics)), summed + 1
      if pending is not None:
        _check_finite(*pending, checkpointer)
      pending = (step + 1, metrics)
      stop = vote.cast(signals.signum is not None)
      done = step + 1
      last = done == end or stop
      if done % tcfg.log_every == 0 or last:
        _check_finite(done, metrics, checkpointer)
        pending = None
        host = _host_means(sums, summed)
        host["learning_rate"] = float(run.schedule(done - 1))
        host.update(_host_means(run.state_summary(state.router_state), 1))
        memory = profiling.peak_memory_bytes(jax.local_devices())
        if memory is not None:
          host["perf/peak_memory_gib"] = memory / 2**30
        sums, summed = None, 0
        rate = logger.log(done, host)
        rates = {} if rate.tokens_per_sec is None else perf(rate.tokens_per_sec)
        _say(format_progress(done, tcfg.num_steps, host["loss"], rate.tokens_per_sec,
                             rate.eta_seconds,
                             {"lr": host["learning_rate"], "grad norm": host["grad_norm"]},
                             model_tflops=rates.get("perf/model_tflops_per_sec"),
                             mfu=rates.get("perf/mfu")))
      if done % tcfg.eval_every == 0 and done != tcfg.num_steps and not stop:
        heldout = run.evaluate(state, tcfg.eval_batches)
        logger.log(done, {"eval/loss": heldout.loss, "eval/bits_per_byte": heldout.bits_per_byte,
                          "eval/coverage": heldout.coverage})
        _say(f"step {done}: {heldout.describe()}")
      if done % tcfg.checkpoint_every == 0 or last:
        _check_finite(done, metrics, checkpointer)
        _check_state_finite(done, state, checkpointer)
        pending = None
        checkpointer.save(done, state, iterator.get_state())
      if stop:
        checkpointer.wait()
        return state, signals.signum or signal.SIGTERM
  return state, None
