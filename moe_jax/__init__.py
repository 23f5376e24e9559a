"""moe_jax: Mixture-of-Experts research in JAX/Flax."""
__version__ = "0.1.0"
