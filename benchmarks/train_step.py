"""Times the whole train step of a config and of its dense equivalent in one run.

  python -m benchmarks.train_step --config=configs/gpu_1b.py [--batch_size=N] [--steps=N]
  python -m benchmarks.train_step --smoke          # a tiny MoE, 3 steps, any backend

The step is the training loop's own (``moe_jax.training.loop._Run``: the model,
AdamW, the mesh and shardings of the config) on random tokens. For each model
it prints tokens/s, the median step time over ``--steps`` steps after
``--warmup`` steps (each step waited for), model TFLOP/s (``moe_jax.flops``:
6N + causal attention), MFU against the device's bf16 peak where known, XLA's
planned memory per device for the step (arguments + outputs - donated +
temporaries) and the compile time; then MoE tokens/s / dense tokens/s.

The dense equivalent (``moe_jax.flops.dense_equivalent``) has the same
attention, vocabulary and layer count, and every feed-forward block a dense one
(``moe_every=0``, ``ffn_kind`` = the experts' kind) as wide as what a token
activates in a MoE layer: ``d_ff = k * d_expert + num_shared_experts *
d_shared``, with k the router's experts per token (rounded to a whole width).
Its FLOPs per token are the MoE's less the router's. A config whose MoE layers
alternate with dense ones (``moe_every > 1``) gets that width in every layer;
the table's FLOPs per token show the difference.
"""
from __future__ import annotations

import dataclasses
import statistics
import time

from absl import app
from absl import flags
import jax
import numpy as np
from ml_collections import config_flags

from configs.base import base_config
from moe_jax import flops, profiling
from moe_jax.training.config import ExperimentConfig, experiment_config
from moe_jax.training.loop import _Run

_CONFIG = config_flags.DEFINE_config_file("config", "configs/gpu_1b.py",
                                          "Experiment config file.", lock_config=True)
_BATCH_SIZE = flags.DEFINE_integer("batch_size", None, "Global batch (default: the config's).")
_STEPS = flags.DEFINE_integer("steps", 10, "Timed steps (median reported).", lower_bound=1)
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed steps after compiling.", lower_bound=0)
_SMOKE = flags.DEFINE_bool("smoke", False, "A tiny MoE config, 3 steps (CPU test).")


def smoke_config() -> ExperimentConfig:
  c = base_config("topk")
  m = c.model
  m.d_model, m.num_layers, m.num_heads, m.head_dim, m.d_ff, m.moe_every = 32, 2, 2, 16, 64, 1
  m.moe.num_experts, m.moe.d_expert, m.moe.num_shared_experts = 8, 32, 1
  c.data.seq_len, c.data.batch_size = 16, 8
  return experiment_config(c)


@dataclasses.dataclass(frozen=True)
class Timing:
  step_seconds: float        # median
  compile_seconds: float
  planned_bytes: int         # XLA's memory plan of the step, per device


def time_train_step(config: ExperimentConfig, steps: int, warmup: int) -> Timing:
  run = _Run(config, workdir="", load_data=False)
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, config.model.vocab_size, (run.local_batch, config.data.seq_len + 1))
  batch = run.global_batch({"inputs": tokens[:, :-1].astype(np.int32),
                            "targets": tokens[:, 1:].astype(np.int32)})
  base_rng = jax.random.key(1)
  state = run.init_state()
  with run.context():
    began = time.perf_counter()
    step = run.train_step.lower(state, batch, base_rng).compile()
    compile_seconds = time.perf_counter() - began
    memory = step.memory_analysis()
    planned = (memory.argument_size_in_bytes + memory.output_size_in_bytes
               - memory.alias_size_in_bytes + memory.temp_size_in_bytes)
    samples = []
    for i in range(warmup + steps):
      began = time.perf_counter()
      state, metrics = step(state, batch, base_rng)
      jax.block_until_ready((state, metrics))
      if i >= warmup:
        samples.append(time.perf_counter() - began)
  return Timing(statistics.median(samples), compile_seconds, planned)


def main(argv):
  del argv
  config = smoke_config() if _SMOKE.value else experiment_config(_CONFIG.value)
  if _BATCH_SIZE.value:
    config = dataclasses.replace(config, data=dataclasses.replace(
        config.data, batch_size=_BATCH_SIZE.value))
  steps, warmup = (3, 1) if _SMOKE.value else (_STEPS.value, _WARMUP.value)
  kind = jax.devices()[0].device_kind
  peak = flops.peak_tflops(kind)
  tokens = config.data.batch_size * config.data.seq_len
  print(f"device: {jax.device_count()} x {kind} (peak "
        + (f"{peak:g} bf16 TFLOP/s each" if peak else "unknown: no MFU")
        + f"); jax {jax.__version__}; batch {config.data.batch_size} x {config.data.seq_len} "
        f"tokens; {config.model.dtype}; median of {steps} steps after {warmup}")
  dense = dataclasses.replace(config, model=flops.dense_equivalent(config.model, tokens))
  moe = config.model.moe
  print(f"dense equivalent: moe_every=0, ffn_kind={dense.model.ffn_kind}, d_ff="
        f"{dense.model.d_ff} (k x d_expert + shared width; k = "
        f"{flops.active_experts_per_token(moe, tokens):g}, d_expert = {moe.d_expert}, "
        f"{moe.num_shared_experts} shared of {moe.d_shared or moe.d_expert})")
  print(f"{'model':<6} {'GFLOP/tok':>10} {'tokens/s':>11} {'step ms':>9} "
        f"{'TFLOP/s':>9} {'MFU':>6} {'mem GiB':>8} {'compile s':>9}", flush=True)
  rates = {}
  for name, cfg in (("moe", config), ("dense", dense)):
    count = flops.model_flops_per_token(cfg.model, cfg.data.seq_len,
                                        batch_size=cfg.data.batch_size)
    timing = time_train_step(cfg, steps, warmup)
    rates[name] = tokens / timing.step_seconds
    perf = flops.throughput(rates[name], count.total, jax.device_count(), peak)
    mfu = f"{perf['perf/mfu']:6.1%}" if "perf/mfu" in perf else f"{'--':>6}"
    print(f"{name:<6} {count.total / 1e9:10.4g} {rates[name]:11.1f} "
          f"{timing.step_seconds * 1e3:9.2f} {perf['perf/model_tflops_per_sec']:9.4g} {mfu} "
          f"{timing.planned_bytes / 2**30:8.3f} {timing.compile_seconds:9.1f}", flush=True)
  device_peak = profiling.peak_memory_bytes(jax.local_devices())
  if device_peak is not None:
    print(f"device peak memory over the whole run (both models): {device_peak / 2**30:.2f} GiB")
  print(f"ratio moe/dense tokens/s: {rates['moe'] / rates['dense']:.3f}")


if __name__ == "__main__":
  app.run(main)
