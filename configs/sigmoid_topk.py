"""DeepSeek-V3 style: sigmoid affinities, auxiliary-loss-free bias balancing,
group-limited routing, one shared expert."""
from configs.base import base_config


def get_config():
  c = base_config("sigmoid_topk")
  r = c.model.moe.router
  r.num_groups = 4
  r.topk_groups = 2
  c.model.moe.num_shared_experts = 1
  return c
