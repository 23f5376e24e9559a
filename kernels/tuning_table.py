"""Measured tile table; regenerate with `python -m experiments.benchmark_gmm --autotune`."""
# key: "op:dtype:r<rows per group class>:k<K>:n<N>" -> (tm, tn, tk, num_warps, num_stages)
TABLE = {}
