"""Simulate 8 CPU devices for multi-device tests (must precede the jax import).

Also compile at LLVM -O0: XLA's own HLO passes still run, but the CPU backend
skips LLVM's optimisations. The suite is mostly compile time (tiny programs,
thousands of them), and -O0 cuts its CPU time by about a fifth; results only
move by float rounding, well inside every test's tolerance. Subprocesses that
tests start inherit the flags.

A run that selects the GPU tests (``python -m pytest -m gpu ...``) keeps jax's
default backend and compiler flags instead; those tests skip themselves where
the default backend is not a GPU.
"""
import os

import pytest


def _selects_gpu_tests(config) -> bool:
  expr = config.option.markexpr or ""
  return "gpu" in expr and "not gpu" not in expr


def pytest_configure(config):
  # Runs before the test modules (and so jax) are imported.
  if not _selects_gpu_tests(config):
    os.environ.setdefault(
        "XLA_FLAGS",
        "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0")
    os.environ.setdefault("JAX_PLATFORMS", "cpu")


def pytest_addoption(parser):
  parser.addoption(
      "--tile-variants", default="",
      help="comma-separated Mosaic kernel tile variants (names as in benchmarks.gmm, e.g. "
           "pallas_mosaic@split=m,tgmm_mosaic@stages=2) that tests/test_gpu_kernels.py "
           "checks besides its own")


@pytest.fixture
def mosaic_calls(monkeypatch):
  """Records which products the Mosaic GPU kernels ran: "gmm", "gmm_t" (transposed), "tgmm"."""
  from moe_kernels import gmm_mosaic, tgmm_mosaic  # pylint: disable=g-import-not-at-top
  calls = []
  real_gmm, real_tgmm = gmm_mosaic.gmm, tgmm_mosaic.tgmm

  def gmm_spy(*args, **kwargs):
    calls.append("gmm_t" if kwargs.get("transpose_rhs", False) else "gmm")
    return real_gmm(*args, **kwargs)

  def tgmm_spy(*args, **kwargs):
    calls.append("tgmm")
    return real_tgmm(*args, **kwargs)
  monkeypatch.setattr(gmm_mosaic, "gmm", gmm_spy)
  monkeypatch.setattr(tgmm_mosaic, "tgmm", tgmm_spy)
  return calls
