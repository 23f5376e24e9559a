"""EvoMoE Dense-to-Sparse gate: Gumbel-softmax with an annealed temperature;
experts above a gate threshold stay active, then hard top-1 late in training."""
from configs.base import base_config


def get_config():
  c = base_config("dense_to_sparse")
  r = c.model.moe.router
  r.anneal_steps = 400
  r.hard_top1_after = 500
  return c
