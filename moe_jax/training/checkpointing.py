"""orbax checkpoints of the train state and the input iterator's position.

Saves are atomic (orbax writes a temporary directory and renames it when
complete), so a save cut short is never taken for a checkpoint. Each checkpoint
also stores a fingerprint of the state, computed on the devices before the
save; a restore whose fingerprint differs (bytes damaged on disk that still
decode) counts as a failed restore. ``restore_latest_good`` walks back from the
newest checkpoint to the newest one that restores and matches, and moves the
damaged ones aside (never deletes them).
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import sys
import time
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

DAMAGED_DIR = "damaged_checkpoints"


class CheckpointRestoreError(RuntimeError):
  """No checkpoint could be restored (or, with ``strict``, the latest could not)."""


@dataclasses.dataclass(frozen=True)
class Restored:
  step: int
  state: Any
  data_state: Any
  notes: tuple[str, ...]      # one line per damaged checkpoint that was set aside


def _leaf_fingerprint(x: jax.Array) -> jax.Array:
  """A uint32 hash of every bit of ``x`` and of where each element sits."""
  if x.dtype.itemsize >= 4:
    words = jax.lax.bitcast_convert_type(x, jnp.uint32).reshape(-1)
  elif x.dtype.itemsize == 2:
    words = jax.lax.bitcast_convert_type(x, jnp.uint16).reshape(-1).astype(jnp.uint32)
  else:
    words = x.reshape(-1).astype(jnp.uint32)
  # Odd weights that differ per position: a changed or moved word changes the sum.
  weights = jnp.arange(words.size, dtype=jnp.uint32) * jnp.uint32(2654435761) + jnp.uint32(1)
  return jnp.sum((words ^ (words >> 16)) * weights, dtype=jnp.uint32)


@jax.jit
def state_fingerprint(state: Any) -> jax.Array:
  """One uint32 per leaf of ``state``; a changed bit changes it (almost surely)."""
  leaves = jax.tree.leaves(state)
  if not leaves:
    return jnp.zeros((0,), jnp.uint32)
  return jnp.stack([_leaf_fingerprint(jnp.asarray(x)) for x in leaves])


def _short_reason(error: BaseException) -> str:
  """The innermost cause's first line, without TensorStore's spec dump."""
  while (error.__cause__ or error.__context__) is not None:
    error = error.__cause__ or error.__context__
  text = str(error).splitlines()[0] if str(error) else ""
  for cut in (" [tensorstore_spec", " See full TensorStore details"):
    text = text.split(cut)[0]
  text = text if len(text) <= 300 else text[:297] + "..."
  return f"{type(error).__name__}: {text}"


@contextlib.contextmanager
def _quiet_closed_event_loops():
  """orbax's async readers report a failed restore a second time, as
  'Event loop is closed' errors raised in callbacks after their loop ended; the
  failure itself is already reported, so these are dropped."""
  previous = sys.unraisablehook

  def hook(unraisable):
    if not (isinstance(unraisable.exc_value, RuntimeError)
            and str(unraisable.exc_value) == "Event loop is closed"):
      previous(unraisable)
  sys.unraisablehook = hook
  try:
    yield
  finally:
    sys.unraisablehook = previous


class Checkpointer:
  """Keeps the last ``keep`` checkpoints under ``workdir/checkpoints``.

  Each checkpoint holds the TrainState (params, optimiser state, step, router
  state), the grain iterator state and the state's fingerprint (JSON), so a
  resumed run continues with the same parameters and the same data order.
  """

  def __init__(self, workdir: str, keep: int):
    self.workdir = os.path.abspath(workdir)
    self.directory = os.path.join(self.workdir, "checkpoints")
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True))

  def latest_step(self) -> Optional[int]:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, state: Any, data_state: Any) -> None:
    fingerprint = np.asarray(jax.device_get(state_fingerprint(state))).tolist()
    record = {"iterator": data_state, "state_fingerprint": fingerprint}
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(record)))

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, Any]:
    """The state and iterator position saved at ``step``; raises if the
    checkpoint cannot be read or its fingerprint does not match."""
    restored = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
    state, record = restored["state"], restored["data"]
    saved = record.get("state_fingerprint") if isinstance(record, dict) else None
    if saved is None:     # written before fingerprints: the record is the iterator state
      return state, record
    actual = np.asarray(jax.device_get(state_fingerprint(state))).tolist()
    if actual != saved:
      bad = [i for i, (a, b) in enumerate(zip(actual, saved)) if a != b]
      raise ValueError(f"the restored state does not match the fingerprint saved with it "
                       f"(leaves {bad[:5]} of {len(saved)} differ): the files are damaged")
    return state, record["iterator"]

  def restore_latest_good(self, abstract_state: Any, strict: bool = False,
                          say: Callable[[str], None] = print) -> Optional[Restored]:
    """The newest checkpoint that restores intact; None when there is none.

    Checkpoints newer than it that fail are reported and moved to
    ``workdir/damaged_checkpoints``. With ``strict`` a failing latest
    checkpoint raises instead. When every checkpoint fails nothing is moved
    and CheckpointRestoreError lists them all.
    """
    failures = []
    for step in sorted(self.all_steps(), reverse=True):
      try:
        with _quiet_closed_event_loops():
          state, data_state = self.restore(step, abstract_state)
      except Exception as e:  # pylint: disable=broad-except
        failures.append((step, _short_reason(e)))
        say(f"checkpoint {self._step_dir(step)} failed to restore: {failures[-1][1]}")
        if strict:
          raise CheckpointRestoreError(
              f"the latest checkpoint (step {step}) failed to restore ({failures[-1][1]}); "
              "rerun without --strict_resume to fall back to an earlier one") from None
        continue
      notes = tuple(self._set_aside(bad) for bad, _ in failures)
      return Restored(step, state, data_state, notes)
    if failures:
      listed = "; ".join(f"step {s}: {r}" for s, r in failures)
      raise CheckpointRestoreError(
          f"no checkpoint in {self.directory} could be restored ({listed}). If the config "
          "changed, restore it; otherwise move the checkpoints away to start afresh")
    return None

  def _step_dir(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  def _set_aside(self, step: int) -> str:
    target_root = os.path.join(self.workdir, DAMAGED_DIR)
    os.makedirs(target_root, exist_ok=True)
    target = os.path.join(target_root, f"{step}-{time.strftime('%Y%m%d-%H%M%S')}")
    if jax.process_index() == 0:
      shutil.move(self._step_dir(step), target)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f"set aside checkpoint {step}")
    self._manager.reload()
    return f"moved the damaged checkpoint of step {step} to {target}"

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def abstract_with_sharding(tree: Any, shardings: Any) -> Any:
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)
