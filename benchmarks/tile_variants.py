"""Names of Mosaic kernel tile variants, e.g. ``pallas_mosaic@split=m``.

``pallas_mosaic@tm/tn/tk/stages/window`` sets those fields of ``gmm_mosaic.Tiles``
in order; ``tgmm_mosaic@tko/tn/tr/stages[/window[/window_from]]`` those of
``tgmm_mosaic.Tiles``. Any field may follow by name (``.../epi_n=128``), and a
name with only named fields (``pallas_mosaic@split=m``) changes the kernel's
own default tiles for each shape, so one variant name means the same change at
every shape.
"""
from __future__ import annotations

import dataclasses

GMM_PREFIX = "pallas_mosaic@"
TGMM_PREFIX = "tgmm_mosaic@"
VARIANT_PREFIXES = (GMM_PREFIX, TGMM_PREFIX)
GMM_POSITIONAL = ("tm", "tn", "tk", "stages", "window")
GMM_REQUIRED = 5
TGMM_POSITIONAL = ("tko", "tn", "tr", "stages", "window", "window_from")
TGMM_REQUIRED = 4


def variant_tiles(name: str, tiles_cls, positional_fields, required: int, defaults=None):
  """``prefix@v1/v2/...[/field=value...]`` -> ``tiles_cls``: the first ``required``
  of ``positional_fields`` in order, then optional ones in order, then any field
  of ``tiles_cls`` by name. Omitted fields take the class defaults; with no
  positional values at all (``prefix@field=value/...``) they take ``defaults``
  (the kernel's own choice for the shape)."""
  prefix, spec = name.split("@", 1)
  tokens = spec.split("/")
  first_named = next((i for i, v in enumerate(tokens) if "=" in v), len(tokens))
  positional = tokens[:first_named]
  named = dict(v.split("=", 1) for v in tokens[first_named:] if "=" in v)
  fields = {f.name: f for f in dataclasses.fields(tiles_cls)}
  unknown = sorted(set(named) - set(fields))
  positional_after_named = any("=" not in v for v in tokens[first_named:])
  if ((positional and not required <= len(positional) <= len(positional_fields)) or unknown
      or positional_after_named or (not positional and not named)):
    optional = ("".join(f"[/{n}" for n in positional_fields[required:])
                + "]" * (len(positional_fields) - required))
    raise ValueError(f"{name!r}: want {prefix}@{'/'.join(positional_fields[:required])}"
                     f"{optional}[/field=value...] or {prefix}@field=value[/...], fields from "
                     f"{sorted(fields)}")
  texts = {**dict(zip(positional_fields, positional)), **named}
  values = {f: type(getattr(tiles_cls(), f))(text) for f, text in texts.items()}
  if positional or defaults is None:
    return tiles_cls(**values)
  return dataclasses.replace(defaults, **values)


def parse_variant(name: str, defaults=None):
  """A ``pallas_mosaic@...`` or ``tgmm_mosaic@...`` name -> that kernel's Tiles;
  raises ValueError on a malformed name."""
  from moe_kernels import gmm_mosaic, tgmm_mosaic  # pylint: disable=g-import-not-at-top
  if name.startswith(TGMM_PREFIX):
    return variant_tiles(name, tgmm_mosaic.Tiles, TGMM_POSITIONAL, TGMM_REQUIRED, defaults)
  if name.startswith(GMM_PREFIX):
    return variant_tiles(name, gmm_mosaic.Tiles, GMM_POSITIONAL, GMM_REQUIRED, defaults)
  raise ValueError(f"{name!r} is not a variant ({', '.join(p + '...' for p in VARIANT_PREFIXES)})")
