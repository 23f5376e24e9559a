"""EvoMoE's Dense-to-Sparse gate.

    g = softmax((logits + Gumbel noise) / tau)   in training
    g = softmax(logits / tau)                    at eval

tau follows ``schedules.temperature(step)`` (the config inherits
``schedules.TemperatureSchedule``). Every expert with g above
``gate_threshold`` is active, and so is each token's argmax; the combine
weight of an active expert is its g (not renormalised). At large tau g is
near uniform and every expert is active (a dense layer); as tau falls the
gate sharpens and fewer experts pass the threshold. Once
``is_hard_top1(step)`` holds only the argmax stays active.

The number of active experts per token varies, so the output has one slot
per expert (K = E) and ``max_assignments`` = T * E. ``nominal_k`` is
``top_k``: capacity-based dispatch sizes each expert's buffer as if every
token used top_k experts on average, and drops what does not fit.

``gate_routing`` is shared with ``activation_dense_to_sparse``, which only
changes the scores fed to the temperature softmax.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp

from moe_jax import schedules
from moe_jax.config_fields import require
from moe_jax.routers import base
from moe_jax.routing import RouterInputs, Routing

_NAME = "dense_to_sparse"


@dataclasses.dataclass(frozen=True)
class DenseToSparseConfig(base.TokenChoiceConfig, schedules.TemperatureSchedule):
  """``top_k`` is the capacity budget (experts per token) of capacity-based dispatch."""
  gate_threshold: float = 0.05          # experts with a gate above it are active

  def validate(self) -> None:
    super().validate()
    require(0.0 <= self.gate_threshold < 1.0, "gate_threshold", self.gate_threshold,
            "0 <= gate_threshold < 1")


def gate_routing(scores: jax.Array, logits: jax.Array, inputs: RouterInputs,
                 cfg: DenseToSparseConfig, rng: Optional[jax.Array], train: bool,
                 name: str) -> Routing:
  """Temperature-softmax gate over ``scores`` [T, E] (float32).

  ``logits`` are the raw router outputs, used for the z-loss.
  """
  step = base.require_input(inputs.step, "step", name)
  num_tokens, num_experts = scores.shape
  tau = schedules.temperature(step, cfg)
  if train:
    rng = base.require_rng(rng, name)
    scores = scores + jax.random.gumbel(rng, scores.shape, jnp.float32)
  gates = jax.nn.softmax(scores / tau, axis=-1)
  top1 = jax.nn.one_hot(jnp.argmax(gates, axis=-1), num_experts, dtype=jnp.bool_)
  mask = (gates > cfg.gate_threshold) | top1
  mask = jnp.where(schedules.is_hard_top1(step, cfg), top1, mask)
  return base.per_expert_routing(logits, gates, mask, max_assignments=num_tokens * num_experts,
                                 nominal_k=float(cfg.top_k), metrics={"temperature": tau})

def route(inputs: RouterInputs, cfg: DenseToSparseConfig, rng: Optional[jax.Array],
          train: bool) -> Routing:
  logits = base.logits_f32(inputs, _NAME)
  return gate_routing(logits, logits, inputs, cfg, rng, train, _NAME)


ROUTER = base.register(base.Router(
    name=_NAME, config=DenseToSparseConfig, route=route,
    inputs=frozenset({"logits", "step"}), aux_losses=base.LOGIT_AUX_LOSSES,
    doc="EvoMoE dense-to-sparse gate: Gumbel softmax with annealed temperature and a "
        "gate threshold"))
