r"""torch._grouped_mm against torch.mm of equal FLOPs on the grouped-matmul benchmark's shapes.

  python -m benchmarks.gmm_torch --shapes=fine-768,dsv3

The torch counterpart of ``python -m benchmarks.gmm`` (same shapes, group sizes,
bfloat16, and timing: each row alternates samples with the dense torch.mm, and
ratio = dense time / its time). A torch-only process: no JAX work, so the two
frameworks do not compete for GPU memory. Needs torch with CUDA.
"""
from __future__ import annotations

from absl import app
from absl import flags
import numpy as np

from benchmarks import rows
from benchmarks import timing
from benchmarks.flag_checks import require_choices
from benchmarks.gmm_shapes import DEFAULT_SHAPES, DISTS, SHAPES, group_sizes

_SHAPES = flags.DEFINE_list("shapes", list(DEFAULT_SHAPES), f"names from {sorted(SHAPES)}")
_DISTS = flags.DEFINE_list("dists", list(DISTS), "group-size distributions")
_ITERS = flags.DEFINE_integer("iters", 20, "calls per timing sample")
_REPS = flags.DEFINE_integer("reps", 5, "timing samples (median taken)")
_JSON_OUT = flags.DEFINE_string("json_out", "", "write all rows as JSON here")

require_choices(_SHAPES, SHAPES)
require_choices(_DISTS, DISTS)


def run_shape(log, sname, torch):
  m, k, n, e = SHAPES[sname]
  dev = "cuda"
  sync = lambda _: torch.cuda.synchronize()
  times = dict(iters=_ITERS.value, reps=_REPS.value, sync=sync)
  x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
  # _grouped_mm wants the 3-D operand column-major in its last two dims.
  w = (torch.randn(e, n, k, device=dev, dtype=torch.bfloat16) / k ** 0.5).transpose(1, 2)
  dy = torch.randn(m, n, device=dev, dtype=torch.bfloat16)
  dense = (torch.mm, (x, w[0].contiguous()))
  flops = 2.0 * m * k * n
  t_dense = timing.median_seconds(dense[0], *dense[1], **times)
  rows.emit(log, kind="bench", shape=sname, mkne=(m, k, n, e), dist="-", impl="torch_dense",
            mode="fwd", ms=t_dense * 1e3, tflops=flops / t_dense / 1e12, ratio=1.0)
  for dist in _DISTS.value:
    offs = torch.tensor(np.cumsum(group_sizes(m, e, dist)), device=dev, dtype=torch.int32)
    xg = x.detach().requires_grad_(True)
    wg = w.detach().requires_grad_(True)

    def fwd():
      return torch._grouped_mm(xg, wg, offs=offs)  # pylint: disable=protected-access

    def fwdbwd():
      y = fwd()
      return y, torch.autograd.grad(y, (xg, wg), dy)

    for mode, fn, scale in (("fwd", fwd, 1), ("fwdbwd", fwdbwd, 3)):
      try:
        pair = timing.paired(*dense, fn, (), **times)
      except Exception as exc:  # pylint: disable=broad-except
        rows.failed(f"torch {sname} {dist} {mode}", exc)
        continue
      rows.emit(log, kind="bench", shape=sname, mkne=(m, k, n, e), dist=dist,
                impl="torch_grouped_mm", mode=mode, ms=pair.seconds * 1e3,
                tflops=scale * flops / pair.seconds / 1e12, ratio=scale * pair.ratio)


def main(argv):
  del argv
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as exc:
    raise app.UsageError("benchmarks.gmm_torch needs torch with a CUDA device; "
                         "torch is not installed") from exc
  if not torch.cuda.is_available():
    raise app.UsageError("benchmarks.gmm_torch needs torch with a CUDA device")
  log = []
  for sname in _SHAPES.value:
    run_shape(log, sname, torch)
  rows.write_json(log, _JSON_OUT.value)
  rows.print_table(log, [f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}"
                         "  dtype bfloat16"])


if __name__ == "__main__":
  app.run(main)
