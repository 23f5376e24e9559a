"""Times one whole MoE layer, forward+backward, per grouped-matmul implementation.

The layer is router -> dispatcher (``--dispatch``: dropless, fused) -> SwiGLU
experts (two grouped matmuls: gate and up together, then down) -> combine. The baseline, measured in the same run, is the same
expert FLOPs as one dense SwiGLU MLP over T*k rows: three [T*k, d] x [d, f]-shaped
products with their backward. ratio = baseline time / layer time (1.0 = as fast
as dense). Both are timed as a training step uses them: output returned, and
the gradients of <output, dy> for a random dy (``timing.forward_backward``).

  python -m benchmarks.moe_layer                   # GPU presets
  python -m benchmarks.moe_layer --preset=smoke    # tiny, any backend
  python -m benchmarks.moe_layer --dispatch=dropless,fused    # dispatchers by name
  python -m benchmarks.moe_layer --router_precision=bfloat16  # bf16 router logits
"""
from __future__ import annotations

import dataclasses
import os

from absl import app
from absl import flags
import jax
import jax.numpy as jnp

from moe_jax import dispatch, profiling, routers
from moe_jax.layers.experts import Experts
from moe_jax.layers.moe import MoeConfig, MoeLayer
from moe_jax.ops import registry
from moe_jax.ops.router_logits import PRECISIONS

from benchmarks import flag_checks, timing

_PRESET = flags.DEFINE_enum("preset", "gpu", ["gpu", "smoke"], "Which shapes to time.")
_IMPLS = flags.DEFINE_list("impls", ["auto", "ragged_dot"], "grouped_matmul implementations.")
_ITERS = flags.DEFINE_integer("iters", 10, "Timed iterations (median reported).")
_ONLY = flags.DEFINE_list("only", [], "Time only the shapes with these names.")
_SKIP_DENSE = flags.DEFINE_bool("skip_dense", False,
                                "Skip the dense baseline (e.g. under a profiler).")
_BREAKDOWN = flags.DEFINE_bool("breakdown", False,
                                "Also time the expert stage alone (with the layer's group sizes).")
_TRACE_DIR = flags.DEFINE_string(
    "trace_dir", None, "If set, also record a jax.profiler trace (perfetto json) of a few "
    "layer steps per shape and implementation here, and print the top GPU kernels.")
_DISPATCH = flags.DEFINE_list(
    "dispatch", ["dropless", "fused"],
    "model.moe.dispatch values to time ('fused' only with implementations that have fused "
    "kernels).")
flag_checks.require_choices(_DISPATCH, ("dropless", "fused"))
_ROUTER_PRECISION = flags.DEFINE_enum(
    "router_precision", "float32", list(PRECISIONS),
    "model.moe.router.logits_precision: the router logits matmul's precision.")


@dataclasses.dataclass(frozen=True)
class Shape:
  name: str
  tokens: int
  d_model: int
  d_expert: int
  num_experts: int
  top_k: int


PRESETS = {
    "gpu": [Shape("mixtral-like", 8192, 4096, 14336, 8, 2),
            Shape("fine-grained", 16384, 2048, 768, 64, 8),
            Shape("gpu-1b", 16384, 1024, 256, 64, 6)],  # one layer of configs/gpu_1b.py
    "smoke": [Shape("smoke", 64, 32, 48, 4, 2)],
}


def layer_seconds(fn, *args, iters: int) -> float:
  """Median of ``iters`` single calls (a layer step is long enough to time alone)."""
  return timing.median_seconds(fn, *args, iters=1, reps=iters)


def moe_config(shape: Shape, impl: str, dispatcher: str) -> MoeConfig:
  return MoeConfig.from_mapping(dict(
      num_experts=shape.num_experts, d_expert=shape.d_expert, dispatch=dispatcher,
      gmm_impl=impl, router=dict(name="topk", top_k=shape.top_k,
                                 logits_precision=_ROUTER_PRECISION.value)))


def layer_step(shape: Shape, impl: str, dispatcher: str, dtype):
  """The jitted layer forward+backward and its arguments."""
  cfg = moe_config(shape, impl, dispatcher)
  layer = MoeLayer(cfg, dtype=dtype, param_dtype=dtype)
  key = jax.random.key(0)
  x = jax.random.normal(key, (1, shape.tokens, shape.d_model), dtype)
  params = jax.jit(layer.init)(key, x)["params"]
  params = jax.tree.map(lambda p: p.unbox() if hasattr(p, "unbox") else p, params,
                        is_leaf=lambda p: hasattr(p, "unbox"))

  step = jax.jit(timing.forward_backward(lambda params, x: layer.apply({"params": params}, x)))
  return step, (params, x, timing.random_cotangent(x.shape, dtype))


def layer_time(shape: Shape, impl: str, dispatcher: str, dtype, iters: int) -> float:
  fn, args = layer_step(shape, impl, dispatcher, dtype)
  return layer_seconds(fn, *args, iters=iters)


def trace_layer(shape: Shape, impl: str, dispatcher: str, dtype, trace_dir: str) -> None:
  """Records a profiler trace of three layer steps and prints its top device kernels."""
  fn, args = layer_step(shape, impl, dispatcher, dtype)
  jax.block_until_ready(fn(*args))
  run_dir = os.path.join(trace_dir, f"{shape.name}-{impl}-{dispatcher}-"
                         f"router_{_ROUTER_PRECISION.value}")
  with jax.profiler.trace(run_dir, create_perfetto_trace=True):
    for _ in range(3):
      jax.block_until_ready(fn(*args))
  for path in profiling.find_traces(run_dir):
    print(f"trace {path} (3 steps):")
    profiling.print_summary(profiling.kernel_times(path), steps=3)


