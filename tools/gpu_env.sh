# Sourced by the GPU scripts (and usable by hand: `source tools/gpu_env.sh`) on a
# machine where the project is not installed: puts the checkout (moe_jax,
# benchmarks, tools) and kernels/ under its installed name moe_kernels on PYTHONPATH.
_moe_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
_moe_alias="$(mktemp -d "${TMPDIR:-/tmp}/moe_kernels_alias.XXXXXX")"
ln -s "$_moe_root/kernels" "$_moe_alias/moe_kernels"
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$_moe_root:$_moe_alias"
unset _moe_root _moe_alias
