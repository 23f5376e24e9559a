"""Switch Transformer: top-1 routing, capacity-based dispatch with token dropping."""
from configs.base import base_config


def get_config():
  c = base_config()
  c.model.moe.router.name = "topk"
  c.model.moe.router.top_k = 1
  c.model.moe.router.renormalize = False  # k=1 renormalised is the constant 1: no router gradient
  c.model.moe.router.jitter_eps = 0.01
  c.model.moe.dispatch = "capacity"
  c.model.moe.capacity_factor_train = 1.25
  c.model.moe.capacity_factor_eval = 2.0
  return c
