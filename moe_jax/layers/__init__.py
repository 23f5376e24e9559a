"""Flax Linen layers: MoE layer, experts, transformer LM."""
