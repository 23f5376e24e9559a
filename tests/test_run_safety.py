"""Runs you can trust: signals, damaged checkpoints, the workdir lock, the recorded
config, one-line errors, the whole held-out split."""
import glob
import json
import os
import shutil
import signal
import subprocess
import sys

import pytest

from moe_jax.training import checkpointing, loop, workdir as workdir_lib
from test_training import read_losses, tiny_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.join(REPO, "tests")


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
  """A finished 6-step run (checkpoints at 3 and 6) and its per-step losses."""
  workdir = str(tmp_path_factory.mktemp("finished"))
  summary = loop.train_and_evaluate(tiny_config(steps=6), workdir)
  return workdir, read_losses(workdir), summary


def copy_run(finished_run, tmp_path):
  target = str(tmp_path / "run")
  shutil.copytree(finished_run[0], target)
  return target


def train_command(config_file, workdir, *flags):
  return [sys.executable, "-m", "experiments.train", f"--config={config_file}",
          f"--workdir={workdir}", *flags]


def write_config(tmp_path, steps, checkpoint_every=1000):
  path = tmp_path / "config.py"
  path.write_text(
      f"import sys\nsys.path.insert(0, {TESTS!r})\nfrom test_training import tiny_config\n"
      f"def get_config():\n  c = tiny_config(steps={steps})\n"
      f"  c.train.checkpoint_every = {checkpoint_every}\n  return c\n")
  return path


def test_final_evaluation_covers_the_whole_heldout_split(finished_run):
  workdir, _, summary = finished_run
  records = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  final = [r for r in records if "eval/coverage" in r][-1]
  assert final["step"] == 6 and final["eval/coverage"] == 1.0
  assert final["eval/loss"] == summary.heldout_loss
  # Every logged step has the learning rate and the interval-mean losses.
  steps = [r for r in records if "loss" in r]
  assert [r["step"] for r in steps] == [1, 2, 3, 4, 5, 6]
  assert steps[0]["learning_rate"] == 0.0 and steps[2]["learning_rate"] > 0
  # CPU: model TFLOP/s from the second log on, but no peak (no MFU) and no memory stats.
  assert all(r["perf/model_tflops_per_sec"] > 0 for r in steps[1:])
  assert not any("perf/mfu" in r or "perf/peak_memory_gib" in r for r in steps)
  assert set(summary.plots) == {"loss", "expert_load"}
  record = workdir_lib.read_record(workdir)
  assert record["config"]["train"]["num_steps"] == 6
  assert record["config"]["model"]["moe"]["router"]["name"] == "topk"
  assert "jax" in record["versions"]
  assert not os.path.exists(os.path.join(workdir, workdir_lib.LOCK_NAME))


def test_sigterm_saves_the_step_in_flight_and_resumes_identically(tmp_path):
  config_file = write_config(tmp_path, steps=10_000)
  workdir = tmp_path / "run"
  proc = subprocess.Popen(train_command(config_file, workdir), cwd=REPO, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
  lines = []
  for line in proc.stdout:
    lines.append(line)
    if line.startswith("step ") and "/10000" in line and int(line.split()[1].split("/")[0]) >= 2:
      proc.send_signal(signal.SIGTERM)
      break
  out = "".join(lines) + proc.stdout.read()
  assert proc.wait(timeout=120) == 128 + signal.SIGTERM, out
  assert "compiling the train step" in out and "INFO" not in out and "Traceback" not in out
  assert "SIGTERM: stopping after the step in flight" in out
  steps = checkpointing.Checkpointer(str(workdir), 3).all_steps()
  assert len(steps) == 1 and steps[0] >= 2, (steps, out)
  stopped = steps[0]
  assert f"stopped by SIGTERM at step {stopped}" in out
  logged = read_losses(workdir)
  assert max(logged) == stopped
  # Resume for two more steps; an uninterrupted run of the same config agrees step by step.
  config = tiny_config(steps=10_000)
  config.train.checkpoint_every = 1000
  loop.train_and_evaluate(config, str(workdir), stop_after_steps=2)
  reference = tmp_path / "reference"
  loop.train_and_evaluate(config, str(reference), stop_after_steps=stopped + 2)
  assert read_losses(workdir) == read_losses(reference)


def test_a_second_signal_exits_at_once(tmp_path):
  script = ("import os, signal, time\n"
            "from moe_jax.training.preemption import StopSignals\n"
            "with StopSignals() as s:\n"
            "  os.kill(os.getpid(), signal.SIGINT)\n"
            "  time.sleep(0.5)\n"
            "  assert s.signum == signal.SIGINT, s.signum\n"
            "  print('first signal noted', flush=True)\n"
            "  os.kill(os.getpid(), signal.SIGTERM)\n"
            "  time.sleep(5)\n"
            "print('not reached')\n")
  done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True,
                        text=True, timeout=120)
  assert done.returncode == 128 + signal.SIGTERM, done.stdout + done.stderr
  assert "first signal noted" in done.stdout and "not reached" not in done.stdout
  assert "exiting now without saving" in done.stderr


