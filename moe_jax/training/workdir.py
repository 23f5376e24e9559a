"""One run per workdir, and the config it was started with.

Two things keep a workdir honest:

* ``WorkdirLock``: a run holds ``<workdir>/run.lock`` while it trains. The
  file says who holds it (host, pid, the pid's start time, when, command), so
  a second run on the same workdir is refused with a message naming the
  holder, and a lock left behind by a run that died is taken over. A lock is
  stale only when we can tell its process is gone: same host, and the pid no
  longer exists, is a zombie, or now belongs to a process that started later
  (pid reuse). A lock from another host is never taken over: its liveness
  cannot be checked from here. Runs taking over the same stale lock at once
  serialise on ``run.lock.takeover``; one wins. In a multi-process run only
  one process (the chief) should take the lock.

* ``config.json``: the config a run was started with (and the library
  versions it ran under). On resume the new config is compared field by field
  with the recorded one; fields the user named (``--allow_config_change``) may
  differ, everything else is refused, and some fields (``never``: those that
  change the shapes of the saved state or the meaning of the run) are refused
  even when named.

Nothing here imports jax: the versions are read from package metadata.
"""

from __future__ import annotations

import dataclasses
import datetime
import difflib
import importlib.metadata
import json
import os
import pathlib
import shlex
import socket
import subprocess
import sys
import time
from typing import Any, Sequence

from moe_jax.training.files import atomic_write

LOCK_NAME = "run.lock"
RECORD_NAME = "config.json"
ABSENT = "<absent>"
# A lock file that cannot be parsed may be one that its writer has created but
# not yet filled; only after this long do we take it for the wreck of a crash.
CORRUPT_GRACE_S = 60.0
_VERSIONED = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "moe_jax")


def _now() -> str:
  return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


# ----------------------------------------------------------------------------
# The lock.


class WorkdirInUse(RuntimeError):
  """Another run (or one being started) holds the workdir."""


@dataclasses.dataclass(frozen=True)
class _Holder:
  host: str
  pid: int
  pid_start: str | None
  started: str
  argv: tuple[str, ...]

  def to_json(self) -> dict[str, Any]:
    return {"host": self.host, "pid": self.pid, "pid_start": self.pid_start,
            "started": self.started, "argv": list(self.argv)}

  @property
  def command(self) -> str:
    return shlex.join(self.argv)


def _parse_holder(raw: bytes) -> _Holder | None:
  """The holder a lock file names, or None when it is not a well-formed lock."""
  try:
    data = json.loads(raw.decode("utf-8"))
  except (UnicodeDecodeError, json.JSONDecodeError):
    return None
  if not isinstance(data, dict):
    return None
  host, pid, pid_start = data.get("host"), data.get("pid"), data.get("pid_start")
  argv = data.get("argv", [])
  # pid <= 0 would make os.kill(pid, 0) address a process group.
  if (not isinstance(host, str) or type(pid) is not int or pid <= 0
      or not (pid_start is None or isinstance(pid_start, str))
      or not isinstance(argv, list)):
    return None
  return _Holder(host, pid, pid_start, str(data.get("started", "at an unknown time")),
                 tuple(str(a) for a in argv))


def _lock_bytes(holder: _Holder) -> bytes:
  return json.dumps(holder.to_json(), indent=2).encode("utf-8") + b"\n"


def _proc_stat(pid: int) -> list[str] | None:
  """Fields 3.. of /proc/<pid>/stat (state first), or None where unreadable."""
  try:
    with open(f"/proc/{pid}/stat", "rb") as f:
      text = f.read().decode("utf-8", "replace")
  except OSError:
    return None
  # The comm field (2) is parenthesised and may itself contain spaces and ')'.
  return text.rpartition(")")[2].split()


def _process_start(pid: int) -> str | None:
  """A token for when `pid` started (Linux: clock ticks since boot), or None."""
  fields = _proc_stat(pid)
  return fields[19] if fields is not None and len(fields) > 19 else None


