"""Model FLOPs per token: the weight count against the model's real parameters,
the whole count against XLA's, each router's experts per token, peaks and MFU."""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
import pytest

from moe_jax import flops, routers
from moe_jax.layers.moe import MoeConfig
from moe_jax.layers.transformer import ModelConfig, TransformerLM


def param_counts(cfg: ModelConfig) -> dict[str, int]:
  """Real parameter counts (abstract init): all, norm scales, the embedding table,
  and the routed experts' weights."""
  tokens = jnp.zeros((2, 8), jnp.int32)
  key = jax.random.key(0)
  params = jax.eval_shape(lambda: TransformerLM(cfg).init(
      {"params": key, "router": key}, tokens, step=0, train=False))["params"]
  counts = {"all": 0, "norms": 0, "embed": 0, "experts": 0}
  for path, leaf in jax.tree_util.tree_flatten_with_path(nn.meta.unbox(params))[0]:
    names = [getattr(p, "key", "") for p in path]
    size = math.prod(leaf.shape)
    counts["all"] += size
    counts["norms"] += size if names[-1] == "scale" else 0
    counts["embed"] += size if names[0] == "embed" else 0
    counts["experts"] += size if "experts" in names else 0
  return counts


def moe_model(router: dict, expert_kind="swiglu", tie=True, shared=0, moe_every=1):
  moe = MoeConfig.from_mapping(dict(num_experts=4, d_expert=24, expert_kind=expert_kind,
                                    num_shared_experts=shared, d_shared=16, router=router))
  return ModelConfig(vocab_size=300, d_model=32, num_layers=2, num_heads=2, head_dim=8,
                     d_ff=48, ffn_kind="mlp", moe_every=moe_every, tie_embeddings=tie, moe=moe)


@pytest.mark.parametrize("ffn_kind", ["swiglu", "mlp"])
@pytest.mark.parametrize("tie", [True, False])
def test_dense_weight_count_is_the_parameters_less_norms_and_lookup_table(ffn_kind, tie):
  cfg = ModelConfig(vocab_size=300, d_model=32, num_layers=3, num_heads=2, head_dim=8,
                    d_ff=48, ffn_kind=ffn_kind, moe_every=0, tie_embeddings=tie)
  real = param_counts(cfg)
  # Tied: the table is the unembedding's weight and is counted once.
  lookup_only = 0 if tie else real["embed"]
  count = flops.model_flops_per_token(cfg, seq_len=16)
  assert count.active_params == real["all"] - real["norms"] - lookup_only
  assert count.routed_experts == count.shared_experts == count.router == 0


@pytest.mark.parametrize("router, projections", [
    (dict(name="topk", top_k=4), 1),
    (dict(name="noisy_topk", top_k=4), 2),           # logits and noise projections
    (dict(name="sigmoid_topk", top_k=4), 1),         # its bias is state, not a weight
])
@pytest.mark.parametrize("expert_kind", ["swiglu", "mlp"])
def test_moe_weight_count_with_every_expert_active_is_all_parameters(router, projections,
                                                                    expert_kind):
  # moe_every=2: layer 0 dense (MLP), layer 1 MoE, with shared experts, untied.
  cfg = moe_model(router, expert_kind, tie=False, shared=2, moe_every=2)
  real = param_counts(cfg)
  count = flops.model_flops_per_token(cfg, seq_len=16)
  assert count.active_experts_per_token == 4
  assert count.active_params == real["all"] - real["norms"] - real["embed"]
  assert count.router == 6 * projections * 32 * 4


@pytest.mark.parametrize("router, k", [(dict(name="topk", top_k=2), 2), (dict(name="hash"), 1)])
def test_moe_weight_count_takes_k_of_the_experts(router, k):
  cfg = moe_model(router, tie=True, shared=1)
  real = param_counts(cfg)
  count = flops.model_flops_per_token(cfg, seq_len=16)
  idle_experts = real["experts"] * (4 - k) // 4
  assert count.active_params == real["all"] - real["norms"] - idle_experts
  assert count.routed_experts == 6 * k * 3 * 32 * 24 * 2        # two MoE layers
  assert count.shared_experts == 6 * 3 * 32 * 16 * 2


def test_attention_term_is_palms_and_halved_when_causal():
  cfg = ModelConfig(d_model=64, num_layers=3, num_heads=4, head_dim=16, moe_every=0)
  full = flops.model_flops_per_token(cfg, 128, causal=False)
  assert full.attention_scores == 12 * 3 * 4 * 16 * 128
  assert flops.model_flops_per_token(cfg, 128).attention_scores == full.attention_scores / 2
  assert full.attention_projections == 6 * 4 * 64 * 64 * 3


