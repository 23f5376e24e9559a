"""Kernel-development helpers, run from the repository root.

``python -m tools.ptxas_report`` (registers, spills and ptxas warnings of Mosaic
kernel variants), ``python -m tools.trace_summary`` (device kernels of a profiler
trace by name), ``python -m tools.autotune_gmm`` (measures the Triton kernels'
tiles and writes ``kernels/tuning_table.json``); shell scripts ``gpu_session.sh``
(several steps in one GPU call), ``ncu_profile.sh`` (Nsight Compute profile of
one variant) and ``gpu_env.sh`` (PYTHONPATH for a checkout that is not installed).
"""
