"""Result rows of the grouped-matmul programs: one JSON line each as measured, a table at the end."""
from __future__ import annotations

import json
import pathlib


def emit(log: list, **row) -> None:
  log.append(row)
  print(json.dumps(row), flush=True)


def failed(what: str, exc: Exception) -> None:
  print(f"FAILED {what}: {exc!r}"[:2000], flush=True)


def write_json(log: list, path: str) -> None:
  if path:
    pathlib.Path(path).write_text(json.dumps(log, indent=1))


def print_table(log: list, header: list[str]) -> None:
  """The "bench" rows of ``log`` under ``header`` lines: ratio > 1 is faster than the baseline."""
  print()
  for line in header:
    print(line)
  print(f"{'shape':10s} {'dist':8s} {'impl':14s} {'mode':6s} {'ms':>9s} {'TF/s':>7s} {'ratio':>6s}")
  for r in log:
    if r["kind"] == "bench":
      print(f"{r['shape']:10s} {r['dist']:8s} {r['impl']:14s} {r['mode']:6s} "
            f"{r['ms']:9.3f} {r['tflops']:7.1f} {r['ratio']:6.2f}")
