"""moe_kernels: Pallas kernels for expert compute (installed from kernels/).

A standalone package (it imports nothing from moe_jax); ``moe_jax.ops``
registers its kernels as grouped-matmul implementations.

Modules: ``gmm`` (differentiable gmm with a custom VJP; picks the Mosaic or
Triton kernel per product), ``gmm_mosaic`` and ``tgmm_mosaic`` (the Mosaic GPU
kernels, Hopper), ``gmm_triton`` (Triton gmm/tgmm with gather/scatter/scale
options), ``fused`` (``gmm_gather`` for dispatch, ``gmm_combine`` for the
weighted combine, each with its VJP), ``schedule`` (row-tile schedule),
``tuning`` (Triton tiles per shape, from the measured ``tuning_table.json``),
``tpu`` (jax's megablox) and ``tpu_fused`` (Mosaic TPU gather/combine).
How they work and how to tune them: docs/kernels.md.
"""
