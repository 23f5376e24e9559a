"""Strict config dataclasses: built from a ConfigDict or dict, checked by their owner.

Every config section is a frozen dataclass that owns its fields, their
defaults and their checks. ``build(cls, values, path)`` makes one from a
mapping (an ml-collections ConfigDict or a dict) and refuses what it does not
know before any compute starts:

* an unknown key: ``model.moe.router.top_kk: unknown field; did you mean top_k?``
* a value of the wrong type: ``train.num_steps='10': expected int``
* a value outside what the field allows, from the dataclass's ``validate()``:
  ``model.moe.router.top_k=9; allowed: 1 <= top_k <= num_experts (8)``

Keys absent from the mapping take the dataclass defaults (the single source of
defaults). A field whose type is itself a config dataclass is built from the
nested mapping the same way. A class may define ``from_mapping(values, path)``
to build itself (the MoE section uses it to pick the router's config class by
name).

Dataclasses check themselves in ``__post_init__`` through ``validate()``,
raising ``FieldError`` (field, value, what is allowed); ``build`` prefixes the
path, so direct construction in code and configs from files give the same
message.
"""
from __future__ import annotations

import dataclasses
import difflib
import functools
import typing
from collections.abc import Mapping
from typing import Any


class ConfigError(ValueError):
  """A config has an unknown field, or a field has a value it does not allow."""


class FieldError(ConfigError):
  """One field's value is not allowed; ``build`` adds the section's path."""

  def __init__(self, field: str, value: Any, allowed: str):
    super().__init__(f"{field}={value!r}; allowed: {allowed}")
    self.field, self.value, self.allowed = field, value, allowed

  def at(self, path: str) -> ConfigError:
    return ConfigError(f"{path}.{self}" if path else str(self))


def require(ok: bool, field: str, value: Any, allowed: str) -> None:
  """Raises FieldError(field, value, allowed) unless ``ok``."""
  if not ok:
    raise FieldError(field, value, allowed)


def one_of(field: str, value: Any, choices) -> None:
  require(value in choices, field, value, str(list(choices)))


class Checked:
  """Mixin for frozen config dataclasses: ``validate()`` runs on construction."""

  def __post_init__(self):
    self.validate()

  def validate(self) -> None:
    """Raises FieldError for a value the field does not allow."""


def as_dict(values: Any) -> dict:
  """A ConfigDict, dict or config dataclass as a plain (shallow) dict."""
  if values is None:
    return {}
  if dataclasses.is_dataclass(values) and not isinstance(values, type):
    return {f.name: getattr(values, f.name) for f in dataclasses.fields(values) if f.init}
  if hasattr(values, "items"):
    return dict(values.items())
  raise ConfigError(f"expected a mapping of config fields, got {type(values).__name__}")


def unknown_key_error(path: str, key: str, known, owner: str = "") -> ConfigError:
  where = f"{path}.{key}" if path else key
  close = difflib.get_close_matches(key, sorted(known), n=3, cutoff=0.6)
  hint = f"did you mean {' or '.join(close)}?" if close else f"known: {sorted(known)}"
  return ConfigError(f"{where}: unknown field{' of ' + owner if owner else ''}; {hint}")


@functools.lru_cache(maxsize=None)
def _hints(cls) -> dict[str, Any]:
  return typing.get_type_hints(cls)


def _is_config_class(tp) -> bool:
  return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _check_type(where: str, value: Any, tp) -> Any:
  """The value, int widened to float; raises for a plain type mismatch."""
  if tp is float and isinstance(value, int) and not isinstance(value, bool):
    return float(value)
  if tp in (int, float, str, bool):
    ok = isinstance(value, tp) and not (tp is not bool and isinstance(value, bool))
    if not ok:
      raise ConfigError(f"{where}={value!r}: expected {tp.__name__}")
  return value


def _frozen(value: Any) -> Any:
  """Lists (as ConfigDicts hold them) as tuples, so configs stay hashable."""
  if isinstance(value, (list, tuple)):
    return tuple(_frozen(v) for v in value)
  return value


def build(cls, values: Any, path: str = ""):
  """``cls`` from a mapping; unknown keys, wrong types and bad values raise ConfigError."""
  if hasattr(cls, "from_mapping"):
    return cls.from_mapping(values, path)
  return build_fields(cls, as_dict(values), path)


def build_fields(cls, values: dict, path: str):
  """``build`` without the class's own ``from_mapping`` hook (for use inside one)."""
  fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
  for key in values:
    if key not in fields:
      raise unknown_key_error(path, key, fields)
  hints = _hints(cls)
  kwargs = {}
  for name, value in values.items():
    where = f"{path}.{name}" if path else name
    tp = hints.get(name)
    if _is_config_class(tp) and not isinstance(value, tp):
      kwargs[name] = build(tp, value, where)
    else:
      kwargs[name] = _check_type(where, _frozen(value), tp)
  try:
    return cls(**kwargs)
  except FieldError as e:
    raise e.at(path) from None


def defaults_dict(cls, exclude: tuple[str, ...] = ()) -> dict[str, Any]:
  """Every init field of ``cls`` with its default (nested config classes as dicts)."""
  out = {}
  for f in dataclasses.fields(cls):
    if not f.init or f.name in exclude:
      continue
    if f.default is not dataclasses.MISSING:
      value = f.default
    elif f.default_factory is not dataclasses.MISSING:
      value = f.default_factory()
    else:
      continue
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
      value = defaults_dict(type(value))
    out[f.name] = value
  return out
