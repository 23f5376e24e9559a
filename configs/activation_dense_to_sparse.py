"""Activation-then-temperature softmax gate ("Is Temperature Sample Efficient for
Softmax Gaussian Mixture of Experts?", ICML 2024), annealed dense to sparse."""
from configs.base import base_config


def get_config():
  c = base_config()
  r = c.model.moe.router
  r.name = "activation_dense_to_sparse"
  r.activation = "tanh"
  r.tau_max = 2.0
  r.tau_min = 0.1
  r.tau_schedule = "exponential"
  r.anneal_steps = 400
  r.gate_threshold = 0.05
  r.top_k = 2
  return c