def damage_latest(workdir):
  files = [p for p in glob.glob(os.path.join(workdir, "checkpoints", "6", "state", "**", "*"),
                                recursive=True) if os.path.isfile(p)]
  with open(max(files, key=os.path.getsize), "r+b") as f:
    f.truncate(10)


def test_a_damaged_latest_checkpoint_falls_back_to_the_previous(tmp_path, finished_run, capsys):
  workdir = copy_run(finished_run, tmp_path)
  damage_latest(workdir)
  with pytest.raises(checkpointing.CheckpointRestoreError, match="--strict_resume"):
    loop.train_and_evaluate(tiny_config(steps=6), workdir, strict_resume=True)
  assert checkpointing.Checkpointer(workdir, 3).all_steps() == [3, 6]   # nothing moved
  summary = loop.train_and_evaluate(tiny_config(steps=6), workdir)
  out = capsys.readouterr().out
  assert "checkpoint" in out and "failed to restore" in out and "resuming from step 3" in out
  assert summary.final_step == 6 and read_losses(workdir) == finished_run[1]
  assert summary.heldout_loss == finished_run[2].heldout_loss
  aside = os.listdir(os.path.join(workdir, checkpointing.DAMAGED_DIR))
  assert len(aside) == 1 and aside[0].startswith("6-")


def test_bytes_that_still_decode_are_caught_by_the_fingerprint(tmp_path, finished_run):
  workdir = copy_run(finished_run, tmp_path)
  data_files = [p for p in glob.glob(os.path.join(workdir, "checkpoints", "6", "state",
                                                  "ocdbt.process_0", "d", "*"))
                if os.path.getsize(p) > 10_000]
  assert data_files
  for path in data_files:   # one flipped bit in the middle of each: the chunks still decode
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 0x01
    open(path, "wb").write(bytes(data))
  run = loop._Run(tiny_config(steps=6), workdir)
  said = []
  restored = checkpointing.Checkpointer(workdir, 3).restore_latest_good(
      run.abstract_state, say=said.append)
  assert restored.step == 3 and len(restored.notes) == 1
  assert len(said) == 1 and "does not match the fingerprint" in said[0], said


def test_a_second_run_on_a_workdir_in_use_is_refused(tmp_path):
  holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
  try:
    workdir = tmp_path / "run"
    workdir.mkdir()
    lock = {"host": os.uname().nodename, "pid": holder.pid, "pid_start": None,
            "started": "2026-12-03T00:00:00", "argv": ["train"]}
    (workdir / workdir_lib.LOCK_NAME).write_text(json.dumps(lock))
    with pytest.raises(workdir_lib.WorkdirInUse, match=f"pid {holder.pid}"):
      loop.train_and_evaluate(tiny_config(steps=2), str(workdir))
    assert not (workdir / "checkpoints").exists() and not (workdir / "metrics.jsonl").exists()
  finally:
    holder.kill()
    holder.wait()


