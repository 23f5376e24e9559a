"""Stopping a run cleanly on SIGTERM (schedulers, preemptible VMs) and SIGINT (Ctrl-C).

The first signal only sets a flag: the loop finishes the step in flight, saves
a checkpoint, flushes its logs and raises ``TrainingInterrupted``. A second
signal exits at once (status 128 + signal), saving nothing more; orbax's saves
are atomic, so a save it cuts short is never taken for a checkpoint.

On several processes the flag is a vote: every process contributes its own
flag each step and all of them read the same maximum, one step later, so they
all stop (and save) at the same step even when the signal reached them at
different steps.
"""
from __future__ import annotations

import os
import signal
import sys
import threading
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class TrainingInterrupted(Exception):
  """The run stopped on a signal after saving a checkpoint at ``step``."""

  def __init__(self, message: str, signum: int, step: int):
    super().__init__(message)
    self.signum, self.step = signum, step

  @property
  def exit_code(self) -> int:
    return 128 + self.signum


class StopSignals:
  """A context in which SIGTERM and SIGINT request a stop instead of killing.

  Outside the main thread (where Python cannot install handlers) it does
  nothing and ``signum`` stays None.
  """

  def __init__(self, say=print):
    self.signum: Optional[int] = None
    self._say = say
    self._previous = {}

  def _handle(self, signum, frame):
    del frame
    name = signal.Signals(signum).name
    if self.signum is not None:
      print(f"\n{name} again: exiting now without saving", file=sys.stderr, flush=True)
      os._exit(128 + signum)
    self.signum = signum
    self._say(f"\n{name}: stopping after the step in flight and saving a checkpoint "
              f"(send it again to exit at once)")

  def __enter__(self) -> "StopSignals":
    if threading.current_thread() is threading.main_thread():
      for sig in SIGNALS:
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def __exit__(self, *exc) -> None:
    self.restore()

  def restore(self) -> None:
    """Gives the signals back their previous handlers (idempotent)."""
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    self._previous = {}


class StopVote:
  """Whether any process asked to stop, agreed on by all processes.

  ``cast(requested)`` records this process's flag for the step just launched
  and returns the decision of the previous cast: True on every process or on
  none. One process needs no agreement; it answers its own flag at once.
  """

  def __init__(self, sharding: Optional[jax.sharding.Sharding], local_rows: int):
    self._multi = jax.process_count() > 1
    self._sharding, self._rows = sharding, local_rows
    self._pending = None
    if self._multi:
      self._reduce = jax.jit(jnp.max)

  def cast(self, requested: bool) -> bool:
    if not self._multi:
      return requested
    votes = np.full((self._rows,), int(requested), np.int32)
    current = self._reduce(jax.make_array_from_process_local_data(self._sharding, votes))
    previous, self._pending = self._pending, current
    return previous is not None and bool(jax.device_get(previous))
