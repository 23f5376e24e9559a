"""moe_kernels: Pallas kernels for expert compute (installed from kernels/)."""
