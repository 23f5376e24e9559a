"""EvoMoE Dense-to-Sparse gate: Gumbel-softmax with an annealed temperature;
experts above a gate threshold stay active, then hard top-1 late in training."""
from configs.base import base_config


def get_config():
  c = base_config()
  r = c.model.moe.router
  r.name = "dense_to_sparse"
  r.tau_max = 2.0
  r.tau_min = 0.1
  r.tau_schedule = "exponential"
  r.anneal_steps = 400
  r.gate_threshold = 0.05
  r.hard_top1_after = 500
  r.top_k = 2   # capacity budget (experts per token) if dispatch="capacity"
  return c
