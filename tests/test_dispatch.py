"""Dispatchers (plans, gathers, fused kernels) against a plain loop over (token, slot)
assignments."""
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax import dispatch as dispatch_lib
from moe_jax.routing import Routing


def random_routing(rng, num_tokens, k, num_experts, valid_prob=0.8, max_assignments=0,
                   distinct=True):
  if distinct:
    index = np.stack([rng.permutation(num_experts)[:k] for _ in range(num_tokens)])
  else:
    index = rng.integers(0, num_experts, (num_tokens, k))
  mask = rng.random((num_tokens, k)) < valid_prob
  weight = np.where(mask, rng.random((num_tokens, k)) + 0.1, 0.0)
  probs = rng.random((num_tokens, num_experts))
  return Routing(expert_index=jnp.asarray(index, jnp.int32),
                 combine_weight=jnp.asarray(weight, jnp.float32),
                 mask=jnp.asarray(mask), router_probs=jnp.asarray(probs / probs.sum(-1, keepdims=True), jnp.float32),
                 max_assignments=max_assignments or num_tokens * k, nominal_k=float(k))


def loop_reference(x, w, routing, capacity=None):
  """y[t] = sum over kept slots of weight * x[t] @ w[e]; priority: slot j, then token."""
  index, mask = np.asarray(routing.expert_index), np.asarray(routing.mask)
  weight = np.asarray(routing.combine_weight, np.float64)
  x, w = np.asarray(x, np.float64), np.asarray(w, np.float64)
  y = np.zeros((x.shape[0], w.shape[2]))
  used = np.zeros(w.shape[0], int)
  dropped = 0
  for j in range(index.shape[1]):
    for t in range(index.shape[0]):
      if not mask[t, j]:
        continue
      e = index[t, j]
      if capacity is not None and used[e] >= capacity:
        dropped += 1
        continue
      used[e] += 1
      y[t] += weight[t, j] * (x[t] @ w[e])
  return y, dropped


def moe_apply(x, w, routing, mode, capacity_factor=1.0):
  """A linear expert x @ w[e] through dispatcher ``mode``, as two matmuls (the second
  by the identity) so that fused dispatch gathers in one and combines in the other."""
  dispatcher = dispatch_lib.get(mode)
  plan = dispatcher.plan(routing, capacity_factor)
  rows = dispatcher.dispatch(x, plan, routing)
  hidden = rows.matmul_in(w, "reference")
  eye = jnp.broadcast_to(jnp.eye(w.shape[2], dtype=w.dtype), (w.shape[0],) + w.shape[2:] * 2)
  return dispatcher.combine(rows.matmul_out(hidden, eye, "reference"), plan), plan


@pytest.mark.parametrize("mode", ["dropless", "fused"])
@pytest.mark.parametrize("num_tokens,k,num_experts", [(13, 3, 5), (1, 1, 1), (32, 2, 8), (7, 4, 4)])
def test_dropless_matches_loop(num_tokens, k, num_experts, mode):
  rng = np.random.default_rng(num_tokens * 100 + k)
  routing = random_routing(rng, num_tokens, k, num_experts)
  x = jnp.asarray(rng.normal(size=(num_tokens, 6)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(num_experts, 6, 5)), jnp.float32)
  y, plan = moe_apply(x, w, routing, mode)
  ref, _ = loop_reference(x, w, routing)
  np.testing.assert_allclose(np.asarray(y), ref, rtol=1e-5, atol=1e-5)
  assert int(plan.num_dropped) == 0
  assert int(plan.group_sizes.sum()) == int(np.asarray(routing.mask).sum())


@pytest.mark.parametrize("capacity_factor", [0.3, 0.75, 1.0, 1.5])
def test_capacity_matches_loop_and_counts_drops(capacity_factor):
  rng = np.random.default_rng(7)
  num_tokens, k, num_experts = 24, 2, 4
  routing = random_routing(rng, num_tokens, k, num_experts, valid_prob=0.9)
  x = jnp.asarray(rng.normal(size=(num_tokens, 6)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(num_experts, 6, 3)), jnp.float32)
  capacity = dispatch_lib.expert_capacity(num_tokens, num_experts, k, capacity_factor)
  assert capacity == math.ceil(capacity_factor * num_tokens * k / num_experts)
  y, plan = moe_apply(x, w, routing, "capacity", capacity_factor)
  ref, dropped = loop_reference(x, w, routing, capacity)
  np.testing.assert_allclose(np.asarray(y), ref, rtol=1e-5, atol=1e-5)
  assert int(plan.num_dropped) == dropped
  assert int(plan.num_assigned) == int(np.asarray(routing.mask).sum())
  if capacity_factor < 1:
    assert dropped > 0


