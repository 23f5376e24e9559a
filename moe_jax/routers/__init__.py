"""Routers, registered by name; every module of this package registers one.

    from moe_jax import routers
    cfg = routers.config_from({"name": "topk", "top_k": 1}, num_experts=8)
    router = routers.of(cfg)                      # a routers.base.Router
    routing = router.route(inputs, cfg, rng, train)

A new router is one new module (in this package, or anywhere a config file
imports it) that calls ``routers.register(Router(...))``; nothing else names it.
"""
from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from typing import Any

from moe_jax.config_fields import ConfigError, as_dict, build_fields, unknown_key_error
from moe_jax.routers import base
from moe_jax.routers.base import (LogitRouterConfig, Router, RouterConfig, RouterState,
                                  TokenChoiceConfig, register)

for _module in pkgutil.iter_modules(__path__):
  if _module.name != "base" and not _module.name.startswith("_"):
    importlib.import_module(f"{__name__}.{_module.name}")

DEFAULT = "topk"
get = base.lookup          # name -> Router; an unknown name lists the known ones
names = base.registered    # sorted names
of = base.for_config       # config instance -> its Router


def config_from(values: Any, num_experts: int, path: str = "model.moe.router") -> RouterConfig:
  """The config of the router named by ``values["name"]`` (default topk), built strictly.

  ``num_experts`` comes from the MoE section; unknown keys, wrong types and bad
  values raise ConfigError naming ``path.field``.
  """
  values = as_dict(values)
  name = values.pop("name", DEFAULT)
  router = get(name)
  if "num_experts" in values:
    raise ConfigError(f"{path}.num_experts: set model.moe.num_experts instead (every "
                      "router takes it from there)")
  known = {f.name for f in dataclasses.fields(router.config)} - {"num_experts"}
  for key in values:
    if key not in known:
      raise unknown_key_error(path, key, known, owner=f"router {name!r}")
  return build_fields(router.config, {**values, "num_experts": num_experts}, path)


__all__ = ["LogitRouterConfig", "Router", "RouterConfig", "RouterState", "TokenChoiceConfig",
           "config_from", "get", "names", "of", "register"]
