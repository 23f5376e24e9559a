"""Shared defaults; every experiment config starts from ``base_config()``."""
import ml_collections

from moe_jax.sharding import DEFAULT_RULES


def router_defaults(name: str = "topk") -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      name=name, top_k=2, renormalize=True, jitter_eps=0.0, logits_precision="float32",
      load_balance_coef=0.01, z_loss_coef=1e-3, importance_coef=0.0, load_coef=0.0,
      bias_update_speed=1e-3, num_groups=1, topk_groups=1, routed_scaling_factor=1.0,
      expert_capacity_factor=2.0,
      tau_max=2.0, tau_min=0.1, tau_schedule="exponential", anneal_steps=1000,
      hard_top1_after=-1, gate_threshold=0.05, activation="tanh", hash_seed=0))


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.model = ml_collections.ConfigDict(dict(
      vocab_size=256, d_model=128, num_layers=4, num_heads=4, head_dim=32, d_ff=512,
      ffn_kind="swiglu", moe_every=2, max_len=512, rope_base=10000.0, tie_embeddings=True,
      dtype="float32"))
  c.model.moe = ml_collections.ConfigDict(dict(
      num_experts=8, d_expert=256, expert_kind="swiglu", activation="gelu",
      dispatch="dropless", capacity_factor_train=1.25, capacity_factor_eval=2.0,
      num_shared_experts=0, d_shared=0, gmm_impl="auto", fused_dispatch="off",
      combine_weights_at="hidden"))
  c.model.moe.router = router_defaults()
  c.data = ml_collections.ConfigDict(dict(
      path="", max_bytes=4_000_000, heldout_permille=50, seq_len=128, batch_size=16))
  c.optimizer = ml_collections.ConfigDict(dict(
      learning_rate=3e-3, warmup_steps=50, min_lr_ratio=0.1, weight_decay=0.1,
      b1=0.9, b2=0.95, eps=1e-8, grad_clip_norm=1.0))
  c.train = ml_collections.ConfigDict(dict(
      num_steps=600, log_every=50, eval_every=200, eval_batches=8,
      checkpoint_every=200, keep_checkpoints=2))
  c.mesh = ml_collections.ConfigDict()
  c.mesh.shape = ml_collections.ConfigDict(dict(data=-1, fsdp=1, expert=1, tensor=1))
  c.mesh.rules = [list(r) for r in DEFAULT_RULES]
  return c
