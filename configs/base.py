"""Every experiment config starts from ``base_config()``.

The values come from the config dataclasses themselves (each field's owner
holds its default: moe_jax.training.config and the sections it gathers), so a
config file states only what it changes. ``router(name)`` is a router's
section with all its fields, so each can be overridden on the command line
(``--config.model.moe.router.top_k=1``); to try another router, start from its
config file (a router's section holds only that router's fields).
"""
import ml_collections

from moe_jax import routers
from moe_jax.config_fields import defaults_dict
from moe_jax.training.config import ExperimentConfig


def router(name: str) -> ml_collections.ConfigDict:
  fields = defaults_dict(routers.get(name).config, exclude=("num_experts",))
  return ml_collections.ConfigDict({"name": name, **fields})


def base_config(router_name: str = routers.DEFAULT) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict(defaults_dict(ExperimentConfig))
  c.model.moe.router = router(router_name)
  return c
