"""Expert-choice routing (Zhou et al. 2022): each expert takes its top-C tokens.

Not causal: a token's experts depend on the other tokens of the batch, later
ones included, so held-out loss of an autoregressive LM is optimistic.
"""
from configs.base import base_config


def get_config():
  c = base_config()
  r = c.model.moe.router
  r.name = "expert_choice"
  r.expert_capacity_factor = 2.0
  r.load_balance_coef = 0.0   # balanced by construction
  return c