@pytest.mark.parametrize("ffn_kind", ["swiglu", "mlp"])
def test_total_matches_xla_cost_analysis_of_a_dense_model(ffn_kind):
  # XLA computes the whole score matrix (causal=False) and also counts the
  # elementwise ops, so its count is a few percent above the model FLOPs.
  cfg = ModelConfig(d_model=128, num_layers=2, num_heads=4, head_dim=32, d_ff=512,
                    ffn_kind=ffn_kind, moe_every=0, tie_embeddings=False)
  tokens = jnp.zeros((2, 64), jnp.int32)
  model = TransformerLM(cfg)
  params = jax.eval_shape(model.init, jax.random.key(0), tokens)

  def loss(params, tokens):
    logits = model.apply(params, tokens)
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens).mean()
  compiled = jax.jit(jax.grad(loss)).lower(params, tokens).compile()
  cost = compiled.cost_analysis()
  xla = (cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"] / tokens.size
  ours = flops.model_flops_per_token(cfg, 64, causal=False).total
  assert 1.0 <= xla / ours < 1.05, (xla, ours)


EXPECTED_K = {   # num_experts=8, top_k=3, expert_capacity_factor=1.3, 100 tokens
    "topk": 3, "noisy_topk": 3, "sigmoid_topk": 3, "hash": 1,
    "dense_to_sparse": 3, "activation_dense_to_sparse": 3,   # their capacity budget
    "expert_choice": 8 * 16 / 100,                          # C = round(100 * 1.3 / 8) = 16
}


@pytest.mark.parametrize("name", routers.names())
def test_active_experts_per_token_of_every_router(name):
  fields = {f for f in routers.get(name).config.__dataclass_fields__}
  router = {"name": name}
  router.update({k: v for k, v in (("top_k", 3), ("expert_capacity_factor", 1.3)) if k in fields})
  moe = MoeConfig.from_mapping(dict(num_experts=8, router=router))
  assert name in EXPECTED_K, f"add router {name!r} to EXPECTED_K"
  assert flops.active_experts_per_token(moe, 100) == pytest.approx(EXPECTED_K[name])


def test_expert_choice_counts_tokens_routed_together():
  moe = MoeConfig.from_mapping(dict(num_experts=8, router=dict(
      name="expert_choice", expert_capacity_factor=1.3)))
  cfg = ModelConfig(moe_every=1, moe=moe)
  assert flops.model_flops_per_token(cfg, 25, batch_size=4).active_experts_per_token == 1.28
  assert flops.model_flops_per_token(cfg, 1000, batch_size=8).active_experts_per_token == 1.3


def test_peaks_and_mfu():
  assert flops.peak_tflops("NVIDIA H200") == 989
  assert flops.peak_tflops("TPU v5 lite") == 197
  assert flops.peak_tflops("cpu") is None
  perf = flops.throughput(1e6, 2e9, num_devices=4, peak=500.0)
  assert perf == pytest.approx({"perf/model_tflops_per_sec": 2000.0, "perf/mfu": 1.0})
  assert flops.throughput(1e6, 2e9, num_devices=4, peak=None) == {
      "perf/model_tflops_per_sec": 2000.0}


@pytest.mark.parametrize("router, shared, width", [
    (dict(name="topk", top_k=2), 2, 2 * 24 + 2 * 16),
    (dict(name="hash"), 0, 24),
    # 4 experts take C = round(100 * 1.3 / 4) = 33 of 100 tokens each: k = 1.32
    (dict(name="expert_choice", expert_capacity_factor=1.3), 0, round(1.32 * 24)),
])
def test_dense_equivalent_has_the_moe_flops_less_the_router(router, shared, width):
  cfg = moe_model(router, expert_kind="mlp", shared=shared)
  dense = flops.dense_equivalent(cfg, num_tokens=100)
  assert (dense.moe_every, dense.d_ff, dense.ffn_kind) == (0, width, "mlp")
  moe_count = flops.model_flops_per_token(cfg, 25, batch_size=4)
  dense_count = flops.model_flops_per_token(dense, 25, batch_size=4)
  if router["name"] != "expert_choice":   # there k * d_expert is rounded to a whole width
    assert dense_count.total == moe_count.total - moe_count.router
  assert dense_count.attention_scores == moe_count.attention_scores
