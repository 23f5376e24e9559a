"""Hash Layers (Roller et al. 2021): a fixed hash of the token id picks the expert."""
from configs.base import base_config


def get_config():
  return base_config("hash")
