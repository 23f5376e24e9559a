"""Names of the benchmarks' implementations and Mosaic kernel tile variants.

``pallas_mosaic@tm/tn/tk/stages/window[/overlap[/light_max[/group_aligned]]]``
sets fields of ``gmm_mosaic.Tiles`` in order; ``tgmm_mosaic@tko/tn/tr/stages[/...]``
those of ``tgmm_mosaic.Tiles``. Any field may follow by name
(``.../split=m``), and a name with only named fields (``pallas_mosaic@split=m``)
changes the kernel's own default tiles for each shape, so one variant name means
the same change at every shape.
"""
from __future__ import annotations

import dataclasses

GMM_FIELDS = ("tm", "tn", "tk", "stages", "window", "overlap", "light_max", "group_aligned")
GMM_REQUIRED = 5
TGMM_FIELDS = ("tko", "tn", "tr", "stages", "window", "window_from", "group_aligned")
TGMM_REQUIRED = 4


def _field_value(tiles_cls, field, text):
  default = getattr(tiles_cls(), field)
  if isinstance(default, bool):
    return text.lower() in ("1", "true")
  return type(default)(text)


def variant_tiles(name, tiles_cls, names, required, defaults=None):
  """``prefix@v1/v2/...[/field=value...]`` -> ``tiles_cls``: the first ``required``
  of ``names`` given in order, then optional ones in order, then any field of
  ``tiles_cls`` by name. Omitted fields take the class defaults; with no positional
  values at all (``prefix@field=value/...``) they take ``defaults`` (the kernel's
  own choice for the shape), so one variant name means the same change everywhere."""
  prefix, spec = name.split("@")
  tokens = spec.split("/")
  npos = next((i for i, v in enumerate(tokens) if "=" in v), len(tokens))
  positional = tokens[:npos]
  named = dict(v.split("=", 1) for v in tokens[npos:] if "=" in v)
  fields = {f.name for f in dataclasses.fields(tiles_cls)}
  unknown = sorted(set(named) - fields)
  bad_order = any("=" not in v for v in tokens[npos:])
  if ((positional and not required <= len(positional) <= len(names)) or unknown or bad_order
      or (not positional and not named)):
    optional = "".join(f"[/{n}" for n in names[required:]) + "]" * (len(names) - required)
    raise ValueError(f"{name!r}: want {prefix}@{'/'.join(names[:required])}{optional}"
                     f"[/field=value...] or {prefix}@field=value[/...], fields from "
                     f"{sorted(fields)}")
  values = {k: _field_value(tiles_cls, k, v) for k, v in {**dict(zip(names, positional)),
                                                           **named}.items()}
  if positional or defaults is None:
    return tiles_cls(**values)
  return dataclasses.replace(defaults, **values)


def parse_variant(name, defaults=None):
  """A ``pallas_mosaic@...`` or ``tgmm_mosaic@...`` name -> that kernel's Tiles
  (``variant_tiles`` with the kernel's class and field order); raises on a
  malformed name."""
  from moe_kernels import gmm_mosaic, tgmm_mosaic  # pylint: disable=g-import-not-at-top
  if name.startswith("tgmm_mosaic@"):
    return variant_tiles(name, tgmm_mosaic.Tiles, TGMM_FIELDS, TGMM_REQUIRED, defaults)
  if name.startswith("pallas_mosaic@"):
    return variant_tiles(name, gmm_mosaic.Tiles, GMM_FIELDS, GMM_REQUIRED, defaults)
  raise ValueError(f"{name!r} is not a variant ({', '.join(p + '...' for p in VARIANT_PREFIXES)})")


MODES = ("fwd", "fwdbwd", "tgmm", "dx")
IMPLS = ("pallas_mosaic", "pallas_triton", "pallas_mosaic_bf16x3", "ragged_dot",
         "pallas_dense", "pallas_e1", "tgmm_mosaic")
VARIANT_PREFIXES = ("pallas_mosaic@", "tgmm_mosaic@")


def has_kernel(impl, mode) -> bool:
  """Whether benchmark_gmm times ``impl`` in ``mode`` (by name alone)."""
  base = impl.split("@")[0]
  variant = "@" in impl
  if base == "tgmm_mosaic":
    return mode == "tgmm"
  if base in ("pallas_dense", "pallas_e1") or (variant and mode == "fwdbwd"):
    return mode == "fwd"
  if mode == "tgmm":
    return base in ("pallas_triton", "pallas_mosaic", "pallas_mosaic_bf16x3") and not variant
  if mode == "dx":
    return base == "pallas_mosaic"
  return True


def check_impls(impls, modes, baseline):
  """Refuses, before any compute: unknown modes or impl names, malformed variant
  names, impls with no kernel in any of ``modes``, and with ``baseline="first"``
  a mode that no impl has."""
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


def first_in_mode(impls, mode):
  """--baseline=first: the first of ``impls`` with a kernel in ``mode`` (so
  ``pallas_mosaic@...`` and ``tgmm_mosaic@...`` variants can share a run)."""
  for impl in impls:
    if has_kernel(impl, mode):
      return impl
  raise ValueError(f"--baseline=first: none of --impls has a kernel in mode {mode!r}")
