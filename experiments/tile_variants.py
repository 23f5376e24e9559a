"""Names of Mosaic kernel tile variants for the benchmarks.

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
