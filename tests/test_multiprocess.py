"""Two CPU processes through jax.distributed run the same training as one process."""
import json
import os
import signal
import socket
import subprocess
import sys

import pytest

CONFIG = '''
from configs.base import base_config
def get_config():
  c = base_config()
  m = c.model
  m.d_model, m.num_layers, m.num_heads, m.head_dim, m.d_ff, m.moe_every = 32, 2, 2, 16, 64, 1
  m.moe.d_expert = 32
  c.data.max_bytes, c.data.seq_len, c.data.batch_size = 40_000, 16, 8
  c.train.num_steps, c.train.log_every, c.train.checkpoint_every = 4, 1, 2
  c.train.eval_batches = 1
  return c
'''
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def launch(args, devices_per_process):
  # The session's other XLA flags (conftest's compile-time settings) pass through.
  other = [f for f in os.environ.get("XLA_FLAGS", "").split()
           if not f.startswith("--xla_force_host_platform_device_count")]
  flags = [f"--xla_force_host_platform_device_count={devices_per_process}", *other]
  env = dict(os.environ, XLA_FLAGS=" ".join(flags), JAX_PLATFORMS="cpu")
  return subprocess.Popen([sys.executable, "-m", "experiments.train", *args], cwd=REPO, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return {r["step"]: r["loss"] for r in map(json.loads, f) if "loss" in r}


@pytest.mark.slow
def test_two_processes_match_one_process_with_two_devices(tmp_path):
  config = tmp_path / "tiny.py"
  config.write_text(CONFIG)
  port = free_port()
  multi = [launch([f"--config={config}", f"--workdir={tmp_path / 'multi'}", "--multihost",
                   f"--coordinator_address=localhost:{port}", "--num_processes=2",
                   f"--process_id={i}"], 1) for i in range(2)]
  single = launch([f"--config={config}", f"--workdir={tmp_path / 'single'}"], 2)
  for proc in multi + [single]:
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
  assert "devices: 2 (cpu)" in out
  a, b = losses(tmp_path / "multi"), losses(tmp_path / "single")
  assert sorted(a) == [1, 2, 3, 4]
  for step in a:
    assert a[step] == pytest.approx(b[step], rel=1e-5)
  assert os.path.isdir(tmp_path / "multi" / "checkpoints" / "4")


@pytest.mark.slow
def test_sigterm_to_one_process_stops_both_at_the_same_step(tmp_path):
  config = tmp_path / "long.py"
  config.write_text(CONFIG.replace("c.train.num_steps, c.train.log_every, c.train.checkpoint_every"
                                   " = 4, 1, 2", "c.train.num_steps, c.train.log_every, "
                                   "c.train.checkpoint_every = 100_000, 1, 100_000"))
  port = free_port()
  workdir = tmp_path / "multi"
  procs = [launch([f"--config={config}", f"--workdir={workdir}", "--multihost",
                   f"--coordinator_address=localhost:{port}", "--num_processes=2",
                   f"--process_id={i}"], 1) for i in range(2)]
  chief_lines = []
  for line in procs[0].stdout:   # the chief prints progress; signal the other process
    chief_lines.append(line)
    if line.startswith("step ") and int(line.split()[1].split("/")[0]) >= 3:
      procs[1].send_signal(signal.SIGTERM)
      break
  outs = ["".join(chief_lines) + procs[0].communicate(timeout=300)[0],
          procs[1].communicate(timeout=300)[0]]
  for proc, out in zip(procs, outs):
    assert proc.returncode == 128 + signal.SIGTERM, out[-3000:]
  saved = sorted(int(d) for d in os.listdir(workdir / "checkpoints") if d.isdigit())
  assert len(saved) == 1 and saved[0] >= 3, (saved, outs[0][-2000:])
  assert f"stopped by SIGTERM at step {saved[0]}" in outs[0]
  assert max(losses(workdir)) == saved[0]
