"""Built-in routers; importing this package registers them."""
from moe_jax.routers import activation_dense_to_sparse  # noqa: F401
from moe_jax.routers import dense_to_sparse  # noqa: F401
from moe_jax.routers import expert_choice  # noqa: F401
from moe_jax.routers import hash_router  # noqa: F401
from moe_jax.routers import noisy_topk  # noqa: F401
from moe_jax.routers import sigmoid_topk  # noqa: F401
from moe_jax.routers import topk  # noqa: F401
