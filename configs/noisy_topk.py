"""Shazeer et al. (2017) noisy top-k gating with importance and load losses."""
from configs.base import base_config


def get_config():
  c = base_config()
  r = c.model.moe.router
  r.name = "noisy_topk"
  r.top_k = 2
  r.load_balance_coef = 0.0
  r.importance_coef = 0.01
  r.load_coef = 0.01
  return c
