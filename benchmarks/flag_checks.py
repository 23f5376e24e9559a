"""Flag validation for the programs: a bad value stops the program at flag
parsing, before any device work, with a message naming the flag and the allowed values."""
from __future__ import annotations

from absl import flags


def require_choices(flag: flags.FlagHolder, allowed) -> None:
  """Every value of the list flag ``flag`` must be one of ``allowed``."""
  allowed = tuple(allowed)

  def check(values) -> bool:
    for value in values:
      if value not in allowed:
        raise flags.ValidationError(f"{value!r} is not one of {list(allowed)}")
    return True
  flags.register_validator(flag, check)
