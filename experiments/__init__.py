"""Experiment entry points (absl)."""
