"""Shazeer et al. (2017) noisy top-k gating with importance and load losses."""
from configs.base import base_config


def get_config():
  return base_config("noisy_topk")
