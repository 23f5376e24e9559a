"""The compute ops of an MoE layer: the grouped matmul with its implementations by
name (``registry``), and the router projection (``router_logits``)."""
from moe_jax.ops import gmm as _gmm  # the op and its XLA implementations
from moe_jax.ops import kernel_impls  # noqa: F401  registers the Pallas kernels
from moe_jax.ops import registry
from moe_jax.ops.gmm import gather_grouped_matmul, grouped_matmul, scatter_grouped_matmul

__all__ = ["gather_grouped_matmul", "grouped_matmul", "registry", "scatter_grouped_matmul"]
del _gmm
