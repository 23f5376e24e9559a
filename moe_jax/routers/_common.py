"""Helpers shared by the built-in routers."""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from moe_jax import losses
from moe_jax.routing import RouterConfig


def require(value: Optional[jax.Array], field: str, router: str) -> jax.Array:
  """Returns ``value`` or raises if the layer did not provide it."""
  if value is None:
    raise ValueError(f"router {router!r} needs RouterInputs.{field}, got None")
  return value


def require_rng(rng: Optional[jax.Array], router: str) -> jax.Array:
  if rng is None:
    raise ValueError(
        f"router {router!r} samples noise in training and needs an rng; "
        "got None (pass an rng, or train=False)")
  return rng


def logits_f32(inputs, router: str) -> jax.Array:
  return require(inputs.logits, "logits", router).astype(jnp.float32)


def logit_aux_losses(logits: jax.Array, router_probs: jax.Array,
                     expert_index: jax.Array, mask: jax.Array) -> dict:
  """The losses every logit-based router reports: load_balance and z_loss."""
  return {
      "load_balance": losses.switch_load_balance_loss(
          router_probs, expert_index, mask),
      "z_loss": losses.router_z_loss(logits),
  }


def validate_num_experts(cfg: RouterConfig) -> None:
  if cfg.num_experts < 1:
    raise ValueError(
        f"model.moe.num_experts must be >= 1, got {cfg.num_experts}")


def validate_top_k(cfg: RouterConfig) -> None:
  validate_num_experts(cfg)
  if not 1 <= cfg.top_k <= cfg.num_experts:
    raise ValueError(
        f"model.moe.router.top_k={cfg.top_k} must be in "
        f"[1, num_experts={cfg.num_experts}]")
