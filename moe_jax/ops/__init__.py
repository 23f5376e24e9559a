"""Pure ops: grouped matmul."""
