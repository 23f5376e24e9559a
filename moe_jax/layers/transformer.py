"""Decoder-only transformer LM with MoE feed-forward blocks every N layers.

Parameters carry logical axis names (vocab, embed, mlp, heads, kv, expert,
router); activations are constrained with ``activation_*`` names. A rule
table in the config maps both to mesh axes (see ``moe_jax.sharding``).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from moe_jax.config_fields import Checked, one_of, require
from moe_jax.layers import attention, embedding
from moe_jax.layers.experts import EXPERT_KINDS, DenseMlp
from moe_jax.layers.moe import MoeConfig, MoeLayer

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@dataclasses.dataclass(frozen=True)
class ModelConfig(Checked):
  """``config.model``."""
  vocab_size: int = 256             # >= 256: byte-level tokens
  d_model: int = 128
  num_layers: int = 4
  num_heads: int = 4
  head_dim: int = 32
  d_ff: int = 512                   # dense feed-forward hidden width
  ffn_kind: str = "swiglu"
  moe_every: int = 2                # layer i is MoE when (i + 1) % moe_every == 0; 0 = no MoE
  max_len: int = 512
  rope_base: float = 10000.0
  tie_embeddings: bool = True
  dtype: str = "float32"            # activation dtype; parameters stay float32
  # How the embedding lookup's gradient is computed (moe_jax.layers.embedding):
  # "auto" (one-hot matmul for small vocabularies, else sorted segment sum),
  # "matmul", "segment_sum", or "scatter" (plain autodiff).
  embedding_grad: str = "auto"
  attention_impl: str = "auto"      # moe_jax.layers.attention: auto, cudnn, pallas_tpu, xla
  moe: MoeConfig = dataclasses.field(default_factory=MoeConfig)

  def validate(self) -> None:
    super().validate()
    require(self.vocab_size >= 256, "vocab_size", self.vocab_size, ">= 256 (byte-level tokens)")
    for field in ("d_model", "num_layers", "num_heads", "d_ff", "max_len"):
      require(getattr(self, field) >= 1, field, getattr(self, field), "an integer >= 1")
    require(self.head_dim >= 2 and self.head_dim % 2 == 0, "head_dim", self.head_dim,
            "an even number >= 2 (rotary embedding)")
    one_of("ffn_kind", self.ffn_kind, sorted(EXPERT_KINDS))
    require(self.moe_every >= 0, "moe_every", self.moe_every, ">= 0 (0 = dense)")
    require(self.rope_base > 0, "rope_base", self.rope_base, "a number > 0")
    one_of("dtype", self.dtype, sorted(DTYPES))
    one_of("embedding_grad", self.embedding_grad, embedding.METHODS)
    # Whether it runs on this platform, dtype and shape is checked where devices are
    # known (moe_jax.config_validation, and the layer at trace time).
    one_of("attention_impl", self.attention_impl, attention.known())

  @property
  def activation_dtype(self):
    return DTYPES[self.dtype]

  def is_moe_layer(self, i: int) -> bool:
    return self.moe_every > 0 and (i + 1) % self.moe_every == 0


def rotary(x: jax.Array, positions: jax.Array, base: float) -> jax.Array:
  """Rotary position embedding over the last axis of x [B, L, H, D]."""
  half = x.shape[-1] // 2
  freq = base ** (-jnp.arange(half, dtype=jnp.float32) / half)
  angle = positions[..., None].astype(jnp.float32) * freq            # [B, L, half]
  sin, cos = jnp.sin(angle)[:, :, None, :], jnp.cos(angle)[:, :, None, :]
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


class RMSNorm(nn.Module):
  eps: float = 1e-6
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                       (x.shape[-1],), jnp.float32)
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
    return (xf * scale).astype(self.dtype)


class CausalSelfAttention(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x, positions):
    cfg = self.cfg
    dtype = cfg.activation_dtype

    def weight(name, shape, axes, fan_in):
      init = nn.with_logical_partitioning(
          nn.initializers.normal(stddev=fan_in ** -0.5), axes)
      return self.param(name, init, shape, jnp.float32).astype(dtype)

    d, h, hd = cfg.d_model, cfg.num_heads, cfg.head_dim
    x = x.astype(dtype)
    q, k, v = (jnp.einsum("bld,dhk->blhk", x, weight(n, (d, h, hd), ("embed", "heads", "kv"), d))
               for n in ("query", "key", "value"))
    q, k = rotary(q, positions, cfg.rope_base), rotary(k, positions, cfg.rope_base)
    q, k, v = (nn.with_logical_constraint(t, attention.QKV_AXES) for t in (q, k, v))
    out = attention.attend(cfg.attention_impl, q, k, v)
    return jnp.einsum("blhk,hkd->bld", out, weight("out", (h, hd, d), ("heads", "kv", "embed"),
                                                   h * hd))


class Block(nn.Module):
  cfg: ModelConfig
  use_moe: bool

  @nn.compact
  def __call__(self, x, positions, token_ids, step, train):
    cfg = self.cfg
    dtype = cfg.activation_dtype
    act_axes = ("activation_batch", "activation_length", "activation_embed")
    h = CausalSelfAttention(cfg, name="attention")(RMSNorm(dtype=dtype, name="attn_norm")(x),
                                                   positions)
    x = nn.with_logical_constraint(x + h, act_axes)
    normed = RMSNorm(dtype=dtype, name="ffn_norm")(x)
    if self.use_moe:
      h = MoeLayer(cfg.moe, dtype=dtype, name="moe")(normed, token_ids, step, train)
    else:
      h = DenseMlp(cfg.d_ff, kind=cfg.ffn_kind, dtype=dtype, name="mlp")(normed)
    return nn.with_logical_constraint(x + h, act_axes)


class TransformerLM(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, tokens: jax.Array, step: Optional[jax.Array] = None,
               train: bool = False) -> jax.Array:
    """tokens int32 [B, L] -> logits float32 [B, L, vocab]."""
    cfg = self.cfg
    embed = embedding.Embed(
        cfg.vocab_size, cfg.d_model, dtype=cfg.activation_dtype, param_dtype=jnp.float32,
        embedding_init=nn.with_logical_partitioning(
            nn.initializers.normal(stddev=1.0), ("vocab", "embed")),
        grad_method=cfg.embedding_grad, name="embed")
    x = embed(tokens)
    x = nn.with_logical_constraint(
        x, ("activation_batch", "activation_length", "activation_embed"))
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    for i in range(cfg.num_layers):
      x = Block(cfg, use_moe=cfg.is_moe_layer(i), name=f"layer_{i}")(
          x, positions, tokens, step, train)
    x = RMSNorm(dtype=cfg.activation_dtype, name="final_norm")(x)
    if cfg.tie_embeddings:
      logits = embed.attend(x) / jnp.sqrt(cfg.d_model).astype(x.dtype)
    else:
      logits = nn.DenseGeneral(
          cfg.vocab_size, use_bias=False, dtype=cfg.activation_dtype, param_dtype=jnp.float32,
          kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(),
                                                   ("embed", "vocab")),
          name="unembed")(x)
    logits = nn.with_logical_constraint(
        logits, ("activation_batch", "activation_length", "activation_vocab"))
    return logits.astype(jnp.float32)
