"""Softmax top-k routing (k=2: GShard; set top_k=1 for Switch), dropless dispatch."""
from configs.base import base_config


def get_config():
  c = base_config()
  c.model.moe.router.name = "topk"
  c.model.moe.router.top_k = 2
  return c
