# Sourced by the GPU scripts: run from the repository root on a machine without the
# project installed, by putting the checkout and kernels/ (as moe_kernels) on PYTHONPATH.
mkdir -p /tmp/alias
ln -sfn "$PWD/kernels" /tmp/alias/moe_kernels
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD:/tmp/alias"
