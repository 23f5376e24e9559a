"""Switch Transformer: top-1 routing, capacity-based dispatch with token dropping."""
from configs.base import base_config


def get_config():
  c = base_config("topk")
  r = c.model.moe.router
  r.top_k = 1
  r.renormalize = False   # k=1 renormalised is the constant 1: no router gradient
  r.jitter_eps = 0.01
  c.model.moe.dispatch = "capacity"   # capacity factors 1.25 train / 2.0 eval (the defaults)
  return c
