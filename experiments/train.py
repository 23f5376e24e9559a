"""Train an MoE language model from an ml-collections config.

  python -m experiments.train --config=configs/default.py --workdir=/tmp/run
  python -m experiments.train --config=configs/topk.py --workdir=/tmp/run \
      --config.model.moe.num_experts=16 --config.train.num_steps=2000

Reusing a --workdir resumes the run from its latest checkpoint. On several
hosts, start the same command on each with --multihost; on TPU pods and SLURM
jax finds its peers itself, elsewhere pass --coordinator_address (or set
JAX_COORDINATOR_ADDRESS), --num_processes and --process_id.
"""
from absl import app
from absl import flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", "configs/default.py",
                                          "Experiment config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints, logs and plots go here.",
                               required=True)
_STOP_AFTER = flags.DEFINE_integer(
    "stop_after_steps", None, "End this invocation after N steps with a checkpoint "
    "(for time-limited jobs); rerun with the same workdir to continue.")
_MULTIHOST = flags.DEFINE_bool("multihost", False,
                               "Call jax.distributed.initialize() before anything else.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "host:port of process 0 (multihost; auto-detected if unset).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in the job (multihost).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index (multihost).")


def main(argv):
  del argv
  import jax  # pylint: disable=g-import-not-at-top
  if _MULTIHOST.value:
    # CPU processes need a collectives library to talk to each other; GPUs/TPUs ignore this.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=_COORDINATOR.value,
                               num_processes=_NUM_PROCESSES.value, process_id=_PROCESS_ID.value)
  from moe_jax.training.loop import train_and_evaluate  # pylint: disable=g-import-not-at-top
  train_and_evaluate(_CONFIG.value, _WORKDIR.value, stop_after_steps=_STOP_AFTER.value)


if __name__ == "__main__":
  app.run(main)
