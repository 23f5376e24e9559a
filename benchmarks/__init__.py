"""Speed programs that print ratios against a baseline timed in the same run.

Run from the repository root: ``python -m benchmarks.gmm`` (grouped matmul
against a dense matmul of equal FLOPs), ``python -m benchmarks.gmm_torch``
(torch._grouped_mm on the same shapes), ``python -m benchmarks.moe_layer``
(a whole MoE layer against its dense equivalent) and ``python -m
benchmarks.train_step`` (a config's whole train step against its dense
equivalent's: tokens/s, model TFLOP/s, MFU, memory, compile time). The other modules are their
shared pieces: ``timing``, ``gmm_shapes``, ``tile_variants``, ``impl_names``,
``gmm_impls``, ``routed_rows``, ``flag_checks`` and ``rows``.
"""
