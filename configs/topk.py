"""Softmax top-k routing (k=2: GShard; set top_k=1 for Switch), dropless dispatch."""
from configs.base import base_config


def get_config():
  return base_config("topk")
