"""Causal self-attention implementations by name, chosen per backend.

``model.attention_impl`` names one; ``"auto"`` takes the first in
``AUTO_ORDER`` for the platform that can run the given dtype and shape:

* ``cudnn``: cuDNN's fused flash attention through
  ``jax.nn.dot_product_attention(implementation="cudnn")`` (FlashAttention-2,
  Dao 2023, arXiv:2307.08691). It never materialises the [B, H, L, L] scores
  and skips the blocks above the causal diagonal. Its limits are those jax
  checks (jax/_src/cudnn/fused_attention_stablehlo.py: ``check_layout``,
  ``check_is_flash_attention``, ``_check_qkv_bias_mask_spec``): bf16 or fp16
  inputs (fp8 only through a separate scaled API), head_dim a multiple of 8 and
  at most 128, or 256 from Hopper (sm_90) on; its partitioner shards batch and
  heads only. cuDNN runs flash attention from Ampere (sm_80) on.
* ``pallas_tpu``: the Pallas TPU flash-attention kernel
  (jax.experimental.pallas.ops.tpu.flash_attention; Dao et al. 2022,
  arXiv:2205.14135). With its 128-wide key blocks the sequence must be a
  multiple of 128, and head_dim at most 128 or a multiple of 128. The kernel
  is a Mosaic custom call that XLA cannot partition, so under a mesh it runs
  per device in a ``shard_map`` over batch and heads. On other platforms it
  runs only in the Pallas TPU interpreter (``pltpu.force_tpu_interpret_mode``),
  which the tests use.
* ``xla``: ``jax.nn.dot_product_attention(implementation="xla")``, any
  platform, dtype and shape; it materialises the scores.

``resolve`` returns the implementation or raises ConfigError naming
``model.attention_impl``, the reason and what ``auto`` would take. The
training loop calls it (through moe_jax.config_validation) before compute;
``attend`` calls it again at trace time, so the layer works outside the loop.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from moe_jax.config_fields import ConfigError
from moe_jax.ops import device

FIELD = "model.attention_impl"
# Logical axes of q, k and v [B, L, H, D]; the layer constrains them to these.
QKV_AXES = ("activation_batch", "activation_length", "activation_heads", "activation_kv")
# Names of those dimensions, as split_dims reports them.
QKV_DIMS = ("batch", "length", "heads", "head_dim")


@dataclasses.dataclass(frozen=True)
class AttentionImpl:
  name: str
  fn: Callable            # fn(q, k, v) -> out, all [B, L, H, D]; causal, scale 1/sqrt(D)
  # why_not(platform, dtype, head_dim, seq_len, *, compute_capability, split)
  #   -> None if it runs there, else the reason.
  why_not: Callable[..., Optional[str]]
  per_device: bool = False   # needs a shard_map under a mesh (XLA cannot partition it)


def _xla(q, k, v):
  return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="xla")


def _xla_why_not(platform, dtype, head_dim, seq_len, *, compute_capability=0.0, split=()):
  del platform, dtype, head_dim, seq_len, compute_capability, split
  return None


def _cudnn(q, k, v):
  return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")


def _cudnn_why_not(platform, dtype, head_dim, seq_len, *, compute_capability=0.0, split=()):
  if platform != "gpu":
    return f"cuDNN flash attention runs on NVIDIA GPUs, this platform is {platform!r}"
  if compute_capability < 8.0:
    return ("cuDNN flash attention needs an NVIDIA GPU of compute capability 8.0 (Ampere) "
            f"or newer, this GPU reports {compute_capability}")
  if jnp.dtype(dtype).name not in ("bfloat16", "float16"):
    return (f"cuDNN flash attention takes bfloat16/float16, the model runs in "
            f"{jnp.dtype(dtype).name} (model.dtype)")
  max_dim = 256 if compute_capability >= 9.0 else 128
  if head_dim % 8 or head_dim > max_dim:
    return (f"cuDNN flash attention takes model.head_dim a multiple of 8 and <= {max_dim} "
            f"on compute capability {compute_capability}, got {head_dim}")
  if seq_len % 2:
    # jax 0.11.2 on an H200 refused a causal training call at L=777 ("Unsupported
    # sequence length"): its causal path counts as one with a bias there.
    return f"cuDNN flash attention trains on even sequence lengths only, got {seq_len}"
  if split:
    return (f"cuDNN's partitioner shards q/k/v over batch and heads only; mesh.rules split "
            f"their {' and '.join(split)} across devices")
  return None


def _tpu_blocks(seq_len: int):
  from jax.experimental.pallas.ops.tpu import flash_attention as fa  # pylint: disable=g-import-not-at-top
  # The largest block of up to 512 that divides the sequence (a multiple of 128).
  b = math.gcd(seq_len, 512)
  return fa.BlockSizes(block_q=b, block_k_major=b, block_k=b, block_b=1,
                       block_q_major_dkv=b, block_k_major_dkv=b, block_k_dkv=b, block_q_dkv=b,
                       block_k_major_dq=b, block_k_dq=b, block_q_dq=b)


def _pallas_tpu(q, k, v):
  from jax.experimental.pallas.ops.tpu import flash_attention as fa  # pylint: disable=g-import-not-at-top
  bhld = [jnp.swapaxes(t, 1, 2) for t in (q, k, v)]   # the kernel takes [B, H, L, D]
  out = fa.flash_attention(*bhld, causal=True, sm_scale=q.shape[-1] ** -0.5,
                           block_sizes=_tpu_blocks(q.shape[1]))
  return jnp.swapaxes(out, 1, 2)


def _pallas_tpu_why_not(platform, dtype, head_dim, seq_len, *, compute_capability=0.0,
                        split=()):
  del compute_capability
  if platform != "tpu":
    return (f"the Pallas TPU flash-attention kernel runs on TPUs, this platform is "
            f"{platform!r} (elsewhere only in the Pallas TPU interpreter, for tests)")
  if jnp.dtype(dtype).name not in ("bfloat16", "float32"):
    return (f"the Pallas TPU flash-attention kernel takes bfloat16/float32, the model runs "
            f"in {jnp.dtype(dtype).name} (model.dtype)")
  if seq_len % 128:
    return (f"the Pallas TPU flash-attention kernel needs the sequence length (data.seq_len) "
            f"to be a multiple of 128, got {seq_len}")
  if head_dim > 128 and head_dim % 128:
    return (f"the Pallas TPU flash-attention kernel takes model.head_dim <= 128 or a "
            f"multiple of 128, got {head_dim}")
  if split:
    return (f"the Pallas TPU flash-attention kernel runs per device over batch and heads; "
            f"mesh.rules split q/k/v's {' and '.join(split)} across devices")
  return None


_IMPLS = {i.name: i for i in (
    AttentionImpl("xla", _xla, _xla_why_not),
    AttentionImpl("cudnn", _cudnn, _cudnn_why_not),
    AttentionImpl("pallas_tpu", _pallas_tpu, _pallas_tpu_why_not, per_device=True),
)}
# attention_impl="auto": the first of these that can run; xla runs everywhere.
AUTO_ORDER = {"gpu": ("cudnn", "xla"), "tpu": ("pallas_tpu", "xla"), "cpu": ("xla",)}


def known() -> list[str]:
  return ["auto", *sorted(_IMPLS)]


def get(name: str) -> AttentionImpl:
  if name not in _IMPLS:
    raise ConfigError(f"{FIELD}={name!r} is unknown; allowed: {known()}")
  return _IMPLS[name]


def resolve(name: str, platform: str, dtype, head_dim: int, seq_len: int, *,
            compute_capability: Optional[float] = None,
            split: tuple[str, ...] = ()) -> AttentionImpl:
  """The implementation ``name`` stands for; raises ConfigError if it cannot run.

  ``compute_capability`` defaults to the default device's (GPUs only);
  ``split`` names the q/k/v dimensions the mesh splits across devices
  (``split_dims``).
  """
  if compute_capability is None:
    compute_capability = device.compute_capability() if platform == "gpu" else 0.0
  where = dict(compute_capability=compute_capability, split=tuple(split))
  if name == "auto":
    for candidate in AUTO_ORDER.get(platform, ()) + ("xla",):
      if _IMPLS[candidate].why_not(platform, dtype, head_dim, seq_len, **where) is None:
        return _IMPLS[candidate]
  impl = get(name)
  reason = impl.why_not(platform, dtype, head_dim, seq_len, **where)
  if reason is not None:
    auto = resolve("auto", platform, dtype, head_dim, seq_len, **where).name
    raise ConfigError(f"{FIELD}={name!r} cannot run here: {reason}; allowed: 'auto' (which "
                      f"takes {auto!r} here) or an implementation that runs here")
  return impl


def split_dims(rules, axis_sizes: dict[str, int]) -> tuple[str, ...]:
  """The q/k/v dimensions other than batch and heads that ``rules`` shard over mesh
  axes of more than one device (``axis_sizes``: mesh axis -> size)."""
  spec = nn.logical_to_mesh_axes(QKV_AXES, rules) if rules else None
  out = []
  for dim, axes in zip(QKV_DIMS, spec or (None,) * 4):
    axes = axes if isinstance(axes, tuple) else (axes,)
    if dim in ("length", "head_dim") and math.prod(axis_sizes.get(a, 1) for a in axes
                                                   if a is not None) > 1:
      out.append(dim)
  return tuple(out)


def attend(name: str, q: jax.Array, k: jax.Array, v: jax.Array, *,
           platform: Optional[str] = None) -> jax.Array:
  """Causal attention of q, k, v [B, L, H, D] by the implementation ``name`` resolves
  to on ``platform`` (default: jax's default backend) under the mesh and
  logical-axis rules in context."""
  rules = nn.get_logical_axis_rules()
  mesh = jax.sharding.get_abstract_mesh()
  sizes = {} if mesh.empty else dict(mesh.shape)
  impl = resolve(name, platform or jax.default_backend(), q.dtype, q.shape[-1], q.shape[1],
                 split=split_dims(rules, sizes))
  if not impl.per_device or math.prod(sizes.values()) <= 1:
    return impl.fn(q, k, v)
  # Without rules q/k/v are not split: each device runs the whole attention.
  spec = nn.logical_to_mesh_axes(QKV_AXES, rules) if rules else jax.sharding.PartitionSpec()
  # check_vma=False: a pallas_call's outputs carry no varying-axes type to check.
  return jax.shard_map(impl.fn, in_specs=(spec,) * 3, out_specs=spec, check_vma=False)(q, k, v)
