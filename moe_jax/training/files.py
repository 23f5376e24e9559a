"""Writing a workdir file atomically: a reader sees the old file or the new one."""
from __future__ import annotations

import os
import pathlib
import tempfile


def _umask() -> int:
  mask = os.umask(0)
  os.umask(mask)
  return mask


def atomic_write(path: str | os.PathLike[str], data: str | bytes) -> str:
  """Writes ``data`` to a temporary file beside ``path``, syncs it, and renames
  it over ``path``. The file gets the usual permissions (0666 less the umask),
  not mkstemp's 0600."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data.encode("utf-8") if isinstance(data, str) else data)
      f.flush()
      os.fsync(f.fileno())
    os.chmod(tmp, 0o666 & ~_umask())
    os.replace(tmp, path)
  except BaseException:
    pathlib.Path(tmp).unlink(missing_ok=True)
    raise
  return str(path)
