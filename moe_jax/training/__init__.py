"""Training library: state, steps, checkpoints, logging."""
