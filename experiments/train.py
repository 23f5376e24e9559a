"""Train an MoE language model from an ml-collections config.

  python -m experiments.train --config=configs/default.py --workdir=/tmp/run
  python -m experiments.train --config=configs/topk.py --workdir=/tmp/run \
      --config.model.moe.num_experts=16 --config.train.num_steps=2000

Reusing a --workdir resumes the run from its latest checkpoint; the config must
match the one recorded in <workdir>/config.json except in the fields listed by
--allow_config_change. SIGTERM or Ctrl-C save a checkpoint at the step in
flight and exit with 128 + the signal's number; a second one exits at once.
--profile_steps=A:B writes a profiler trace of steps A to B-1 to <workdir>/profile
and prints their top device kernels.
On several hosts, start the same command on each with --multihost; on TPU pods
and SLURM jax finds its peers itself, elsewhere pass --coordinator_address (or
set JAX_COORDINATOR_ADDRESS), --num_processes and --process_id.

Exit status: 0 done, 1 a run error (non-finite loss, unreadable checkpoints),
2 a refused config or workdir, 128 + N stopped by signal N.
"""
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", "configs/default.py",
                                          "Experiment config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints, logs and plots go here.",
                               required=True)
_STOP_AFTER = flags.DEFINE_integer(
    "stop_after_steps", None, "End this invocation after N steps with a checkpoint "
    "(for time-limited jobs); rerun with the same workdir to continue.")
_ALLOW_CHANGE = flags.DEFINE_list(
    "allow_config_change", [], "On resume, config fields that may differ from the recorded "
    "config, e.g. train.num_steps,train.log_every or train.* (never data.seq_len, "
    "data.batch_size or fields that change the saved state's shapes).")
_STRICT_RESUME = flags.DEFINE_bool(
    "strict_resume", False, "Fail when the latest checkpoint does not restore, instead of "
    "setting it aside and resuming from the previous one.")
_PROFILE_STEPS = flags.DEFINE_string(
    "profile_steps", None, "A:B traces steps A to B-1 (counted from 0) with jax.profiler into "
    "<workdir>/profile (a perfetto trace) and prints their top device kernels.")
_VERBOSE = flags.DEFINE_bool("verbose", False, "Show the traceback of an error.")
_MULTIHOST = flags.DEFINE_bool("multihost", False,
                               "Call jax.distributed.initialize() before anything else.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "host:port of process 0 (multihost; auto-detected if unset).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in the job (multihost).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index (multihost).")


def _parse_profile_steps(text):
  """(A, B) from "A:B"; a malformed value stops the program at flag parsing."""
  if text is None:
    return None
  from moe_jax.profiling import parse_steps  # pylint: disable=g-import-not-at-top
  try:
    return parse_steps(text)
  except ValueError as e:
    raise flags.ValidationError(str(e)) from None


def _check_profile_steps(text) -> bool:
  _parse_profile_steps(text)
  return True


flags.register_validator(_PROFILE_STEPS, _check_profile_steps)


def _quiet_libraries() -> None:
  # orbax and absl log every save and restore at INFO; --verbosity=0 brings them back.
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)


def _exit_status(error: BaseException) -> int:
  # pylint: disable=g-import-not-at-top
  from moe_jax.config_fields import ConfigError
  from moe_jax.training import checkpointing, loop, preemption, workdir
  if isinstance(error, preemption.TrainingInterrupted):
    return error.exit_code
  if isinstance(error, (ConfigError, workdir.ConfigChanged, workdir.WorkdirInUse)):
    return 2
  if isinstance(error, (loop.NonFiniteLossError, checkpointing.CheckpointRestoreError)):
    return 1
  return 0


def main(argv):
  del argv
  _quiet_libraries()
  import jax  # pylint: disable=g-import-not-at-top
  if _MULTIHOST.value:
    # CPU processes need a collectives library to talk to each other; GPUs/TPUs ignore this.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=_COORDINATOR.value,
                               num_processes=_NUM_PROCESSES.value, process_id=_PROCESS_ID.value)
  from moe_jax.training.loop import train_and_evaluate  # pylint: disable=g-import-not-at-top
  try:
    train_and_evaluate(_CONFIG.value, _WORKDIR.value, stop_after_steps=_STOP_AFTER.value,
                       strict_resume=_STRICT_RESUME.value,
                       allow_config_change=_ALLOW_CHANGE.value,
                       profile_steps=_parse_profile_steps(_PROFILE_STEPS.value))
  except Exception as e:  # pylint: disable=broad-except
    status = _exit_status(e)
    if status == 0 or _VERBOSE.value:
      raise
    print(f"error: {e}" if status in (1, 2) else str(e), file=sys.stderr, flush=True)
    sys.exit(status)
  except KeyboardInterrupt:
    # Only outside the training steps (e.g. compiling, the final evaluation): the
    # steps themselves turn Ctrl-C into a checkpoint and TrainingInterrupted.
    print("interrupted; the latest checkpoint in the workdir is intact", file=sys.stderr)
    sys.exit(130)


if __name__ == "__main__":
  app.run(main)
