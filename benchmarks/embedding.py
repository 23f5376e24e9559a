"""Times the embedding lookup's gradient per method against the plain scatter-add.

Tokens: ``--batch`` x ``--length`` ids drawn uniformly from the vocabulary (32 x
1024 by default, the batch of configs/gpu_1b.py), a float32 [V, D] table,
activations and their gradient in ``--dtype``. Modes: ``bwd`` is the table's
gradient alone (all a method changes), ``fwdbwd`` the lookup and its gradient
as a training step uses them (``timing.forward_backward``). ratio = scatter's
time / the method's, timed alternately (``timing.paired``): above 1 is faster
than scatter. "auto" is listed with the method it picks for that vocabulary
(``moe_jax.layers.embedding.MATMUL_MAX_VOCAB``); where the matmul and segment
sum rows cross is the measured place for that threshold.

  python -m benchmarks.embedding                    # GPU: vocab 256 .. 32768, d_model 1024
  python -m benchmarks.embedding --vocab=256 --modes=bwd
  python -m benchmarks.embedding --preset=smoke     # tiny, any backend
"""
from __future__ import annotations

from absl import app
from absl import flags
import jax
import jax.numpy as jnp

from moe_jax.layers import embedding
from moe_jax.layers.embedding import embed_lookup

from benchmarks import flag_checks, timing

PRESETS = {  # (vocab sizes, d_model, batch, length)
    "gpu": ((256, 1024, 4096, 32768), 1024, 32, 1024),
    "smoke": ((256, 2048), 32, 2, 16),
}
MODES = ("bwd", "fwdbwd")
NEW_METHODS = ("matmul", "segment_sum", "auto")

_PRESET = flags.DEFINE_enum("preset", "gpu", sorted(PRESETS), "Shapes to time.")
_VOCAB = flags.DEFINE_list("vocab", [], "Vocabulary sizes (default: the preset's).")
_METHODS = flags.DEFINE_list("methods", list(NEW_METHODS),
                             "Gradient methods to time against scatter.")
flag_checks.require_choices(_METHODS, NEW_METHODS)
_MODES = flags.DEFINE_list("modes", list(MODES), "bwd: the table's gradient; fwdbwd: both.")
flag_checks.require_choices(_MODES, MODES)
_DTYPE = flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"],
                           "Activation and gradient dtype (the table stays float32).")
_ITERS = flags.DEFINE_integer("iters", 20, "Calls per timing sample.")
_REPS = flags.DEFINE_integer("reps", 5, "Alternating samples per pair.")


def step(method: str, mode: str, dtype):
  """Jitted ``(table, ids, dy) ->`` the table's gradient (bwd), or the lookup and it (fwdbwd)."""
  lookup = lambda ids: (lambda table: embed_lookup(table, ids, method, dtype))
  if mode == "bwd":
    return jax.jit(lambda table, ids, dy: jax.vjp(lookup(ids), table)[1](dy))
  return jax.jit(lambda table, ids, dy: timing.forward_backward(lookup(ids))(table, dy))


def inputs(vocab: int, d_model: int, batch: int, length: int, dtype):
  k_table, k_ids = jax.random.split(jax.random.key(0))
  table = jax.random.normal(k_table, (vocab, d_model), jnp.float32)
  ids = jax.random.randint(k_ids, (batch, length), 0, vocab, jnp.int32)
  return table, ids, timing.random_cotangent((batch, length, d_model), dtype)


def main(argv):
  del argv
  vocabs, d_model, batch, length = PRESETS[_PRESET.value]
  vocabs = [int(v) for v in _VOCAB.value] or list(vocabs)
  dtype = jnp.dtype(_DTYPE.value)
  print(f"device: {jax.devices()[0].device_kind}; jax {jax.__version__}; tokens {batch}x{length}; "
        f"d_model {d_model}; {dtype.name} gradients; MATMUL_MAX_VOCAB "
        f"{embedding.MATMUL_MAX_VOCAB}")
  print("ratio: scatter's time / the method's, timed alternately")
  print(f"{'vocab':>7} {'method':<18} {'mode':<7} {'scatter ms':>10} {'ms':>9} {'ratio':>7}",
        flush=True)
  for vocab in vocabs:
    args = inputs(vocab, d_model, batch, length, dtype)
    for mode in _MODES.value:
      base = step("scatter", mode, dtype)
      for method in _METHODS.value:
        resolved = embedding.resolve_method(method, vocab)
        label = f"auto={resolved}" if method == "auto" else method
        try:
          pair = timing.paired(base, args, step(method, mode, dtype), args,
                               iters=_ITERS.value, reps=_REPS.value)
        except jax.errors.JaxRuntimeError as e:  # e.g. a one-hot too large for the device
          print(f"{vocab:>7} {label:<18} {mode:<7} failed: {str(e).splitlines()[0][:120]}",
                flush=True)
          continue
        print(f"{vocab:>7} {label:<18} {mode:<7} {pair.base_seconds * 1e3:10.3f} "
              f"{pair.seconds * 1e3:9.3f} {pair.ratio:7.2f}", flush=True)


if __name__ == "__main__":
  app.run(main)
