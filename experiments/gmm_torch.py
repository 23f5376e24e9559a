"""torch._grouped_mm against torch.mm on the benchmark shapes (``benchmark_gmm --torch``)."""
from __future__ import annotations

import json

import numpy as np

from experiments.gmm_common import SHAPES, group_sizes


def run_torch(log, shapes, dists):
  """torch._grouped_mm and torch.mm (dense) on the same shapes, in a torch-only process."""
  import torch  # pylint: disable=g-import-not-at-top
  import triton.testing  # pylint: disable=g-import-not-at-top
  dev = "cuda"
  for sname in shapes:
    m, k, n, e = SHAPES[sname]
    x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
    # _grouped_mm wants the 3-D operand column-major in its last two dims.
    w = (torch.randn(e, n, k, device=dev, dtype=torch.bfloat16) / k ** 0.5).transpose(1, 2)
    dy = torch.randn(m, n, device=dev, dtype=torch.bfloat16)
    wd = w[0].contiguous()
    t_dense = triton.testing.do_bench(lambda: torch.mm(x, wd), return_mode="median") / 1e3
    flops = 2.0 * m * k * n
    for dist in dists:
      offs = torch.tensor(np.cumsum(group_sizes(m, e, dist)), device=dev, dtype=torch.int32)
      xg = x.detach().requires_grad_(True)
      wg = w.detach().requires_grad_(True)

      def fwd():
        return torch._grouped_mm(xg, wg, offs=offs)  # pylint: disable=protected-access

      def fwdbwd():
        y = fwd()
        return torch.autograd.grad(y, (xg, wg), dy)

      for mode, fn, mult in (("fwd", fwd, 1), ("fwdbwd", fwdbwd, 3)):
        try:
          t = triton.testing.do_bench(fn, return_mode="median") / 1e3
        except Exception as exc:  # pylint: disable=broad-except
          print(f"FAILED torch {sname} {dist} {mode}: {exc!r}"[:500], flush=True)
          continue
        row = dict(kind="bench", shape=sname, mkne=(m, k, n, e), dist=dist,
                   impl="torch_grouped_mm", mode=mode, ms=t * 1e3,
                   tflops=mult * flops / t / 1e12, ratio=mult * t_dense / t)
        log.append(row)
        print(json.dumps(row), flush=True)
    log.append(dict(kind="bench", shape=sname, mkne=(m, k, n, e), dist="-", impl="torch_dense",
                    mode="fwd", ms=t_dense * 1e3, tflops=flops / t_dense / 1e12, ratio=1.0))
