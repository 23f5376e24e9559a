"""DeepSeek-V3 style: sigmoid affinities, auxiliary-loss-free bias balancing,
group-limited routing, one shared expert."""
from configs.base import base_config


def get_config():
  c = base_config()
  r = c.model.moe.router
  r.name = "sigmoid_topk"
  r.top_k = 2
  r.num_groups = 4
  r.topk_groups = 2
  r.bias_update_speed = 1e-3
  r.routed_scaling_factor = 1.0
  r.load_balance_coef = 0.0   # balance comes from the bias; set > 0 for a small extra loss
  r.z_loss_coef = 0.0
  c.model.moe.num_shared_experts = 1
  return c
