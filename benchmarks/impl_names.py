"""Which implementation names the grouped-matmul benchmark knows, and in which modes.

Modes: ``fwd`` (forward), ``fwdbwd`` (forward and both gradients), ``tgmm``
(the weight-gradient kernel alone) and ``dx`` (the input-gradient product
alone, Mosaic kernels). Names are checked here before any device work.
"""
from __future__ import annotations

from benchmarks.tile_variants import VARIANT_PREFIXES, parse_variant

MODES = ("fwd", "fwdbwd", "tgmm", "dx")
IMPLS = ("pallas_mosaic", "pallas_triton", "pallas_mosaic_bf16x3", "ragged_dot",
         "pallas_dense", "pallas_e1", "tgmm_mosaic")
FORWARD_ONLY_CONTROLS = ("pallas_dense", "pallas_e1")
MOSAIC_MODES = ("fwd", "dx", "tgmm")  # the products a Mosaic kernel name can mean
TGMM_BACKENDS = {"pallas_triton": "triton", "pallas_mosaic": "mosaic",
                 "pallas_mosaic_bf16x3": "mosaic_bf16x3"}


def has_kernel(impl: str, mode: str) -> bool:
  """Whether ``impl`` runs in ``mode`` (by name alone)."""
  base = impl.split("@")[0]
  variant = "@" in impl
  if base == "tgmm_mosaic":
    return mode == "tgmm"
  if base in FORWARD_ONLY_CONTROLS or (variant and mode == "fwdbwd"):
    return mode == "fwd"
  if mode == "tgmm":
    return base in TGMM_BACKENDS and not variant
  if mode == "dx":
    return base == "pallas_mosaic"
  return True


def check_impls(impls, modes, baseline: str) -> None:
  """Raises ValueError for unknown modes or impl names, malformed variant names,
  impls with no kernel in any of ``modes``, and with ``baseline="first"`` a mode
  that no impl has."""
  for mode in modes:
    if mode not in MODES:
      raise ValueError(f"--modes: {mode!r} is not one of {MODES}")
  for impl in impls:
    if impl.startswith(VARIANT_PREFIXES):
      parse_variant(impl)
    elif impl not in IMPLS:
      raise ValueError(f"--impls: {impl!r} is not one of {IMPLS} nor a variant "
                       f"({', '.join(p + '...' for p in VARIANT_PREFIXES)})")
    if not any(has_kernel(impl, mode) for mode in modes):
      raise ValueError(f"--impls: {impl!r} has no kernel in --modes={','.join(modes)}")
  if baseline == "first":
    for mode in modes:
      first_in_mode(impls, mode)


def first_in_mode(impls, mode: str) -> str:
  """--baseline=first: the first of ``impls`` with a kernel in ``mode`` (so
  ``pallas_mosaic@...`` and ``tgmm_mosaic@...`` variants can share a run)."""
  for impl in impls:
    if has_kernel(impl, mode):
      return impl
  raise ValueError(f"--baseline=first: none of --impls has a kernel in mode {mode!r}")


def check_mosaic_impl(impl: str, mode: str) -> None:
  """Raises ValueError unless ``impl`` names the Mosaic kernel of ``mode`` (one of
  MOSAIC_MODES) or one of its tile variants."""
  kernel = "tgmm_mosaic" if mode == "tgmm" else "pallas_mosaic"
  if impl.split("@")[0] != kernel:
    raise ValueError(f"--impls: {impl!r} is not {kernel} nor {kernel}@... (--mode={mode})")
  if "@" in impl:
    parse_variant(impl)
