"""The MoE layer, every router x dispatch, against a loop over experts.

The reference runs the same router function, then loops over experts with a
dense SwiGLU per expert over all tokens, keeping the slots that capacity
allows (first choices first, then token order). Outputs and gradients with
respect to every parameter (router included) must match.
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax import dispatch as dispatch_lib
from moe_jax import routers
from moe_jax.config_fields import ConfigError, FieldError
from moe_jax.layers.moe import MoeConfig, MoeLayer
from moe_jax.ops.router_logits import float32_router_precision
from moe_jax.routers import base as routers_base
from moe_jax.routing import RouterInputs
from kernel_refs import rel_err as _rel
from moe_kernels import gmm_mosaic

D_MODEL, D_EXPERT, E = 8, 6, 4
ROUTER_OVERRIDES = {
    "topk": dict(top_k=2),
    "noisy_topk": dict(top_k=2),
    "sigmoid_topk": dict(top_k=2, num_groups=2, topk_groups=1),
    "expert_choice": dict(expert_capacity_factor=1.5),
    "dense_to_sparse": dict(tau_max=1.0, tau_min=0.5, anneal_steps=10, gate_threshold=0.2),
    "activation_dense_to_sparse": dict(tau_max=1.0, tau_min=0.5, anneal_steps=10,
                                       gate_threshold=0.2, activation="tanh"),
    "hash": dict(),
}
# Routers with one row per slot, which fused dispatch needs (expert choice has fewer).
ONE_ROW_PER_SLOT = sorted(set(ROUTER_OVERRIDES) - {"expert_choice"})


def make_cfg(router, dispatch, capacity_factor=1.0, shared=0, kind="swiglu"):
  rc = routers.get(router).config(num_experts=E, **ROUTER_OVERRIDES.get(router, {}))
  return MoeConfig(num_experts=E, d_expert=D_EXPERT, expert_kind=kind, dispatch=dispatch,
                   capacity_factor_train=capacity_factor, capacity_factor_eval=capacity_factor,
                   num_shared_experts=shared, gmm_impl="reference", router=rc)


def expert_ffn(params, e, x, kind):
  if kind == "swiglu":
    # one [E, d, f, 2] stack: [..., 0] gate, [..., 1] up
    w_gate, w_up = params["w_gate_up"][e][..., 0], params["w_gate_up"][e][..., 1]
    hidden = jax.nn.silu(x @ w_gate) * (x @ w_up)
    return hidden @ params["w_down"][e]
  return jax.nn.gelu(x @ params["w_in"][e]) @ params["w_out"][e]


def kept_slots(routing, capacity):
  index, mask = np.asarray(routing.expert_index), np.asarray(routing.mask)
  kept = np.zeros_like(mask)
  used = np.zeros(E, int)
  for j in range(index.shape[1]):
    for t in range(index.shape[0]):
      if mask[t, j] and (capacity is None or used[index[t, j]] < capacity):
        used[index[t, j]] += 1
        kept[t, j] = True
  return kept


def reference_layer(variables, cfg, x, token_ids, train=False):
  params = variables["params"]
  xt = x.reshape(-1, x.shape[-1])
  router = routers.of(cfg.router)
  hp = jax.lax.Precision.HIGHEST
  needs = router.inputs
  inputs = RouterInputs(
      logits=jnp.dot(xt, params["router"], precision=hp) if "logits" in needs else None,
      noise_logits=(jnp.dot(xt, params["router_noise"], precision=hp)
                    if "noise_logits" in needs else None),
      token_ids=token_ids.reshape(-1) if "token_ids" in needs else None,
      state=variables.get("router_state", {}).get("bias"), step=jnp.asarray(3, jnp.int32))
  routing = router.route(inputs, cfg.router, None, train)
  capacity = None
  if cfg.dispatch == "capacity":
    capacity = dispatch_lib.expert_capacity(xt.shape[0], E, routing.nominal_k,
                                            cfg.capacity_factor_train)
  kept = kept_slots(routing, capacity)
  index = np.asarray(routing.expert_index)
  y = jnp.zeros_like(xt)
  for e in range(E):
    out_e = expert_ffn(params["experts"], e, xt, cfg.expert_kind)
    for j in range(index.shape[1]):
      sel = jnp.asarray((index[:, j] == e) & kept[:, j])
      y = y + jnp.where(sel, routing.combine_weight[:, j], 0.0)[:, None] * out_e
  if cfg.num_shared_experts:
    sp = params["shared_experts"]
    y = y + (jax.nn.silu(xt @ sp["w_gate"]["kernel"]) * (xt @ sp["w_up"]["kernel"])) @ sp["w_down"]["kernel"]
  return y.reshape(x.shape)


def setup(cfg, seed=0, batch=2, length=6, d_model=D_MODEL):
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.normal(size=(batch, length, d_model)), jnp.float32)
  ids = jnp.asarray(rng.integers(0, 256, (batch, length)), jnp.int32)
  layer = MoeLayer(cfg)
  variables = layer.init({"params": jax.random.key(seed), "router": jax.random.key(1)}, x, ids,
                         step=3, train=False)
  variables = jax.tree.map(lambda v: v.unbox() if hasattr(v, "unbox") else v, variables,
                           is_leaf=lambda v: hasattr(v, "unbox"))
  variables = {k: v for k, v in variables.items() if k != "moe"}  # drop what init sowed
  if "router_state" in variables:  # a non-zero bias exercises the selection path
    bias = jnp.asarray(rng.normal(size=(E,)) * 0.3, jnp.float32)
    variables = {**variables, "router_state": {"bias": bias}}
  return layer, variables, x, ids


def assert_param_grads_match(ours, ref, params, out_shape, seed):
  """Gradients of <f(params), cot> for a random cotangent agree leaf by leaf."""
  cot = jnp.asarray(np.random.default_rng(seed).normal(size=out_shape), jnp.float32)
  g_ours = jax.grad(lambda p: jnp.sum(ours(p) * cot))(params)
  g_ref = jax.grad(lambda p: jnp.sum(ref(p) * cot))(params)
  assert len(jax.tree.leaves(g_ours)) == len(jax.tree.leaves(g_ref))
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g_ours), jax.tree.leaves(g_ref)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5,
                               err_msg=jax.tree_util.keystr(path))
  return cot


@pytest.mark.parametrize("router,dispatch", [
    *[(r, d) for r in sorted(ROUTER_OVERRIDES) for d in ("dropless", "capacity")],
    *[(r, "fused") for r in ONE_ROW_PER_SLOT]])
def test_layer_matches_loop_over_experts(router, dispatch):
  assert router in routers.names()
  cfg = make_cfg(router, dispatch, capacity_factor=0.75)
  layer, variables, x, ids = setup(cfg, seed=hash(router) % 100)

  def ours(params):
    return layer.apply({**variables, "params": params}, x, ids, step=3, train=False)

  def ref(params):
    return reference_layer({**variables, "params": params}, cfg, x, ids)

  np.testing.assert_allclose(np.asarray(ours(variables["params"])),
                             np.asarray(ref(variables["params"])), rtol=2e-5, atol=2e-5)
  assert_param_grads_match(ours, ref, variables["params"], x.shape, seed=1)


@pytest.mark.parametrize("router,dispatch", [
    ("topk", "capacity"), ("expert_choice", "dropless"), ("dense_to_sparse", "fused")])
def test_mlp_experts_match_loop(router, dispatch):
  # The rows' combine weights scale the hidden activations before the (linear,
  # bias-free) output projection; the loop weights the outputs.
  cfg = make_cfg(router, dispatch, capacity_factor=0.75, kind="mlp")
  layer, variables, x, ids = setup(cfg, seed=3)
  ref = lambda p: reference_layer({**variables, "params": p}, cfg, x, ids)
  ours = lambda p: layer.apply({**variables, "params": p}, x, ids, step=3)
  np.testing.assert_allclose(np.asarray(ours(variables["params"])),
                             np.asarray(ref(variables["params"])), rtol=2e-5, atol=2e-5)
  assert_param_grads_match(ours, ref, variables["params"], x.shape, seed=2)


@pytest.mark.parametrize("change,pattern", [
    (dict(num_experts=0), r"^num_experts=0; allowed: an integer >= 1"),
    (dict(d_expert=0), r"^d_expert=0; allowed"),
    (dict(expert_kind="moe"), r"^expert_kind='moe'; allowed: \['mlp', 'swiglu'\]"),
    (dict(activation="swish"), r"^activation='swish'; allowed: \['gelu', 'relu', 'silu'\]"),
    (dict(dispatch="sorted"), r"^dispatch='sorted'; allowed: \['dropless', 'capacity', 'fused'\]"),
    (dict(dispatch="capacity", capacity_factor_eval=0.0), r"^capacity_factor_eval=0.0; allowed"),
    (dict(num_shared_experts=-1), r"^num_shared_experts=-1; allowed"),
    (dict(gmm_impl="cublas"), r"^gmm_impl='cublas'; allowed: \['auto', "),
    (dict(dispatch="fused", gmm_impl="ragged_dot"),
     r"^gmm_impl='ragged_dot'; allowed: with dispatch='fused', one with fused kernels: "),
])
def test_moe_config_fields_are_checked(change, pattern):
  with pytest.raises(FieldError, match=pattern):
    dataclasses.replace(make_cfg("topk", "dropless"), **change)


def test_moe_config_from_mapping_builds_the_named_router_strictly():
  cfg = MoeConfig.from_mapping({"num_experts": 6, "router": {"name": "hash", "hash_seed": 3}})
  assert cfg.router == routers.get("hash").config(num_experts=6, hash_seed=3)
  assert MoeConfig(num_experts=6).router.num_experts == 6   # the router follows num_experts
  with pytest.raises(ConfigError, match=r"model\.moe\.fused_dispatch: unknown field; did you mean dispatch\?"):
    MoeConfig.from_mapping({"fused_dispatch": "on"})
  with pytest.raises(ConfigError, match=r"model\.moe\.router\.top_k=9; allowed: 1 <= top_k"):
    MoeConfig.from_mapping({"router": {"top_k": 9}})


def test_input_gradient_matches_loop():
  cfg = make_cfg("topk", "dropless")
  layer, variables, x, ids = setup(cfg)
  g_ours = jax.grad(lambda x: jnp.sum(layer.apply(variables, x, ids) ** 2))(x)
  g_ref = jax.grad(lambda x: jnp.sum(reference_layer(variables, cfg, x, ids) ** 2))(x)
  np.testing.assert_allclose(np.asarray(g_ours), np.asarray(g_ref), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind,shared", [("mlp", 0), ("swiglu", 2)])
def test_expert_kinds_and_shared_experts(kind, shared):
  cfg = make_cfg("topk", "dropless", shared=shared, kind=kind)
  layer, variables, x, ids = setup(cfg)
  np.testing.assert_allclose(np.asarray(layer.apply(variables, x, ids)),
                             np.asarray(reference_layer(variables, cfg, x, ids)),
                             rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("router", ["topk", "dense_to_sparse"])
def test_dropless_equals_capacity_with_large_capacity(router):
  base = make_cfg(router, "dropless")
  layer, variables, x, ids = setup(base)
  y_dropless = layer.apply(variables, x, ids, step=3)
  big = dataclasses.replace(base, dispatch="capacity", capacity_factor_eval=float(E))
  y_capacity, state = MoeLayer(big).apply(variables, x, ids, step=3, mutable=["moe"])
  assert float(state["moe"]["metrics"][0]["dropped_fraction"]) == 0.0
  np.testing.assert_allclose(np.asarray(y_dropless), np.asarray(y_capacity), rtol=1e-6, atol=1e-6)


def test_metrics_and_aux_loss_are_sown():
  cfg = make_cfg("topk", "capacity", capacity_factor=0.5)
  layer, variables, x, ids = setup(cfg)
  _, state = layer.apply(variables, x, ids, mutable=["moe"])
  assert len(state["moe"]["metrics"]) == 1
  metrics = state["moe"]["metrics"][0]
  assert metrics["expert_load"].shape == (E,)
  np.testing.assert_allclose(float(metrics["expert_load"].sum()), 1.0, rtol=1e-6)
  assert float(metrics["dropped_fraction"]) > 0
  assert float(metrics["active_experts_per_token"]) == 2.0
  expected = (cfg.router.load_balance_coef * metrics["aux/load_balance"]
              + cfg.router.z_loss_coef * metrics["aux/z_loss"])
  np.testing.assert_allclose(float(state["moe"]["aux_loss"][0]), float(expected), rtol=1e-6)


def test_sigmoid_bias_moves_toward_balance_in_training():
  cfg = make_cfg("sigmoid_topk", "dropless")
  cfg = dataclasses.replace(cfg, router=dataclasses.replace(cfg.router, bias_update_speed=0.1))
  layer, variables, x, ids = setup(cfg)
  _, state = layer.apply(variables, x, ids, train=True, rngs={"router": jax.random.key(0)},
                         mutable=["moe", "router_state"])
  load = np.asarray(state["moe"]["metrics"][0]["expert_load"])
  delta = np.asarray(state["router_state"]["bias"] - variables["router_state"]["bias"])
  np.testing.assert_allclose(delta, 0.1 * np.sign(load.mean() - load), atol=1e-7)


@pytest.mark.parametrize("router,impl", [("topk", "pallas_triton_interpret"),
                                         ("dense_to_sparse", "pallas_triton_interpret"),
                                         ("topk", "megablox_interpret")])
def test_fused_dispatch_kernels_match_loop(router, impl):
  # The Pallas kernels (GPU Triton, or TPU Mosaic) run in interpret mode on CPU:
  # gather rows on load, write weighted rows to their slots, so no separate
  # dispatch/combine is emitted. The TPU kernels need d and f multiples of 128.
  cfg = dataclasses.replace(make_cfg(router, "fused"), gmm_impl=impl)
  if impl.startswith("megablox"):
    cfg = dataclasses.replace(cfg, d_expert=128)
  layer, variables, x, ids = setup(cfg, seed=4,
                                   d_model=128 if impl.startswith("megablox") else D_MODEL)
  ours = lambda p: layer.apply({**variables, "params": p}, x, ids, step=3)
  ref = lambda p: reference_layer({**variables, "params": p}, cfg, x, ids)
  np.testing.assert_allclose(np.asarray(ours(variables["params"])),
                             np.asarray(ref(variables["params"])), rtol=1e-4, atol=1e-5)
  cot = assert_param_grads_match(ours, ref, variables["params"], x.shape, seed=2)
  g_x = jax.jit(jax.grad(lambda x: jnp.sum(layer.apply(variables, x, ids, step=3) * cot)))(x)
  g_x_ref = jax.grad(lambda x: jnp.sum(reference_layer(variables, cfg, x, ids) * cot))(x)
  np.testing.assert_allclose(np.asarray(g_x), np.asarray(g_x_ref), rtol=1e-4, atol=1e-5)


MOSAIC_TOL = 2e-2  # bfloat16 layer against the float32 loop: relative Frobenius error


@pytest.mark.parametrize("dispatch,grads", [
    ("dropless", False),
    pytest.param("dropless", True, marks=pytest.mark.skipif(
        not gmm_mosaic.interpreter_reads_transposed(),
        reason=f"jax {jax.__version__} < 0.11: the Mosaic GPU interpreter cannot run the "
               "transposed-rhs product of the input gradient")),
    # The fused gather/combine kernels are Triton kernels for the Mosaic impls too.
    ("fused", True),
])
def test_mosaic_interpret_layer_matches_loop(dispatch, grads, mosaic_calls):
  # The Mosaic GPU kernel takes 16-bit floats with K and N tile multiples: a
  # bfloat16 layer with d_model = d_expert = 128 sends every product to it.
  cfg = dataclasses.replace(make_cfg("topk", dispatch), gmm_impl="pallas_mosaic_interpret",
                            d_expert=128)
  _, variables, x, ids = setup(cfg, seed=4, d_model=128)
  layer = MoeLayer(cfg, dtype=jnp.bfloat16)  # float32 params, bfloat16 compute
  calls = mosaic_calls
  # Everything under jit: on jax >= 0.11 the Mosaic GPU interpreter runs each
  # warpgroup as its own CPU computation, and eager ops queued behind the kernel
  # can hold the CPU client's in-flight slots those computations need (a deadlock
  # seen on 2-core machines).
  ours = jax.jit(lambda p: layer.apply({**variables, "params": p}, x, ids, step=3))
  ref = lambda p: reference_layer({**variables, "params": p}, cfg, x, ids)
  y = ours(variables["params"])
  assert y.dtype == jnp.float32 and np.all(np.isfinite(np.asarray(y)))
  assert _rel(y, ref(variables["params"])) < MOSAIC_TOL
  if dispatch == "dropless":
    assert calls == ["gmm", "gmm"], calls  # both expert products ran on gmm_mosaic
  if not grads:
    return
  cot = jnp.asarray(np.random.default_rng(2).normal(size=x.shape), jnp.float32)
  g_ours = jax.jit(jax.grad(lambda p: jnp.sum(ours(p) * cot)))(variables["params"])
  g_ref = jax.grad(lambda p: jnp.sum(ref(p) * cot))(variables["params"])
  assert len(jax.tree.leaves(g_ours)) == len(jax.tree.leaves(g_ref))
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g_ours), jax.tree.leaves(g_ref)):
    assert np.all(np.isfinite(np.asarray(a))), jax.tree_util.keystr(path)
    assert _rel(a, b) < MOSAIC_TOL, (jax.tree_util.keystr(path), _rel(a, b))
  g_x = jax.jit(jax.grad(lambda x: jnp.sum(layer.apply(variables, x, ids, step=3) * cot)))(x)
  g_x_ref = jax.grad(lambda x: jnp.sum(reference_layer(variables, cfg, x, ids) * cot))(x)
  assert _rel(g_x, g_x_ref) < MOSAIC_TOL
  if dispatch == "dropless":  # input gradients and weight gradients on Mosaic too
    assert {"gmm_t", "tgmm"} <= set(calls), calls


@pytest.mark.parametrize("router,impl,pattern", [
    ("expert_choice", "pallas_triton_interpret", "dispatch='fused' needs one row per routing slot"),
    ("topk", "auto", r"impl='ragged_dot' has no fused gather/combine kernels"),  # auto on CPU
])
def test_fused_dispatch_explains_why_it_cannot_apply(router, impl, pattern):
  cfg = dataclasses.replace(make_cfg(router, "fused"), gmm_impl=impl)
  with pytest.raises(ValueError, match=pattern):
    MoeLayer(cfg).init(jax.random.key(0), jnp.ones((1, 4, D_MODEL)))


# ---------------------------------------------------------------------------
# model.moe.router.logits_precision: the router projections' matmul precision.

PROJECTIONS = {"topk": ["router"], "noisy_topk": ["router", "router_noise"]}


@pytest.fixture
def routed_inputs(monkeypatch):
  """Records the RouterInputs the layer hands to the topk and noisy_topk routers."""
  seen = []
  for name in PROJECTIONS:
    router = routers.get(name)

    def spy(inputs, cfg, rng, train, fn=router.route):
      seen.append(inputs)
      return fn(inputs, cfg, rng, train)
    monkeypatch.setitem(routers_base._BY_CONFIG, router.config,  # pylint: disable=protected-access
                        dataclasses.replace(router, route=spy))
  return seen


def with_precision(cfg, precision, **router_kw):
  return dataclasses.replace(cfg, router=dataclasses.replace(
      cfg.router, logits_precision=precision, **router_kw))


def projections(seen, cfg, variables, x, ids, **apply_kw):
  """{param name: logits} the layer computed in one call (router, router_noise)."""
  seen.clear()
  MoeLayer(cfg).apply(variables, x, ids, step=3, **apply_kw)
  (inputs,) = seen
  logits = {"router": inputs.logits, "router_noise": inputs.noise_logits}
  return {name: logits[name] for name in PROJECTIONS[routers.of(cfg.router).name]}


def as_bf16_f64(a):
  return np.asarray(jnp.asarray(a).astype(jnp.bfloat16).astype(jnp.float32), np.float64)


@pytest.mark.parametrize("router", sorted(PROJECTIONS))
@pytest.mark.parametrize("x_dtype", [jnp.float32, jnp.bfloat16])
def test_default_router_logits_are_float32_accurate(router, x_dtype, routed_inputs):
  cfg = make_cfg(router, "dropless")
  assert cfg.router.logits_precision == "float32"
  _, variables, x, ids = setup(cfg)
  x = x.astype(x_dtype)  # bfloat16: what a bfloat16 model hands its MoE layers
  xt = np.asarray(x.reshape(-1, x.shape[-1]).astype(jnp.float32), np.float64)
  for name, logits in projections(routed_inputs, cfg, variables, x, ids).items():
    w = np.asarray(variables["params"][name], np.float64)
    assert logits.dtype == jnp.float32
    # float32 accuracy; bfloat16-rounded operands would be off by about 2^-9
    np.testing.assert_allclose(np.asarray(logits, np.float64), xt @ w, rtol=2e-6, atol=2e-6,
                               err_msg=name)


@pytest.mark.parametrize("router", sorted(PROJECTIONS))
def test_bfloat16_router_logits_round_operands_and_accumulate_in_float32(router, routed_inputs):
  cfg32 = make_cfg(router, "dropless")
  cfg16 = with_precision(cfg32, "bfloat16")
  _, variables, x, ids = setup(cfg16)
  got16 = projections(routed_inputs, cfg16, variables, x, ids)
  got32 = projections(routed_inputs, cfg32, variables, x, ids)
  xt = x.reshape(-1, x.shape[-1])
  for name, logits in got16.items():
    w = variables["params"][name]
    assert w.dtype == jnp.float32, name  # the parameter stays float32
    assert logits.dtype == jnp.float32, name
    # bf16-rounded operands, products and sums in float64 (the layer sums in float32).
    np.testing.assert_allclose(np.asarray(logits, np.float64), as_bf16_f64(xt) @ as_bf16_f64(w),
                               rtol=1e-5, atol=1e-5, err_msg=name)
    err = _rel(logits, got32[name])  # about bf16 rounding (2^-9) away from float32 mode
    assert 1e-4 < err < 2e-2, (name, err)


def test_bfloat16_router_logits_see_the_jittered_input(routed_inputs):
  cfg32 = make_cfg("topk", "dropless")
  cfg16 = with_precision(cfg32, "bfloat16")
  _, variables, x, ids = setup(cfg32)
  jitter = lambda cfg: dataclasses.replace(
      cfg, router=dataclasses.replace(cfg.router, jitter_eps=0.5))
  train = dict(train=True, rngs={"router": jax.random.key(7)})
  eval16 = projections(routed_inputs, cfg16, variables, x, ids)["router"]
  train16 = projections(routed_inputs, jitter(cfg16), variables, x, ids, **train)["router"]
  train32 = projections(routed_inputs, jitter(cfg32), variables, x, ids, **train)["router"]
  assert _rel(train16, eval16) > 0.05  # the jitter reached the bfloat16 projection
  assert 1e-4 < _rel(train16, train32) < 2e-2  # the same jitter as in float32 mode


def test_bfloat16_router_layer_gradients_are_close_to_float32():
  cfg32 = make_cfg("topk", "dropless")
  cfg16 = with_precision(cfg32, "bfloat16")
  _, variables, x, ids = setup(cfg32)
  cot = jnp.asarray(np.random.default_rng(3).normal(size=x.shape), jnp.float32)

  def value_and_grads(cfg):
    def loss(params):
      y, state = MoeLayer(cfg).apply({**variables, "params": params}, x, ids, step=3,
                                     mutable=["moe"])
      return jnp.sum(y * cot) + state["moe"]["aux_loss"][0]
    return jax.value_and_grad(loss)(variables["params"])

  (v16, g16), (v32, g32) = value_and_grads(cfg16), value_and_grads(cfg32)
  assert np.isfinite(float(v16))
  np.testing.assert_allclose(float(v16), float(v32), rtol=5e-2)
  for path, g in jax.tree_util.tree_leaves_with_path(g16):
    assert np.all(np.isfinite(np.asarray(g))), jax.tree_util.keystr(path)
  assert g16["router"].dtype == jnp.float32
  err = _rel(g16["router"], g32["router"])
  assert 0 < err < 5e-2, err


def dot_generals(jaxpr):
  """Every dot_general equation in a jaxpr, nested jaxprs (jit, custom_vjp) included."""
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general":
      yield eqn
    for param in eqn.params.values():
      for sub in param if isinstance(param, (list, tuple)) else [param]:
        sub = getattr(sub, "jaxpr", sub)
        if hasattr(sub, "eqns"):
          yield from dot_generals(sub)


@pytest.mark.parametrize("precision,x_dtype,operands,matmul_precision", [
    # What decides the speed on a GPU, which CPU results cannot show: float32
    # operands (on the CPU at HIGHEST; on GPUs of compute capability 8.0+ through
    # six bfloat16 tensor-core passes: test_float32_router_precision_by_device),
    # or bfloat16 operands in one pass.
    ("float32", jnp.float32, "float32", (jax.lax.Precision.HIGHEST,) * 2),
    ("float32", jnp.bfloat16, "float32", (jax.lax.Precision.HIGHEST,) * 2),
    ("bfloat16", jnp.float32, "bfloat16", None),
])
def test_router_projections_in_the_jaxpr(precision, x_dtype, operands, matmul_precision):
  cfg = with_precision(make_cfg("noisy_topk", "dropless"), precision)
  layer, variables, x, ids = setup(cfg)
  x = x.astype(x_dtype)
  jaxpr = jax.make_jaxpr(lambda v: layer.apply(v, x, ids, step=3))(variables).jaxpr
  router_dots = [e for e in dot_generals(jaxpr) if e.invars[1].aval.shape == (D_MODEL, E)]
  assert len(router_dots) == 2  # router and router_noise
  for eqn in router_dots:
    assert [str(v.aval.dtype) for v in eqn.invars] == [operands] * 2
    assert eqn.params["precision"] == matmul_precision
    assert eqn.params["preferred_element_type"] == jnp.float32
    assert eqn.outvars[0].aval.dtype == jnp.float32


class _FakeDevice:
  def __init__(self, platform, compute_capability=None):
    self.platform = platform
    if compute_capability is not None:
      self.compute_capability = compute_capability


@pytest.mark.parametrize("device,want", [
    (_FakeDevice("gpu", "9.0"), jax.lax.DotAlgorithmPreset.BF16_BF16_F32_X6),
    (_FakeDevice("gpu", "8.0"), jax.lax.DotAlgorithmPreset.BF16_BF16_F32_X6),
    (_FakeDevice("gpu", "7.0"), jax.lax.Precision.HIGHEST),  # no bfloat16 tensor cores
    (_FakeDevice("tpu"), jax.lax.Precision.HIGHEST),          # six bfloat16 passes already
    (_FakeDevice("cpu"), jax.lax.Precision.HIGHEST),
])
def test_float32_router_precision_by_device(device, want):
  assert float32_router_precision(device) == want


def test_unknown_router_logits_precision_is_a_clear_error():
  with pytest.raises(FieldError, match=r"^logits_precision='fp8'; "
                     r"allowed: \['float32', 'bfloat16'\]"):
    with_precision(make_cfg("topk", "dropless"), "fp8")
