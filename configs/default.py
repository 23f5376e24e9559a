"""The CPU default used by `make demo`: a small top-2 MoE LM on stdlib sources."""
from configs.base import base_config


def get_config():
  return base_config()
