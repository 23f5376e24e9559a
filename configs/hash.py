"""Hash Layers (Roller et al. 2021): a fixed hash of the token id picks the expert."""
from configs.base import base_config


def get_config():
  c = base_config()
  r = c.model.moe.router
  r.name = "hash"
  r.top_k = 1
  r.load_balance_coef = 0.0
  r.z_loss_coef = 0.0
  return c
