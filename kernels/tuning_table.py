"""Measured tile table; regenerate with `python -m experiments.benchmark_gmm --autotune`."""
# device: NVIDIA H100 80GB HBM3; jax 0.11.2; 2026-11-23
# key: "op:dtype:r<rows per group class>:k<K>:n<N>" -> (tm, tn, tk, num_warps, num_stages[, group_m])
TABLE = {
    'gmm:bfloat16:r1024:k1408:n2048': (128, 256, 64, 8, 4, 4),
    'gmm:bfloat16:r1024:k2048:n1408': (128, 256, 64, 8, 4, 32),
    'gmm:bfloat16:r1024:k2048:n768': (128, 256, 64, 8, 4, 8),
    'gmm:bfloat16:r1024:k3584:n4096': (128, 256, 64, 8, 4, 32),
    'gmm:bfloat16:r1024:k4096:n3584': (128, 256, 64, 8, 4, 32),
    'gmm:bfloat16:r1024:k768:n2048': (128, 256, 64, 8, 3, 16),
    'gmm:bfloat16:r4:k1024:n4096': (16, 64, 256, 4, 5),
    'gmm:bfloat16:r4:k4096:n1024': (16, 128, 128, 4, 4),
    'gmm:bfloat16:r512:k2048:n7168': (128, 256, 64, 8, 4, 4),
    'gmm:bfloat16:r512:k7168:n2048': (128, 256, 64, 8, 4, 8),
    'tgmm:bfloat16:r1024:k2048:n1408': (64, 256, 128, 8, 3, 8),
    'tgmm:bfloat16:r1024:k2048:n768': (64, 256, 128, 8, 3, 8),
    'tgmm:bfloat16:r1024:k4096:n3584': (64, 256, 128, 8, 4, 8),
    'tgmm:bfloat16:r4:k4096:n1024': (32, 128, 128, 4, 3),
    'tgmm:bfloat16:r512:k7168:n2048': (32, 256, 128, 8, 4, 8),
}