def experts_only_time(shape: Shape, impl: str, dtype, iters: int) -> float:
  """The layer's expert stage alone: same weights shapes, same routed group sizes."""
  cfg = moe_config(shape, impl, "dropless")
  key = jax.random.key(0)
  x = jax.random.normal(key, (1, shape.tokens, shape.d_model), dtype)
  layer = MoeLayer(cfg, dtype=dtype, param_dtype=dtype)
  variables = jax.jit(layer.init)(key, x)
  _, state = jax.jit(lambda v, x: layer.apply(v, x, mutable=["moe"]))(variables, x)
  load = state["moe"]["metrics"][0]["expert_load"]
  rows = shape.tokens * shape.top_k
  sizes = jnp.floor(load * rows).astype(jnp.int32)
  sizes = sizes.at[0].add(rows - jnp.sum(sizes))
  experts = Experts(num_experts=shape.num_experts, d_hidden=shape.d_expert,
                    gmm_impl=registry.resolve(impl, dtype).name, dtype=dtype, param_dtype=dtype)
  buffer = jax.random.normal(key, (rows, shape.d_model), dtype)
  as_rows = lambda buffer: dispatch.ExpertRows(data=buffer, group_sizes=sizes,
                                               row_weight=jnp.ones((rows,), jnp.float32))
  params = jax.tree.map(lambda p: p.unbox() if hasattr(p, "unbox") else p,
                        jax.jit(experts.init)(key, as_rows(buffer))["params"],
                        is_leaf=lambda p: hasattr(p, "unbox"))

  step = jax.jit(timing.forward_backward(
      lambda params, buffer: experts.apply({"params": params}, as_rows(buffer))))
  return layer_seconds(step, params, buffer, timing.random_cotangent(buffer.shape, dtype),
                       iters=iters)


def dense_step(shape: Shape, dtype):
  """The dense-equivalent SwiGLU MLP's jitted forward+backward and its arguments."""
  rows = shape.tokens * shape.top_k
  key = jax.random.split(jax.random.key(1), 4)
  x = jax.random.normal(key[0], (rows, shape.d_model), dtype)
  w_gate, w_up = (jax.random.normal(k, (shape.d_model, shape.d_expert), dtype) for k in key[1:3])
  w_down = jax.random.normal(key[3], (shape.d_expert, shape.d_model), dtype)

  def swiglu(ws, x):
    g, u, d = ws
    return (jax.nn.silu(x @ g) * (x @ u)) @ d

  return jax.jit(timing.forward_backward(swiglu)), (
      (w_gate, w_up, w_down), x, timing.random_cotangent(x.shape, dtype))


def dense_time(shape: Shape, dtype, iters: int) -> float:
  step, args = dense_step(shape, dtype)
  return layer_seconds(step, *args, iters=iters)


def print_row(name, what, seconds, flops, base):
  if seconds is None:
    print(f"{name:<14} {what:<44} {'failed (out of memory or unsupported)':>26}", flush=True)
  else:
    print(f"{name:<14} {what:<44} {seconds * 1e3:9.3f} {flops / seconds / 1e12:8.1f} "
          f"{base / seconds:6.2f}", flush=True)


def main(argv):
  del argv
  dtype = jnp.bfloat16 if jax.default_backend() != "cpu" else jnp.float32
  print(f"device: {jax.devices()[0].device_kind}; jax {jax.__version__}; dtype {dtype.__name__}; "
        f"router logits precision {_ROUTER_PRECISION.value}")
  print(f"{'shape':<14} {'what':<44} {'ms':>9} {'TF/s':>8} {'ratio':>6}", flush=True)
  for shape in PRESETS[_PRESET.value]:
    if _ONLY.value and shape.name not in _ONLY.value:
      continue
    flops = 3 * 2 * 3 * shape.tokens * shape.top_k * shape.d_model * shape.d_expert
    base = float("nan") if _SKIP_DENSE.value else dense_time(shape, dtype, _ITERS.value)
    print_row(shape.name, "dense-equivalent", base, flops, base)
    for impl in _IMPLS.value:
      resolved = registry.resolve(impl, dtype)
      for dispatcher in _DISPATCH.value:
        if dispatcher == "fused" and resolved.fused is None:
          continue
        try:
          seconds = layer_time(shape, impl, dispatcher, dtype, _ITERS.value)
        except jax.errors.JaxRuntimeError as e:  # e.g. ragged_dot's dense backward OOMs
          print(f"  {impl}: {str(e).splitlines()[0][:160]}", flush=True)
          seconds = None
        label = resolved.name + (", fused dispatch" if dispatcher == "fused" else "")
        print_row(shape.name, f"moe layer [{label}]", seconds, flops, base)
        if _TRACE_DIR.value and seconds is not None:
          trace_layer(shape, impl, dispatcher, dtype, _TRACE_DIR.value)
      if _BREAKDOWN.value:
        try:
          seconds = experts_only_time(shape, impl, dtype, _ITERS.value)
        except jax.errors.JaxRuntimeError as e:
          print(f"  {impl}: {str(e).splitlines()[0][:160]}", flush=True)
          seconds = None
        print_row(shape.name, f"experts only [{resolved.name}]", seconds, flops, base)


if __name__ == "__main__":
  app.run(main)
