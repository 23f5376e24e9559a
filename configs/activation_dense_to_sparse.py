"""Activation-then-temperature softmax gate ("Is Temperature Sample Efficient for
Softmax Gaussian Mixture of Experts?", ICML 2024), annealed dense to sparse."""
from configs.base import base_config


def get_config():
  c = base_config("activation_dense_to_sparse")
  c.model.moe.router.anneal_steps = 400
  return c
