"""Model FLOPs per token of a training step, and device peaks for MFU.

The count is the usual "6N + attention" of PaLM (Chowdhery et al., 2022,
appendix B): a training step does a forward pass (2 FLOPs per weight a token
multiplies) and a backward pass twice as large (the gradients of the inputs
and of the weights), so each weight a token touches costs 6 FLOPs. It counts
model FLOPs, the work the model needs, not what the hardware executes:
rematerialisation, capacity padding and the elementwise ops (norms, softmax,
activations, the optimiser) are left out.

Per token, with d = d_model, H = num_heads, D = head_dim, L = seq_len:

* attention projections: 6 * 4 * d * H * D per layer (q, k, v, out);
* attention scores and values: 6 * 2 * L * H * D per layer (q k^T and p v, each
  2 * L * H * D forward), the PaLM term 12 * L * H * D. With ``causal`` (the
  default) it is halved: a query attends on average to half the sequence, and
  the masked half does not contribute. ``causal=False`` gives PaLM's count,
  which some MFU reports (PaLM, torchtitan) use; MaxText halves as here;
* dense FFN layers: 6 * 3 * d * d_ff (SwiGLU: gate, up, down) or 6 * 2 * d * d_ff
  (MLP);
* routed experts: 6 * k * 3 * d * d_expert per MoE layer (2 for MLP experts),
  where k is the number of experts a token activates: ``top_k`` for token-choice
  routers (topk, noisy_topk, sigmoid_topk), 1 for hash. Routers whose count
  varies use the value capacity dispatch budgets for (``Routing.nominal_k``):
  expert choice E * C / T (about ``expert_capacity_factor``; T = batch_size *
  seq_len tokens routed together), and the dense-to-sparse gates their
  ``top_k`` (early in training, at high temperature, they activate more);
* shared experts: 6 * num_shared_experts * 3 * d * d_shared per MoE layer;
* router: 6 * d * E per MoE layer for each learned projection (two for
  noisy_topk, none for hash);
* unembedding: 6 * d * vocab (tied or not, the logits are one matmul). The
  embedding lookup is a gather: 0 FLOPs.

MFU = model FLOP/s / (peak bf16 FLOP/s of a device * devices).
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp

from moe_jax import routers
from moe_jax.layers.experts import EXPERT_KINDS
from moe_jax.layers.moe import MoeConfig
from moe_jax.layers.transformer import ModelConfig
from moe_jax.routing import RouterInputs

# Dense bfloat16 peak TFLOP/s of one jax device, by ``device.device_kind``.
# NVIDIA: the datasheets' "BF16 Tensor Core" figures are with 2:4 sparsity; dense is
# half (A100: 312; H100 SXM: 1,979 -> 989; H100 PCIe: 1,513 -> 756; H200 SXM as H100
# SXM). TPU: jax's own table (jax/_src/tpu_info.py, bf16_ops_per_second per chip,
# jax 0.12) and the Cloud TPU docs: v4 275, v5e 197, v5p 459, v6e 918 (jax: 920).
# One jax device is one chip on these TPUs (v4 and v5p as megacore).
PEAK_BF16_TFLOPS: dict[str, float] = {
    "NVIDIA A100-SXM4-40GB": 312.0,
    "NVIDIA A100-SXM4-80GB": 312.0,
    "NVIDIA A100-PCIE-40GB": 312.0,
    "NVIDIA A100 80GB PCIe": 312.0,
    "NVIDIA H100 80GB HBM3": 989.0,
    "NVIDIA H100 PCIe": 756.0,
    "NVIDIA H200": 989.0,
    "TPU v4": 275.0,
    "TPU v5 lite": 197.0,
    "TPU v5e": 197.0,
    "TPU v5": 459.0,
    "TPU v5p": 459.0,
    "TPU v6 lite": 918.0,
    "TPU v6e": 918.0,
}


def peak_tflops(device_kind: str) -> Optional[float]:
  """Dense bf16 peak TFLOP/s of one device of this kind; None when not in the table."""
  return PEAK_BF16_TFLOPS.get(device_kind)


@dataclasses.dataclass(frozen=True)
class FlopCount:
  """Training FLOPs (forward + backward) per token, by part; see the module docstring."""
  attention_projections: float
  attention_scores: float
  dense_ffn: float
  routed_experts: float
  shared_experts: float
  router: float
  unembedding: float
  active_experts_per_token: float   # k of the routed experts (0 without MoE layers)

  @property
  def total(self) -> float:
    return (self.attention_projections + self.attention_scores + self.dense_ffn
            + self.routed_experts + self.shared_experts + self.router + self.unembedding)

  @property
  def active_params(self) -> float:
    """Weights one token multiplies: the 6N part of ``total``, divided by 6."""
    return (self.total - self.attention_scores) / 6

  def describe(self) -> str:
    return (f"{_si(self.total)}FLOP per token trained (6 x {self.active_params / 1e6:.4g}M "
            f"active weights + attention {self.attention_scores / self.total:.0%})")


def _si(value: float) -> str:
  for scale, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
    if value >= scale:
      return f"{value / scale:.3g} {prefix}"
  return f"{value:.3g} "


def active_experts_per_token(moe: MoeConfig, num_tokens: int) -> float:
  """The experts a token activates on average: the router's ``Routing.nominal_k``
  for ``num_tokens`` tokens routed together.

  Read from an abstract evaluation of the router itself, so every registered
  router is covered without naming it (no arrays are allocated).
  """
  router = routers.of(moe.router)
  t, e = num_tokens, moe.num_experts
  candidates = {
      "logits": jax.ShapeDtypeStruct((t, e), jnp.float32),
      "noise_logits": jax.ShapeDtypeStruct((t, e), jnp.float32),
      "token_ids": jax.ShapeDtypeStruct((t,), jnp.int32),
      "step": jax.ShapeDtypeStruct((), jnp.int32),
  }
  if router.state is not None:
    candidates["state"] = jax.eval_shape(lambda: router.state.init(moe.router))
  inputs = {name: candidates[name] for name in router.inputs}
  routing = jax.eval_shape(
      lambda inputs: router.route(RouterInputs(**inputs), moe.router, None, False), inputs)
  return float(routing.nominal_k)


def _ffn_matrices(kind: str) -> int:
  return 3 if EXPERT_KINDS[kind].gated else 2


def model_flops_per_token(cfg: ModelConfig, seq_len: int, *, batch_size: int = 1,
                          causal: bool = True) -> FlopCount:
  """Training FLOPs per token of ``cfg`` on sequences of ``seq_len`` tokens.

  ``batch_size`` only matters for routers whose experts per token depend on how
  many tokens are routed together (expert choice); ``causal`` halves the
  attention score/value term.
  """
  d, moe = cfg.d_model, cfg.moe
  num_moe = sum(cfg.is_moe_layer(i) for i in range(cfg.num_layers))
  num_dense = cfg.num_layers - num_moe
  attention_width = cfg.num_heads * cfg.head_dim
  scores = 6 * 2 * seq_len * attention_width * (0.5 if causal else 1.0)
  k = active_experts_per_token(moe, batch_size * seq_len) if num_moe else 0.0
  expert_matrices = _ffn_matrices(moe.expert_kind)
  router = routers.of(moe.router)
  projections = len(router.inputs & {"logits", "noise_logits"})
  shared_width = moe.num_shared_experts * (moe.d_shared or moe.d_expert)
  return FlopCount(
      attention_projections=6 * 4 * d * attention_width * cfg.num_layers,
      attention_scores=scores * cfg.num_layers,
      dense_ffn=6 * _ffn_matrices(cfg.ffn_kind) * d * cfg.d_ff * num_dense,
      routed_experts=6 * k * expert_matrices * d * moe.d_expert * num_moe,
      shared_experts=6 * expert_matrices * d * shared_width * num_moe,
      router=6 * projections * d * moe.num_experts * num_moe,
      unembedding=6 * d * cfg.vocab_size,
      active_experts_per_token=k,
  )


def dense_equivalent(cfg: ModelConfig, num_tokens: int) -> ModelConfig:
  """``cfg`` with every feed-forward block dense (``moe_every=0``, the experts'
  kind) and as wide as what a token activates in a MoE layer: ``d_ff = k *
  d_expert + num_shared_experts * d_shared`` (k from ``active_experts_per_token``
  for ``num_tokens`` routed together, the width rounded). Its FLOPs per token are
  the MoE model's less the router's when every layer is MoE; with ``moe_every > 1``
  the dense layers take that width too."""
  moe = cfg.moe
  k = active_experts_per_token(moe, num_tokens)
  width = round(k * moe.d_expert) + moe.num_shared_experts * (moe.d_shared or moe.d_expert)
  return dataclasses.replace(cfg, moe_every=0, d_ff=width, ffn_kind=moe.expert_kind)


def throughput(tokens_per_sec: float, flops_per_token: float, num_devices: int,
               peak: Optional[float]) -> dict[str, float]:
  """``perf/model_tflops_per_sec`` (all devices together) and, when the device's
  peak TFLOP/s is known, ``perf/mfu`` = that / (peak * num_devices)."""
  tflops = tokens_per_sec * flops_per_token / 1e12
  out = {"perf/model_tflops_per_sec": tflops}
  if peak:
    out["perf/mfu"] = tflops / (peak * num_devices)
  return out
