"""The kernel-development tools stay runnable on CPU (interpret mode, tiny shapes)."""
import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(module, *args, timeout=600):
  return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, capture_output=True,
                        text=True, timeout=timeout, env=dict(os.environ, JAX_PLATFORMS="cpu"))


def _mosaic_reads_transposed():
  from moe_kernels import gmm_mosaic  # pylint: disable=g-import-not-at-top
  return gmm_mosaic.interpreter_reads_transposed()


@pytest.mark.parametrize("mode, impl", [("fwd", "pallas_mosaic@tm=128/tn=64/stages=2/split=m"),
                                        ("dx", "pallas_mosaic@tm=64/tn=64/stages=2"),
                                        ("tgmm", "tgmm_mosaic@tn=64/epi_n=64/stages=2")])
def test_ptxas_report_compiles_a_variant(tmp_path, mode, impl):
  # On CPU the kernels run in the interpreter (no ptxas): this checks the variant
  # names, the child process and its dump folder, not ptxas's own lines.
  if mode != "fwd" and not _mosaic_reads_transposed():
    pytest.skip("dx and tgmm read transposed operands: jax >= 0.11's interpreter")
  out = _run("tools.ptxas_report", "--interpret", "--shape=tiny-mosaic", "--rows=200",
             "--dist=skewed", f"--mode={mode}", f"--impls={impl}", f"--out={tmp_path}")
  assert out.returncode == 0, out.stderr[-2000:]
  assert f"== {impl} (tiny-mosaic, {mode}): rc 0" in out.stdout, out.stdout
  assert len(list(tmp_path.glob("*/stdout_stderr.txt"))) == 1


def test_ptxas_report_refuses_bad_names_before_compiling(tmp_path):
  from benchmarks.impl_names import check_mosaic_impl  # pylint: disable=g-import-not-at-top
  check_mosaic_impl("tgmm_mosaic@stages=2", "tgmm")
  check_mosaic_impl("pallas_mosaic", "dx")
  with pytest.raises(ValueError, match="fields from"):
    check_mosaic_impl("pallas_mosaic@bogus=1", "fwd")
  out = _run("tools.ptxas_report", "--interpret", f"--out={tmp_path}", "--mode=tgmm",
             "--impls=tgmm_mosaic,pallas_mosaic@split=m")
  assert out.returncode != 0
  assert "'pallas_mosaic@split=m' is not tgmm_mosaic" in out.stderr, out.stderr[-2000:]
  assert not list(tmp_path.iterdir())


def test_trace_summary_sums_a_profile(tmp_path):
  step = jax.jit(lambda a: jnp.tanh(a @ a.T).sum())
  a = jnp.ones((128, 128))
  step(a).block_until_ready()
  with jax.profiler.trace(str(tmp_path), create_perfetto_trace=True):
    for _ in range(3):
      step(a).block_until_ready()
  out = _run("tools.trace_summary", str(tmp_path), "--steps=3", timeout=120)
  assert out.returncode == 0, out.stderr[-2000:]
  assert "device time per step" in out.stdout
  # The jitted step shows up as an XLA program with a positive time.
  rows = [l.split() for l in out.stdout.splitlines() if l.strip()[:1].isdigit()]
  assert rows and float(rows[0][0]) > 0
  missing = _run("tools.trace_summary", str(tmp_path / "none"), timeout=120)
  assert missing.returncode == 1 and "no perfetto trace" in missing.stderr


def test_autotune_merges_into_the_json_table(tmp_path):
  # Triton kernels in interpret mode; one candidate, so it wins every key it is timed on.
  from moe_kernels import tuning  # pylint: disable=g-import-not-at-top
  table = tmp_path / "table.json"
  table.write_text(tuning.format_table({"gmm:bfloat16:r8:k1:n1": (16, 16, 16, 4, 2)},
                                       device="earlier", jax_version="0", date="2000-01-01"))
  out = _run("tools.autotune_gmm", "--interpret", "--shapes=tiny", "--ops=gmm,tgmm",
             "--candidates=64/64/32/4/2", "--iters=1", "--reps=1", f"--table={table}")
  assert out.returncode == 0, out.stderr[-2000:]
  data = json.loads(table.read_text())
  assert data["device"] == jax.devices()[0].device_kind and data["jax"] == jax.__version__
  entries = tuning.read_table(table)
  assert entries["gmm:bfloat16:r8:k1:n1"] == (16, 16, 16, 4, 2)      # kept
  assert entries["gmm:bfloat16:r64:k64:n96"][:5] == (64, 64, 32, 4, 2)   # forward
  assert entries["gmm:bfloat16:r64:k96:n64"][:5] == (64, 64, 32, 4, 2)   # input gradient
  assert entries["tgmm:bfloat16:r64:k64:n96"][:5] == (64, 64, 32, 4, 2)  # weight gradient


def test_autotune_refuses_bad_candidates():
  out = _run("tools.autotune_gmm", "--interpret", "--candidates=64/64")
  assert out.returncode != 0 and "is not tm/tn/tk/num_warps/num_stages" in out.stderr


def test_the_library_reads_the_checked_in_table():
  from moe_kernels import tuning  # pylint: disable=g-import-not-at-top
  path = pathlib.Path(tuning.__file__).with_name(tuning.TABLE_FILE)
  entries = tuning.read_table(path)
  key, entry = sorted(entries.items())[0]
  op, _, _, k, n = key.split(":")
  rows = int(key.split(":")[2][1:])
  assert tuning.lookup(op, rows * 8, int(k[1:]), int(n[1:]), 8, jnp.bfloat16) == \
      tuning.Config(*entry)
  # The autotuner writes the same layout, so regenerating the table changes only values.
  data = json.loads(path.read_text())
  assert tuning.format_table(entries, device=data["device"], jax_version=data["jax"],
                             date=data["date"]) == path.read_text()


def _bash(script, tmp_path, *args):
  env = dict(os.environ, OUT=str(tmp_path / "out"), PYTHON=sys.executable, JAX_PLATFORMS="cpu",
             PYTHONPATH="")
  return subprocess.run(["bash", script, *args], cwd=tmp_path, capture_output=True, text=True,
                        timeout=300, env=env)


def test_gpu_env_puts_the_checkout_on_the_path(tmp_path):
  out = subprocess.run(["bash", "-c", f"source {REPO}/tools/gpu_env.sh && echo $PYTHONPATH"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=60,
                       env=dict(os.environ, PYTHONPATH=""))
  assert out.returncode == 0, out.stderr
  entries = out.stdout.strip().split(":")
  assert REPO in entries
  aliases = [pathlib.Path(e) / "moe_kernels" for e in entries if (pathlib.Path(e) / "moe_kernels").exists()]
  assert aliases and aliases[0].resolve() == pathlib.Path(REPO, "kernels").resolve()


def test_gpu_session_runs_each_step_and_logs_it(tmp_path):
  out = _bash(f"{REPO}/tools/gpu_session.sh", tmp_path, "tools.trace_summary=--help",
              f"tools.trace_summary={tmp_path}/none")
  assert out.returncode == 0, out.stderr
  summary = (tmp_path / "out" / "summary.txt").read_text().splitlines()
  assert summary[0].startswith("== step 1: tools.trace_summary --help: rc 0"), summary
  assert summary[1].startswith(f"== step 2: tools.trace_summary {tmp_path}/none: rc 1"), summary
  assert "no perfetto trace" in (tmp_path / "out" / "step2_tools.trace_summary.log").read_text()
