"""Embedding lookup whose gradient is a matmul or a sorted segment sum, not a scatter-add.

The forward of an embedding is a gather, ``table[ids]``. Its autodiff gradient
is a scatter-add of every token's output gradient into its row of a zero table.
With a small vocabulary that scatter is slow on a GPU: tens of thousands of
rows (a batch of 32 x 1024 tokens) collide on a few hundred table rows, and
the atomic adds serialise (on an H200 with ``configs/gpu_1b.py``, vocab 256:
about 30 ms of a 234 ms step). ``embed_lookup`` keeps the gather and computes
the table's gradient another way (``jax.custom_vjp``):

* ``"matmul"``: ``one_hot(ids)^T @ grad``, a dense [V, N] x [N, D] product that
  a GPU runs on its tensor cores with float32 accumulation. It costs
  ``2 * N * V * D`` FLOPs against the scatter's ``N * D`` adds, so it only pays
  while V is small.
* ``"segment_sum"``: sort the ids, permute the gradient rows to match, and sum
  runs of equal ids (``jax.ops.segment_sum`` with ``indices_are_sorted=True``),
  which lets XLA's scatter add up a run before touching the table. Its cost
  is a sort of N keys and a few passes over the N x D gradient, whatever V is.
* ``"scatter"``: the plain autodiff path, exactly what ``flax.linen.Embed``
  does (cast the table to the activation dtype, gather; the gradient is a
  scatter-add in that dtype), kept for comparison.
* ``"auto"``: ``"matmul"`` when ``V <= MATMUL_MAX_VOCAB``, else ``"segment_sum"``.

Why ``MATMUL_MAX_VOCAB = 1024``. Both the matmul and the segment sum read the
N x D gradient, so both scale with N * D and the crossover depends on V alone.
The segment sum moves roughly 12 bytes per gradient element (read bf16, write
and re-read the permuted rows, float32 accumulation) plus a sort, i.e. about
``12 * N * D / 4.8e12`` s at an H200's 4.8 TB/s; the matmul needs
``2 * N * V * D / ~7e14`` s at a realistic 700 TF/s of bf16. They are equal at
``V = 12 * 7e14 / (2 * 4.8e12)``, about 900, so the matmul is the faster of the
two up to a vocabulary of about a thousand (at V = 256 it does ~70 GFLOP per
32k tokens, under 0.1 ms, against ~30 ms for the contended scatter). The
value is an estimate to be checked with ``python -m benchmarks.embedding``.

Precision: both new methods accumulate in float32 (the matmul with
``preferred_element_type=float32``, at ``Precision.HIGHEST`` for float32
gradients so a GPU does not round them to TF32; the segment sum on the
gradient cast to float32), then return the table's dtype. The scatter path, as
jax writes it, adds in the activation dtype (bf16 for ``configs/gpu_1b.py``;
XLA may widen it), so the new methods are at least as accurate.

Ids must lie in [0, V). As with ``flax.linen.Embed``, the forward gives NaN
rows for ids >= V; the gradient drops them.

The one-hot matmul under GSPMD: with the tokens sharded over the batch axes,
each shard multiplies its own tokens and XLA adds the partial tables across
shards (one all-reduce of a V x D table). The segment sum sorts the global
token axis, which XLA partitions with collectives (it gathers the ids and the
gradient rows); with a sharded batch and a large vocabulary it costs that
communication.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

METHODS = ("auto", "matmul", "segment_sum", "scatter")

# "auto" uses the one-hot matmul up to this vocabulary size (see the module docstring).
MATMUL_MAX_VOCAB = 1024


def resolve_method(method: str, vocab: int) -> str:
  """The concrete method ("matmul", "segment_sum" or "scatter") that ``method`` means."""
  if method not in METHODS:
    raise ValueError(f"embedding gradient method {method!r}; allowed: {list(METHODS)}")
  if method == "auto":
    return "matmul" if vocab <= MATMUL_MAX_VOCAB else "segment_sum"
  return method


def matmul_table_grad(ids: jax.Array, grad: jax.Array, vocab: int) -> jax.Array:
  """float32 [vocab, D]: ``one_hot(ids)^T @ grad`` over all tokens (ids [...], grad [..., D])."""
  flat_ids = ids.reshape(-1)
  rows = grad.reshape(flat_ids.shape[0], grad.shape[-1])
  one_hot = jax.nn.one_hot(flat_ids, vocab, dtype=rows.dtype)  # 0 / 1: exact in any dtype
  precision = (jax.lax.Precision.HIGHEST if rows.dtype == jnp.float32
               else jax.lax.Precision.DEFAULT)
  return jnp.einsum("nv,nd->vd", one_hot, rows, precision=precision,
                    preferred_element_type=jnp.float32)


def segment_sum_table_grad(ids: jax.Array, grad: jax.Array, vocab: int) -> jax.Array:
  """float32 [vocab, D]: the gradient rows summed per id, after sorting by id."""
  flat_ids = ids.reshape(-1)
  rows = grad.reshape(flat_ids.shape[0], grad.shape[-1])
  sorted_ids, order = jax.lax.sort_key_val(
      flat_ids, jnp.arange(flat_ids.shape[0], dtype=jnp.int32))
  return jax.ops.segment_sum(rows[order].astype(jnp.float32), sorted_ids, num_segments=vocab,
                             indices_are_sorted=True)


_TABLE_GRADS = {"matmul": matmul_table_grad, "segment_sum": segment_sum_table_grad}


@dataclasses.dataclass(frozen=True)
class _Lookup:
  """What the custom gradient needs besides the arrays (static, hashable)."""
  method: str            # "matmul" or "segment_sum"
  vocab: int
  table_dtype: Any
  out_dtype: Any


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _lookup(table: jax.Array, ids: jax.Array, spec: _Lookup) -> jax.Array:
  # Gathering first and casting the N rows after gives the same values as casting
  # the table first (as flax does), without converting all V rows each step.
  return jnp.take(table, ids, axis=0).astype(spec.out_dtype)


def _lookup_fwd(table, ids, spec):
  return _lookup(table, ids, spec), ids


def _lookup_bwd(spec, ids, grad):
  d_table = _TABLE_GRADS[spec.method](ids, grad, spec.vocab).astype(spec.table_dtype)
  return d_table, None


_lookup.defvjp(_lookup_fwd, _lookup_bwd)


def embed_lookup(table: jax.Array, ids: jax.Array, method: str = "auto",
                 dtype: Optional[Any] = None) -> jax.Array:
  """``table[ids]`` as ``dtype`` (default the table's): [...] -> [..., D].

  ``method`` picks how the table's gradient is computed (module docstring);
  the forward values are the same for every method.
  """
  if not jnp.issubdtype(ids.dtype, jnp.integer):
    raise ValueError(f"embedding ids must be integers, got {ids.dtype}")
  method = resolve_method(method, table.shape[0])
  out_dtype = jnp.dtype(dtype if dtype is not None else table.dtype)
  if method == "scatter":
    return jnp.take(table.astype(out_dtype), ids, axis=0)
  return _lookup(table, ids, _Lookup(method, table.shape[0], jnp.dtype(table.dtype), out_dtype))


class Embed(nn.Embed):
  """``flax.linen.Embed`` (same parameter, initialiser and ``attend``) whose
  lookup's gradient is computed by ``grad_method`` (see ``embed_lookup``)."""
  grad_method: str = "auto"

  def __call__(self, inputs: jax.Array) -> jax.Array:
    return embed_lookup(self.embedding, inputs, self.grad_method, self.dtype)