@pytest.mark.parametrize("field,value,message", [
    ("data.seq_len", 8, r"data\.seq_len: 16 -> 8"),
    ("seed", 1, r"seed: 0 -> 1"),
    ("model.moe.router.top_k", 1, r"model\.moe\.router\.top_k: 2 -> 1"),
])
def test_a_changed_config_is_refused_on_resume(tmp_path, finished_run, field, value, message):
  workdir = copy_run(finished_run, tmp_path)
  config = tiny_config(steps=6)
  section, name = field.rsplit(".", 1) if "." in field else ("", field)
  target = config
  for part in filter(None, section.split(".")):
    target = target[part]
  target[name] = value
  with pytest.raises(workdir_lib.ConfigChanged, match=message):
    loop.train_and_evaluate(config, workdir)
  allow = [field]
  if field == "data.seq_len":   # never allowed, whatever the flag says
    with pytest.raises(workdir_lib.ConfigChanged, match="never"):
      loop.train_and_evaluate(config, workdir, allow_config_change=allow)


def test_allowed_changes_pass_and_shape_changes_never_do(tmp_path, finished_run):
  workdir = copy_run(finished_run, tmp_path)
  config = tiny_config(steps=6)
  config.model.moe.d_expert = 48
  with pytest.raises(workdir_lib.ConfigChanged, match="changes the saved train state"):
    loop.train_and_evaluate(config, workdir, allow_config_change=["model.moe.d_expert"])
  config = tiny_config(steps=8)
  config.train.log_every = 2
  summary = loop.train_and_evaluate(config, workdir, stop_after_steps=0,
                                    allow_config_change=["train.*"])
  assert summary.final_step == 6
  record = workdir_lib.read_record(workdir)
  assert record["config"]["train"]["num_steps"] == 8
  assert {c["field"] for c in record["changes"]} == {"train.num_steps", "train.log_every"}


def test_a_bad_value_is_one_line_and_status_2(tmp_path):
  done = subprocess.run(
      train_command("configs/default.py", tmp_path / "run", "--config.optimizer.b2=1.5"),
      cwd=REPO, capture_output=True, text=True, timeout=300)
  assert done.returncode == 2, done.stdout + done.stderr
  assert done.stderr.strip() == "error: optimizer.b2=1.5; allowed: 0 <= b2 < 1", done.stderr
  assert not (tmp_path / "run").exists()


def test_make_demo_never_deletes_and_trains_in_a_fresh_directory():
  runs_before = set(glob.glob(os.path.join(REPO, "runs", "demo-*")))
  dry = subprocess.run(["make", "-n", "-o", ".venv/.installed", "demo"], cwd=REPO, capture_output=True,
                       text=True, timeout=60, check=True).stdout
  created = set(glob.glob(os.path.join(REPO, "runs", "demo-*"))) - runs_before
  for path in created:     # the dry run's mktemp made it; it is empty
    os.rmdir(path)
  assert "rm " not in dry
  assert len(created) == 1 and f"--workdir=runs/{os.path.basename(created.pop())}" in dry


def test_a_run_recorded_before_a_field_existed_resumes(tmp_path, finished_run):
  workdir = copy_run(finished_run, tmp_path)
  record = workdir_lib.read_record(workdir)
  del record["config"]["train"]["final_eval_batches"]        # a field added since
  record["config"]["train"]["old_knob"] = 3                    # a field removed since
  workdir_lib.write_record(workdir, record)
  with pytest.raises(workdir_lib.ConfigChanged, match=r"train\.old_knob") as refused:
    loop.train_and_evaluate(tiny_config(steps=6), workdir, stop_after_steps=0)
  assert "final_eval_batches" not in str(refused.value)
  del record["config"]["train"]["old_knob"]
  workdir_lib.write_record(workdir, record)
  summary = loop.train_and_evaluate(tiny_config(steps=6), workdir, stop_after_steps=0)
  assert summary.final_step == 6
