"""Sums the device kernels of a jax.profiler perfetto trace by name.

  python -m tools.trace_summary TRACE_DIR_OR_FILE [--top 25] [--steps 3]

The command line over ``moe_jax.profiling`` (``find_traces``, ``kernel_times``,
``print_summary``): device work only, or the host's XLA ops when the trace has
no device (a CPU run).
"""
from __future__ import annotations

import sys

from moe_jax.profiling import find_traces, kernel_times, print_summary

__all__ = ["find_traces", "kernel_times", "print_summary", "main"]


def main(argv: list[str]) -> int:
  import argparse  # pylint: disable=g-import-not-at-top
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("path")
  parser.add_argument("--top", type=int, default=25)
  parser.add_argument("--steps", type=int, default=1)
  args = parser.parse_args(argv)
  paths = find_traces(args.path)
  if not paths:
    print(f"no perfetto trace under {args.path!r}", file=sys.stderr)
    return 1
  for path in paths:
    print(path)
    print_summary(kernel_times(path), steps=args.steps, top=args.top)
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
