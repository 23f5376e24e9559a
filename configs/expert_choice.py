"""Expert-choice routing (Zhou et al. 2022): each expert takes its top-C tokens.

Not causal: a token's experts depend on the other tokens of the batch, later
ones included, so held-out loss of an autoregressive LM is optimistic.
"""
from configs.base import base_config


def get_config():
  return base_config("expert_choice")