def _gone_reason(holder: _Holder) -> str | None:
  """Why the holder's process is known to be gone, or None if it may be alive."""
  try:
    os.kill(holder.pid, 0)
  except ProcessLookupError:
    return "that process is gone"
  except PermissionError:
    pass  # It exists, under another user.
  fields = _proc_stat(holder.pid)
  if fields is None:
    # With a /proc, a missing entry means it exited since os.kill looked.
    return "that process is gone" if os.path.isdir("/proc/self") else None
  if fields[0] == "Z":
    return "that process has exited"
  if (holder.pid_start is not None and len(fields) > 19
      and fields[19] != holder.pid_start):
    return f"that process is gone; pid {holder.pid} now belongs to another process"
  return None


class WorkdirLock:
  """``<workdir>/run.lock``, held by at most one run at a time."""

  def __init__(self, workdir: str):
    self.workdir = workdir
    self.path = os.path.join(workdir, LOCK_NAME)
    self.takeover: str | None = None  # What acquire() returned.
    self._ours: _Holder | None = None

  def acquire(self) -> str | None:
    """Takes the lock; returns a one-line message if it took over a stale one."""
    os.makedirs(self.workdir, exist_ok=True)
    # A second pass only happens when another process changed the file under
    # us (it released it, or took over the same stale lock first).
    for _ in range(2):
      if self._create():
        self.takeover = None
        return None
      try:
        with open(self.path, "rb") as f:
          raw = f.read()
          mtime = os.fstat(f.fileno()).st_mtime
      except FileNotFoundError:
        continue
      message = self._judge(raw, mtime)  # Raises WorkdirInUse unless stale.
      if self._take_over(raw):
        self.takeover = message
        return message
    raise WorkdirInUse(
        f"{self.workdir}: could not take {self.path}; another run is starting "
        "on this workdir at the same time. Wait for it, or use another --workdir.")

  def release(self) -> None:
    """Removes the lock file if it is still the one this object wrote."""
    ours, self._ours = self._ours, None
    if ours is None:
      return
    try:
      with open(self.path, "rb") as f:
        holder = _parse_holder(f.read())
    except FileNotFoundError:
      return
    if holder is not None and (holder.host, holder.pid, holder.started) == (
        ours.host, ours.pid, ours.started):
      pathlib.Path(self.path).unlink(missing_ok=True)

  def __enter__(self) -> WorkdirLock:
    self.acquire()
    return self

  def __exit__(self, *exc_info) -> None:
    self.release()

  @staticmethod
  def _new_holder() -> _Holder:
    pid = os.getpid()
    return _Holder(socket.gethostname(), pid, _process_start(pid), _now(),
                   tuple(str(a) for a in sys.argv))

  def _create(self) -> bool:
    """Creates the lock file as ours; False if one already exists."""
    holder = self._new_holder()
    try:
      fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
      return False
    try:
      with os.fdopen(fd, "wb") as f:
        f.write(_lock_bytes(holder))
        f.flush()
        os.fsync(f.fileno())
    except BaseException:
      os.remove(self.path)
      raise
    self._ours = holder
    return True

  def _judge(self, raw: bytes, mtime: float) -> str:
    """The takeover message for a stale lock; raises WorkdirInUse otherwise."""
    holder = _parse_holder(raw)
    if holder is None:
      age = time.time() - mtime
      if age <= CORRUPT_GRACE_S:
        raise WorkdirInUse(
            f"{self.path} exists but is not a readable lock ({len(raw)} bytes, "
            f"{age:.0f} s old): a run may be writing it right now. Try again in a "
            f"minute; if it is still unreadable and no run uses {self.workdir}, "
            "delete it.")
      return (f"took over the unreadable lock file {self.path} "
              f"({age:.0f} s old, so no run is still writing it)")
    gone = _gone_reason(holder) if holder.host == socket.gethostname() else None
    if gone is None:
      who = ("this very process (a run in it still uses the workdir)"
             if holder.host == socket.gethostname() and holder.pid == os.getpid()
             else "another run")
      raise WorkdirInUse(
          f"{self.workdir} is in use by {who}: pid {holder.pid} on host "
          f"{holder.host}, started {holder.started}, command {holder.command!r}. "
          "Wait for it, or use another --workdir; if that process is gone "
          f"(e.g. its host died), delete {self.path}.")
    return (f"took over the stale lock of pid {holder.pid} on host {holder.host} "
            f"(started {holder.started}; {gone})")

  def _take_over(self, raw: bytes) -> bool:
    """Replaces the stale lock (content `raw`) with ours; False if it changed.

    Takers of a stale lock serialise on ``<lock>.takeover`` (created
    exclusively), and the lock file is replaced by one rename, so it never goes
    missing: a run starting meanwhile finds a lock and judges it, instead of
    creating its own beside ours.
    """
    mutex = self.path + ".takeover"
    try:
      os.close(os.open(mutex, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
    except FileExistsError:
      try:
        age = f"{time.time() - os.stat(mutex).st_mtime:.0f} s old"
      except FileNotFoundError:
        return False  # Its taker just finished: judge the lock again.
      raise WorkdirInUse(
          f"{self.workdir}: another run is taking over the stale lock right now "
          f"({mutex} exists, {age}). Wait for it, or use another --workdir; if no "
          f"run is starting on {self.workdir}, delete {mutex}.") from None
    try:
      try:
        with open(self.path, "rb") as f:
          if f.read() != raw:
            return False  # Another taker replaced it first.
      except FileNotFoundError:
        return False
      holder = self._new_holder()
      atomic_write(self.path, _lock_bytes(holder))
      self._ours = holder
      return True
    finally:
      os.remove(mutex)


# ----------------------------------------------------------------------------
# The recorded config.


class ConfigChanged(ValueError):
  """The config differs from the recorded one in fields not allowed to change."""


def run_record(config: dict, versions: dict) -> dict:
  return {"config": config, "versions": versions, "created": _now()}


def _git(args: Sequence[str], cwd: str) -> str:
  return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True,
                        timeout=5, check=True).stdout


def _git_commit() -> str | None:
  """HEAD of the checkout moe_jax is imported from (+dirty), or None."""
  package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  try:
    # An installed copy may sit inside some other checkout (a venv in a repo):
    # only report a commit if this very source file is tracked by it.
    _git(["ls-files", "--error-unmatch", "__init__.py"], package)
    commit = _git(["rev-parse", "HEAD"], package).strip()
    dirty = _git(["status", "--porcelain"], package).strip()
  except (OSError, subprocess.SubprocessError, UnicodeDecodeError):
    return None
  return commit + ("+dirty" if dirty else "") if commit else None


def versions() -> dict:
  """Versions of python, the libraries a run depends on, and moe_jax's commit."""
  found: dict[str, str | None] = {"python": sys.version.split()[0]}
  for name in _VERSIONED:
    try:
      found[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      found[name] = None
  found["git_commit"] = _git_commit()
  return found


def write_record(workdir: str, record: dict) -> str:
  """Atomically writes `record` to <workdir>/config.json; returns the path."""
  text = json.dumps(record, indent=2, sort_keys=True) + "\n"
  return atomic_write(os.path.join(workdir, RECORD_NAME), text)


def read_record(workdir: str) -> dict | None:
  path = os.path.join(workdir, RECORD_NAME)
  try:
    with open(path, encoding="utf-8") as f:
      text = f.read()
  except FileNotFoundError:
    return None
  try:
    record = json.loads(text)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ValueError(f"{path} is not valid JSON ({e}); it should hold the config "
                     "this run was started with") from e
  if not isinstance(record, dict) or not isinstance(record.get("config"), dict):
    raise ValueError(f"{path} is not a run record: expected a JSON object with a "
                     '"config" object')
  return record


def flatten(values: dict, prefix: str = "") -> dict[str, Any]:
  """Nested dicts -> {"model.moe.top_k": 2, ...}; lists and empty dicts are values."""
  flat: dict[str, Any] = {}
  for key, value in values.items():
    name = f"{prefix}{key}"
    if isinstance(value, dict) and value:
      flat.update(flatten(value, name + "."))
    else:
      flat[name] = value
  return flat


def _same(a: Any, b: Any) -> bool:
  """Equality of JSON values: true != 1, 1 == 1.0, NaN == NaN, tuple == list."""
  if isinstance(a, bool) or isinstance(b, bool):
    return type(a) is type(b) and a == b
  if isinstance(a, (int, float)) and isinstance(b, (int, float)):
    return a == b or (a != a and b != b)
  if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
    return len(a) == len(b) and all(map(_same, a, b))
  if isinstance(a, dict) and isinstance(b, dict):
    return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
  return type(a) is type(b) and a == b


def config_diff(old: dict, new: dict) -> list[tuple[str, Any, Any]]:
  """Sorted (field, old, new) for each differing flattened field; "<absent>"
  stands for the side a field is missing from."""
  old_flat, new_flat = flatten(old), flatten(new)
  missing = object()
  diff = []
  for name in sorted(old_flat.keys() | new_flat.keys()):
    a, b = old_flat.get(name, missing), new_flat.get(name, missing)
    if a is missing or b is missing or not _same(a, b):
      diff.append((name, ABSENT if a is missing else a, ABSENT if b is missing else b))
  return diff


def _matches(field: str, pattern: str) -> bool:
  if pattern.endswith(".*"):
    return field.startswith(pattern[:-1])
  return field == pattern


def _show(value: Any) -> str:
  return ABSENT if isinstance(value, str) and value == ABSENT else repr(value)


def format_change(field: str, old: Any, new: Any) -> str:
  """'train.num_steps: 600 -> 1000'."""
  return f"{field}: {_show(old)} -> {_show(new)}"


def check_resume(recorded: dict, config: dict, allowed: Sequence[str],
                 never: Sequence[str], *, path: str = RECORD_NAME
                 ) -> list[tuple[str, Any, Any]]:
  """Checks a resumed run's config against the record it was started with.

  `recorded` is the record (read_record's result); its "config" is compared
  with `config`. Returns the differences whose field matches an `allowed`
  pattern and no `never` pattern; raises ConfigChanged listing all others.
  Patterns are dotted field names or prefixes like "train.*". `path` is the
  record's path, for the message.
  """
  old = recorded["config"]
  known = sorted(flatten(old).keys() | flatten(config).keys())
  for pattern in allowed:
    if not any(_matches(field, pattern) for field in known):
      near = difflib.get_close_matches(pattern.removesuffix(".*"), known, n=5)
      raise ValueError(f"--allow_config_change: {pattern!r} matches no config field"
                       + (f"; did you mean {', '.join(near)}?" if near else ""))
  accepted, refused = [], []
  for change in config_diff(old, config):
    field = change[0]
    if any(_matches(field, p) for p in allowed) and not any(
        _matches(field, p) for p in never):
      accepted.append(change)
    else:
      refused.append(change)
  if refused:
    raise ConfigChanged(_refusal(path, refused, never))
  return accepted


def _refusal(path: str, refused: list[tuple[str, Any, Any]],
             never: Sequence[str]) -> str:
  fixed = [c[0] for c in refused if any(_matches(c[0], p) for p in never)]
  changeable = [c[0] for c in refused if c[0] not in fixed]
  lines = [f"the config differs from the one this run was started with ({path}):"]
  lines += [f"  {format_change(*c)}" + ("  (can never change)" if c[0] in fixed else "")
            for c in refused]
  if changeable:
    lines.append("To resume with these changes, pass "
                 f"--allow_config_change={','.join(changeable)}")
  if fixed:
    lines.append(f"{', '.join(fixed)} can never change on resume (it changes the "
                 "shapes of the saved state or the meaning of the run); start a new "
                 "run in another --workdir instead.")
  return "\n".join(lines)
