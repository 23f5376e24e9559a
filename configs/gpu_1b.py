"""About 1B total parameters with fine-grained experts, for one or more GPUs.

16 layers, all MoE: 64 routed experts of width 256 (top-6) plus 2 shared
experts, sigmoid routing with bias balancing, bf16 activations.
Run: python -m experiments.train --config=configs/gpu_1b.py --workdir=/tmp/gpu_1b
On several GPUs set --config.mesh.shape.expert=N to shard experts.
"""
from configs.base import base_config


def get_config():
  c = base_config("sigmoid_topk")
  m = c.model
  m.d_model, m.num_layers, m.num_heads, m.head_dim = 1024, 16, 16, 64
  m.d_ff, m.moe_every, m.max_len, m.dtype = 4096, 1, 2048, "bfloat16"
  m.tie_embeddings = False
  moe = m.moe
  moe.num_experts, moe.num_shared_experts = 64, 2
  r = moe.router
  r.top_k, r.num_groups, r.topk_groups = 6, 8, 4
  r.load_balance_coef = 1e-4
  c.data.seq_len, c.data.batch_size, c.data.max_bytes = 1024, 32, 200_000_000
  c.optimizer.learning_rate, c.optimizer.warmup_steps = 1e-3, 500
  c.train.num_steps, c.train.log_every, c.train.eval_every = 20000, 50, 1000
  c.train.checkpoint_every, c.train.eval_batches = 1000, 16
  return c