def test_dispatchers_agree_when_nothing_drops():
  rng = np.random.default_rng(3)
  routing = random_routing(rng, 20, 3, 6)
  x = jnp.asarray(rng.normal(size=(20, 8)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(6, 8, 4)), jnp.float32)
  y_dropless, _ = moe_apply(x, w, routing, "dropless")
  y_fused, _ = moe_apply(x, w, routing, "fused")
  y_capacity, plan = moe_apply(x, w, routing, "capacity", capacity_factor=100.0)
  assert int(plan.num_dropped) == 0
  np.testing.assert_allclose(np.asarray(y_dropless), np.asarray(y_capacity), rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(np.asarray(y_dropless), np.asarray(y_fused), rtol=1e-6, atol=1e-6)


def test_bounded_assignments_expert_choice_layout():
  # K = E slots with exactly C valid per expert (expert-choice shape), R = E*C rows.
  rng = np.random.default_rng(11)
  num_tokens, num_experts, capacity = 10, 4, 3
  mask = np.zeros((num_tokens, num_experts), bool)
  for e in range(num_experts):
    mask[rng.permutation(num_tokens)[:capacity], e] = True
  routing = Routing(
      expert_index=jnp.tile(jnp.arange(num_experts, dtype=jnp.int32), (num_tokens, 1)),
      combine_weight=jnp.asarray(np.where(mask, rng.random(mask.shape), 0), jnp.float32),
      mask=jnp.asarray(mask), router_probs=jnp.full((num_tokens, num_experts), 0.25),
      max_assignments=num_experts * capacity, nominal_k=1.2)
  x = jnp.asarray(rng.normal(size=(num_tokens, 5)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(num_experts, 5, 5)), jnp.float32)
  y, plan = moe_apply(x, w, routing, "dropless")
  assert plan.num_rows == num_experts * capacity
  ref, _ = loop_reference(x, w, routing)
  np.testing.assert_allclose(np.asarray(y), ref, rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match=r"dispatch='fused' needs one row per routing slot"):
    moe_apply(x, w, routing, "fused")


@pytest.mark.parametrize("mode", ["dropless", "capacity", "fused"])
def test_gradients_match_loop(mode):
  rng = np.random.default_rng(5)
  num_tokens, k, num_experts = 9, 2, 3
  routing = random_routing(rng, num_tokens, k, num_experts, valid_prob=0.85)
  x = jnp.asarray(rng.normal(size=(num_tokens, 4)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(num_experts, 4, 3)), jnp.float32)
  cot = jnp.asarray(rng.normal(size=(num_tokens, 3)), jnp.float32)
  capacity_factor = 0.8
  capacity = dispatch_lib.expert_capacity(num_tokens, num_experts, k, capacity_factor)

  def ours(x, w, weights):
    r = routing.replace(combine_weight=weights)
    return jnp.sum(moe_apply(x, w, r, mode, capacity_factor)[0] * cot)

  def reference(x, w, weights):
    index, mask = np.asarray(routing.expert_index), np.asarray(routing.mask)
    used = np.zeros(num_experts, int)
    y = jnp.zeros((num_tokens, 3))
    for j in range(k):
      for t in range(num_tokens):
        e = index[t, j]
        if not mask[t, j] or (mode == "capacity" and used[e] >= capacity):
          continue
        used[e] += 1
        y = y.at[t].add(weights[t, j] * (x[t] @ w[e]))
    return jnp.sum(y * cot)

  args = (x, w, routing.combine_weight)
  for a, b in zip(jax.grad(ours, argnums=(0, 1, 2))(*args),
                  jax.grad(reference, argnums=(0, 1, 2))(*args)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)


def float_scatters(fn, *args):
  """Scatter ops on floating-point data in the compiled HLO of fn(*args)."""
  hlo = jax.jit(fn).lower(*args).compile().as_text()
  found = re.findall(r"= (\w+)\[[^\]]*\]\S* scatter\(", hlo)
  return [dtype for dtype in found if dtype.startswith(("f", "bf"))]


def test_float_scatter_detector_sees_scatter_add():
  # Positive control: a combine written with .at[].add must be caught.
  fn = lambda x, i: jnp.zeros((4, 8)).at[i].add(x)
  assert float_scatters(fn, jnp.ones((6, 8)), jnp.zeros(6, jnp.int32)) == ["f32"]


@pytest.mark.parametrize("mode", ["dropless", "capacity"])
def test_no_scatter_add_of_activations_in_forward_or_backward(mode):
  rng = np.random.default_rng(0)
  routing = random_routing(rng, 16, 2, 4)
  x = jnp.asarray(rng.normal(size=(16, 8)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(4, 8, 8)), jnp.float32)

  def loss(x, w, weights):
    r = routing.replace(combine_weight=weights)
    return jnp.sum(moe_apply(x, w, r, mode)[0] ** 2)

  grads = jax.grad(loss, argnums=(0, 1, 2))
  assert float_scatters(grads, x, w, routing.combine_weight) == []


def test_row_values_follow_rows_and_zero_padding():
  rng = np.random.default_rng(4)
  routing = random_routing(rng, 10, 2, 3, valid_prob=0.7)
  plan = dispatch_lib.make_plan(routing, "capacity", 0.6)    # 4 drops, 3 padding rows
  values = jnp.asarray(rng.normal(size=(10, 2)), jnp.float32)
  rows = np.asarray(dispatch_lib.row_values(values, plan))
  slot = np.asarray(plan.buffer_slot_index)
  flat = np.asarray(values).reshape(-1)
  kept = slot < flat.size                                  # the rest are padding rows
  assert not kept.all() and int(plan.num_dropped) > 0
  np.testing.assert_array_equal(rows, np.where(kept, flat[np.minimum(slot, flat.size - 1)], 0))
  cot = jnp.asarray(rng.normal(size=rows.shape), jnp.float32)
  grad = np.asarray(jax.grad(lambda v: jnp.sum(dispatch_lib.row_values(v, plan) * cot))(values))
  expected = np.zeros(flat.size)
  expected[slot[kept]] = np.asarray(cot)[kept]             # dropped slots: zero gradient
  np.testing.assert_array_equal(grad.reshape(-1), expected)


def test_unknown_dispatcher_names_field_and_choices():
  with pytest.raises(ValueError, match=r"model\.moe\.dispatch='sorted'; allowed: "
                     r"\['dropless', 'capacity', 'fused'\]"):
    dispatch_lib.get("sorted")
  routing = random_routing(np.random.default_rng(0), 4, 1, 2)
  with pytest.raises(ValueError, match=r"plan mode='sorted'; allowed"):
    dispatch_lib.make_plan(routing, "sorted")
