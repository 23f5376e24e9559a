"""Simulate 8 CPU devices for multi-device tests (must precede the jax import).

Also compile at LLVM -O0: XLA's own HLO passes still run, but the CPU backend
skips LLVM's optimisations. The suite is mostly compile time (tiny programs,
thousands of them), and -O0 cuts its CPU time by about a fifth; results only
move by float rounding, well inside every test's tolerance. Subprocesses that
tests start inherit the flags.
"""
import os

os.environ.setdefault(
    "XLA_FLAGS", "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402  pylint: disable=g-import-not-at-top


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
