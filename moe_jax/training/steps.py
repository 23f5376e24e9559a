"""Train state, optimiser, and the pure train/eval step functions."""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import struct


@struct.dataclass
class TrainState:
  step: jax.Array                  # int32 scalar
  params: Any
  opt_state: Any
  router_state: Any                # non-trained per-layer state (sigmoid_topk bias)


def learning_rate_schedule(opt_cfg: Any, num_steps: int) -> optax.Schedule:
  """Linear warm-up from 0, then cosine decay to min_lr_ratio * peak at num_steps."""
  warmup = min(opt_cfg.warmup_steps, max(num_steps - 1, 0))
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=opt_cfg.learning_rate, warmup_steps=warmup,
      decay_steps=max(num_steps, warmup + 1),
      end_value=opt_cfg.learning_rate * opt_cfg.min_lr_ratio)


def make_optimizer(opt_cfg: Any, num_steps: int) -> optax.GradientTransformation:
  """AdamW on ``learning_rate_schedule``, global-norm clipping."""
  schedule = learning_rate_schedule(opt_cfg, num_steps)

  def decay_mask(params):
    # No weight decay on norm scales and router projections.
    def keep(path, _):
      names = [getattr(p, "key", "") for p in path]
      return not any(n == "scale" or n.startswith("router") for n in names)
    return jax.tree_util.tree_map_with_path(keep, params)

  return optax.chain(
      optax.clip_by_global_norm(opt_cfg.grad_clip_norm),
      optax.adamw(schedule, b1=opt_cfg.b1, b2=opt_cfg.b2, eps=opt_cfg.eps,
                  weight_decay=opt_cfg.weight_decay, mask=decay_mask))


def init_state(model: nn.Module, optimizer: optax.GradientTransformation, rng: jax.Array,
               sample_tokens: jax.Array) -> TrainState:
  """Builds a TrainState whose params keep their logical-axis boxes."""
  variables = model.init({"params": rng, "router": rng}, sample_tokens, step=0, train=False)
  params = variables["params"]
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    opt_state=optimizer.init(params),
                    router_state=variables.get("router_state", {}))


def collect_moe(moe_collection: Any) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Sums sown aux losses; names metrics ``moe/<layer>/<metric>``."""
  total = jnp.zeros((), jnp.float32)
  metrics = {}
  for layer, sub in (moe_collection or {}).items():
    sown = sub["moe"]
    total = total + sum(sown["aux_loss"])
    for name, value in sown["metrics"][0].items():
      metrics[f"moe/{layer}/{name}"] = value
  return total, metrics


def cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
  return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, targets))


def train_step(state: TrainState, batch: dict, base_rng: jax.Array, *, model: nn.Module,
               optimizer: optax.GradientTransformation) -> tuple[TrainState, dict]:
  rng = jax.random.fold_in(base_rng, state.step)

  def loss_fn(params):
    logits, mutated = model.apply(
        {"params": params, "router_state": state.router_state}, batch["inputs"],
        step=state.step, train=True, rngs={"router": rng}, mutable=["moe", "router_state"])
    ce = cross_entropy(logits, batch["targets"])
    aux, moe_metrics = collect_moe(mutated.get("moe"))
    return ce + aux, (ce, aux, moe_metrics, mutated.get("router_state", {}))

  grads, (ce, aux, moe_metrics, router_state) = jax.grad(loss_fn, has_aux=True)(state.params)
  updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics = {"loss": ce + aux, "ce_loss": ce, "aux_loss": aux,
             "grad_norm": optax.tree.norm(grads), **moe_metrics}
  new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                            router_state=router_state)
  return new_state, metrics


def eval_step(state: TrainState, batch: dict, *, model: nn.Module) -> dict:
  """Summed loss and target count; ``batch["weights"]`` (if present) masks padding."""
  logits = model.apply({"params": state.params, "router_state": state.router_state},
                       batch["inputs"], step=state.step, train=False)
  losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
  weights = batch.get("weights", jnp.ones_like(losses))
  return {"loss_sum": jnp.sum(losses * weights), "count": jnp.sum(weights, dtype=jnp.float32)}
