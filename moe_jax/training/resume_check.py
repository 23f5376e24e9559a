"""The run's config recorded in its workdir, and checked against on resume.

New runs write ``config.json`` (moe_jax.training.workdir). A resume compares
the config field by field with the recorded one and refuses every difference
that ``allow_change`` does not list, those in ``NEVER_CHANGE_ON_RESUME``, and
any whose change alters the shape or dtype of a leaf of the train state
(found by building both states abstractly, so no list of such fields has to
be kept up to date).
"""
from __future__ import annotations

import os
import time
from typing import Any, Callable, Sequence

import jax

from moe_jax import routers
from moe_jax.config_fields import ConfigError
from moe_jax.training import workdir as workdir_lib
from moe_jax.training.config import config_to_dict, experiment_config

# Changing these on resume would change what the saved data position means.
NEVER_CHANGE_ON_RESUME = ("data.seq_len", "data.batch_size")


def _state_changes(state_shapes: Callable[[Any], Any], config: Any,
                   recorded_config: dict) -> list[str]:
  """Leaves of the train state whose shape or dtype the recorded config gives otherwise."""
  old = jax.tree_util.tree_flatten_with_path(state_shapes(experiment_config(recorded_config)))
  new = jax.tree_util.tree_flatten_with_path(state_shapes(config))
  old = {jax.tree_util.keystr(p): v for p, v in old[0]}
  new = {jax.tree_util.keystr(p): v for p, v in new[0]}
  return sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))


def _merged(defaults: dict, values: dict) -> dict:
  out = dict(defaults)
  for key, value in values.items():
    both_dicts = isinstance(value, dict) and isinstance(defaults.get(key), dict)
    out[key] = _merged(defaults[key], value) if both_dicts else value
  return out


def _with_new_defaults(recorded: dict) -> dict:
  """The record with fields added to moe_jax since it was written filled in at
  their defaults, so that a newer moe_jax resumes an older run. Fields since
  removed stay, for check_resume to report."""
  router = recorded["config"].get("model", {}).get("moe", {}).get("router", {})
  try:
    defaults = config_to_dict(experiment_config(
        {"model": {"moe": {"router": {"name": router.get("name", routers.DEFAULT)}}}}))
  except ConfigError:
    return recorded
  return {**recorded, "config": _merged(defaults, recorded["config"])}


def record_config(config: Any, state_shapes: Callable[[Any], Any], workdir: str,
                  resuming: bool, allow_change: Sequence[str],
                  say: Callable[[str], None] = print) -> dict:
  """Writes the run's config to the workdir; on resume, first refuses any
  difference from the recorded one that ``allow_change`` does not list."""
  values = config_to_dict(config)
  recorded = workdir_lib.read_record(workdir)
  history = []
  if resuming and recorded is None:
    say(f"{workdir} has checkpoints but no recorded config (an older moe_jax wrote it); "
        "recording this one")
  elif resuming:
    recorded = _with_new_defaults(recorded)
    changed = workdir_lib.check_resume(recorded, values, allow_change, NEVER_CHANGE_ON_RESUME,
                                       path=os.path.join(workdir, workdir_lib.RECORD_NAME))
    if changed:
      try:
        moved = _state_changes(state_shapes, config, recorded["config"])
      except ConfigError as e:
        raise workdir_lib.ConfigChanged(
            f"the recorded config no longer builds ({e}); cannot check that the changes "
            f"keep the saved state's shapes") from None
      if moved:
        fields = ", ".join(f for f, _, _ in changed)
        raise workdir_lib.ConfigChanged(
            f"changing {fields} on resume changes the saved train state ({len(moved)} "
            f"leaves, e.g. {', '.join(moved[:3])}); such fields can never change on resume")
    history = list(recorded.get("changes", []))
    history += [{"field": f, "old": a, "new": b, "when": time.strftime("%Y-%m-%dT%H:%M:%S")}
                for f, a, b in changed]
    for field, old, new in changed:
      say(f"changed on resume: {field} {old} -> {new}")
  record = workdir_lib.run_record(values, workdir_lib.versions())
  if recorded is not None and resuming:
    record["created"] = recorded.get("created", record["created"])
  if history:
    record["changes"] = history
  if jax.process_index() == 0:
    workdir_lib.write_record(workdir, record)
  return record
