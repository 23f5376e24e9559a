"""Tests for moe_jax.training.workdir: the run lock and the recorded config."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import threading
import time

import pytest

from moe_jax.training import workdir as wd

needs_proc = pytest.mark.skipif(not os.path.isdir("/proc/self"),
                                reason="needs Linux /proc")


def _read(path):
  with open(path) as f:
    return json.load(f)


def _write_lock(path, **fields):
  holder = {"host": socket.gethostname(), "pid": 1, "pid_start": None,
            "started": "2026-01-01T00:00:00+00:00", "argv": ["train.py", "--x=1"]}
  holder.update(fields)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    json.dump(holder, f)


def _dead_pid():
  proc = subprocess.Popen([sys.executable, "-c", "pass"])
  proc.wait()
  return proc.pid


@pytest.fixture
def sleeper():
  proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
  yield proc
  proc.kill()
  proc.wait()


# ----------------------------------------------------------------------------
# The lock.


def test_acquire_creates_lock_with_our_pid(tmp_path):
  lock = wd.WorkdirLock(str(tmp_path / "run"))
  assert lock.path == str(tmp_path / "run" / "run.lock")
  assert lock.acquire() is None
  held = _read(lock.path)
  assert held["pid"] == os.getpid()
  assert held["host"] == socket.gethostname()
  assert held["argv"] == sys.argv
  if os.path.isdir("/proc/self"):
    assert held["pid_start"] == wd._process_start(os.getpid())
  lock.release()
  assert not os.path.exists(lock.path)


def test_second_lock_is_refused_until_release(tmp_path):
  first = wd.WorkdirLock(str(tmp_path))
  first.acquire()
  second = wd.WorkdirLock(str(tmp_path))
  with pytest.raises(wd.WorkdirInUse) as info:
    second.acquire()
  message = str(info.value)
  assert f"pid {os.getpid()}" in message
  assert socket.gethostname() in message
  assert first.path in message
  second.release()  # It never held the lock: must leave first's alone.
  assert _read(first.path)["pid"] == os.getpid()
  first.release()
  first.release()  # Idempotent.
  assert second.acquire() is None
  second.release()


def test_context_manager(tmp_path):
  with wd.WorkdirLock(str(tmp_path)) as lock:
    assert _read(lock.path)["pid"] == os.getpid()
    with pytest.raises(wd.WorkdirInUse):
      with wd.WorkdirLock(str(tmp_path)):
        pass
    assert os.path.exists(lock.path)
  assert not os.path.exists(lock.path)


def test_release_keeps_someone_elses_lock(tmp_path):
  lock = wd.WorkdirLock(str(tmp_path))
  lock.acquire()
  _write_lock(lock.path, pid=os.getpid() + 1)
  lock.release()
  assert _read(lock.path)["pid"] == os.getpid() + 1


def test_lock_of_dead_pid_is_taken_over(tmp_path):
  pid = _dead_pid()
  lock = wd.WorkdirLock(str(tmp_path))
  _write_lock(lock.path, pid=pid)
  message = lock.acquire()
  assert message is not None and f"pid {pid}" in message and "gone" in message
  assert lock.takeover == message
  assert _read(lock.path)["pid"] == os.getpid()
  assert os.listdir(tmp_path) == ["run.lock"]  # No .stale file left behind.
  lock.release()


@needs_proc
def test_lock_of_reused_pid_is_taken_over(tmp_path):
  alive = os.getppid()
  lock = wd.WorkdirLock(str(tmp_path))
  _write_lock(lock.path, pid=alive, pid_start="1")
  assert wd._process_start(alive) != "1"
  message = lock.acquire()
  assert message is not None and f"pid {alive}" in message
  assert _read(lock.path)["pid"] == os.getpid()
  lock.release()


@needs_proc
def test_lock_of_zombie_is_taken_over(tmp_path):
  proc = subprocess.Popen([sys.executable, "-c", "pass"])
  try:
    # Wait for it to exit but do not reap it: it stays a zombie.
    os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT)
    lock = wd.WorkdirLock(str(tmp_path))
    _write_lock(lock.path, pid=proc.pid, pid_start=wd._process_start(proc.pid))
    assert lock.acquire() is not None
    lock.release()
  finally:
    proc.wait()


def test_lock_from_another_host_is_refused(tmp_path):
  lock = wd.WorkdirLock(str(tmp_path))
  _write_lock(lock.path, host="elsewhere.invalid", pid=_dead_pid())
  with pytest.raises(wd.WorkdirInUse, match="elsewhere.invalid") as info:
    lock.acquire()
  assert "train.py --x=1" in str(info.value)
  assert _read(lock.path)["host"] == "elsewhere.invalid"


@pytest.mark.parametrize("content", ["", '{"host": "h", "pi', "[1, 2]", '{"pid": 0}'])
def test_corrupt_lock_is_taken_over_only_when_old(tmp_path, content):
  lock = wd.WorkdirLock(str(tmp_path))
  with open(lock.path, "w") as f:
    f.write(content)
  with pytest.raises(wd.WorkdirInUse, match="writing"):
    lock.acquire()
  old = time.time() - 120
  os.utime(lock.path, (old, old))
  message = lock.acquire()
  assert message is not None and "unreadable" in message
  assert _read(lock.path)["pid"] == os.getpid()
  lock.release()


def test_lock_of_live_process_is_refused_then_taken_over(tmp_path, sleeper):
  lock = wd.WorkdirLock(str(tmp_path))
  _write_lock(lock.path, pid=sleeper.pid, pid_start=wd._process_start(sleeper.pid))
  with pytest.raises(wd.WorkdirInUse, match=f"pid {sleeper.pid} "):
    lock.acquire()
  sleeper.kill()
  sleeper.wait()
  message = lock.acquire()
  assert message is not None and f"pid {sleeper.pid}" in message
  assert _read(lock.path)["pid"] == os.getpid()
  lock.release()


@pytest.mark.parametrize("attempt", range(10))  # A race: several tries.
def test_one_of_many_concurrent_takers_wins(tmp_path, attempt):
  path = os.path.join(str(tmp_path), "run.lock")
  _write_lock(path, pid=_dead_pid())
  locks = [wd.WorkdirLock(str(tmp_path)) for _ in range(8)]
  barrier = threading.Barrier(len(locks))
  outcomes = [None] * len(locks)

  def take(i):
    barrier.wait()
    try:
      locks[i].acquire()
      outcomes[i] = "won"
    except wd.WorkdirInUse:
      outcomes[i] = "refused"

  threads = [threading.Thread(target=take, args=(i,)) for i in range(len(locks))]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert outcomes.count("won") == 1, outcomes
  assert outcomes.count("refused") == len(locks) - 1
  assert os.listdir(tmp_path) == ["run.lock"]
  locks[outcomes.index("won")].release()


def test_a_takeover_in_progress_is_named(tmp_path):
  lock = wd.WorkdirLock(str(tmp_path))
  _write_lock(lock.path, pid=_dead_pid())
  with open(lock.path + ".takeover", "w"):
    pass
  with pytest.raises(wd.WorkdirInUse, match=r"taking over the stale lock right now"
                     r".*run\.lock\.takeover exists"):
    lock.acquire()
  os.remove(lock.path + ".takeover")
  assert "stale lock" in lock.acquire()
  assert sorted(os.listdir(tmp_path)) == ["run.lock"]
  lock.release()


def test_taker_does_not_remove_a_lock_that_replaced_the_stale_one(tmp_path, monkeypatch):
  lock = wd.WorkdirLock(str(tmp_path))
  _write_lock(lock.path, pid=_dead_pid())
  judge = wd.WorkdirLock._judge

  def judge_then_lose_the_race(self, raw, mtime):
    message = judge(self, raw, mtime)
    # Another taker replaces the stale lock with its live one, before our rename.
    os.remove(self.path)
    _write_lock(self.path, pid=os.getpid(), started="now", argv=["winner"])
    return message

  monkeypatch.setattr(wd.WorkdirLock, "_judge", judge_then_lose_the_race)
  with pytest.raises(wd.WorkdirInUse, match="winner"):
    lock.acquire()
  assert _read(lock.path)["argv"] == ["winner"]
  assert os.listdir(tmp_path) == ["run.lock"]


# ----------------------------------------------------------------------------
# The recorded config.


CONFIG = {"model": {"d_model": 64, "moe": {"top_k": 2, "experts": [8, 8]}},
          "train": {"seed": 0, "num_steps": 600, "log_every": 10, "lr": 0.001}}


def test_record_round_trip(tmp_path):
  assert wd.read_record(str(tmp_path)) is None
  record = wd.run_record(CONFIG, {"jax": "0.10.2"})
  assert set(record) == {"config", "versions", "created"}
  path = wd.write_record(str(tmp_path / "run"), record)
  assert path == str(tmp_path / "run" / "config.json")
  assert _read(path) == record
  assert wd.read_record(str(tmp_path / "run")) == record
  assert os.listdir(tmp_path / "run") == ["config.json"]  # No temp file left.


def test_read_record_names_an_unparsable_file(tmp_path):
  (tmp_path / "config.json").write_text('{"config": ')
  with pytest.raises(ValueError, match=re.escape(str(tmp_path / "config.json"))):
    wd.read_record(str(tmp_path))


def test_versions():
  found = wd.versions()
  assert set(found) == {"python", "jax", "jaxlib", "flax", "optax",
                        "orbax-checkpoint", "moe_jax", "git_commit"}
  assert found["python"] == "%d.%d.%d" % sys.version_info[:3]
  assert found["jax"] and found["moe_jax"]
  commit = found["git_commit"]
  assert commit is None or re.fullmatch(r"[0-9a-f]{40}(\+dirty)?", commit)
  json.dumps(found)


def test_versions_without_git(monkeypatch):
  monkeypatch.setenv("PATH", "")
  assert wd.versions()["git_commit"] is None


def test_flatten():
  assert wd.flatten(CONFIG) == {
      "model.d_model": 64, "model.moe.top_k": 2, "model.moe.experts": [8, 8],
      "train.seed": 0, "train.num_steps": 600, "train.log_every": 10,
      "train.lr": 0.001}


def _changed(**changes):
  config = json.loads(json.dumps(CONFIG))
  for field, value in changes.items():
    section, name = field.split("__")
    config[section][name] = value
  return config


def test_config_diff():
  new = _changed(train__seed=1, train__lr=0.0010000000000000002)
  del new["model"]["moe"]["top_k"]
  new["model"]["moe"]["capacity"] = 1.25
  assert wd.config_diff(CONFIG, new) == [
      ("model.moe.capacity", "<absent>", 1.25),
      ("model.moe.top_k", 2, "<absent>"),
      ("train.lr", 0.001, 0.0010000000000000002),
      ("train.seed", 0, 1)]
  assert wd.config_diff(CONFIG, _changed(train__seed=False)) == [
      ("train.seed", 0, False)]
  assert wd.config_diff(CONFIG, _changed(train__seed=0.0)) == []


def test_check_resume_identical():
  record = wd.run_record(CONFIG, {})
  assert wd.check_resume(record, json.loads(json.dumps(CONFIG)), [], []) == []


def test_check_resume_returns_allowed_changes():
  record = wd.run_record(CONFIG, {})
  new = _changed(train__num_steps=1000)
  assert wd.check_resume(record, new, ["train.num_steps"], ["model.*"]) == [
      ("train.num_steps", 600, 1000)]
  assert wd.format_change("train.num_steps", 600, 1000) == "train.num_steps: 600 -> 1000"


def test_check_resume_refuses_listing_every_difference():
  record = wd.run_record(CONFIG, {})
  new = _changed(train__seed=1, train__num_steps=1000, train__log_every=5)
  with pytest.raises(wd.ConfigChanged) as info:
    wd.check_resume(record, new, ["train.num_steps"], [], path="/w/config.json")
  message = str(info.value)
  assert "(/w/config.json)" in message
  assert "train.seed: 0 -> 1" in message
  assert "train.log_every: 10 -> 5" in message
  assert "train.num_steps" not in message  # Allowed, so not refused.
  assert "--allow_config_change=train.log_every,train.seed" in message


def test_never_beats_allowed():
  record = wd.run_record(CONFIG, {})
  new = _changed(train__num_steps=1000)
  new["model"]["d_model"] = 128
  with pytest.raises(wd.ConfigChanged) as info:
    wd.check_resume(record, new, ["model.d_model", "train.num_steps"], ["model.*"])
  message = str(info.value)
  assert "model.d_model: 64 -> 128" in message
  assert "never change" in message
  assert "--allow_config_change" not in message


def test_prefix_pattern():
  record = wd.run_record(CONFIG, {})
  new = _changed(train__num_steps=1000, train__log_every=5)
  assert [c[0] for c in wd.check_resume(record, new, ["train.*"], [])] == [
      "train.log_every", "train.num_steps"]
  with pytest.raises(wd.ConfigChanged):
    wd.check_resume(record, new, ["train.num_steps"], [])


def test_unknown_allowed_pattern():
  record = wd.run_record(CONFIG, {})
  with pytest.raises(ValueError, match=r"'train.num_step'.*train\.num_steps"):
    wd.check_resume(record, CONFIG, ["train.num_step"], [])
  with pytest.raises(ValueError, match="'trian.\\*'"):
    wd.check_resume(record, CONFIG, ["trian.*"], [])


def test_field_on_one_side_only():
  record = wd.run_record(CONFIG, {})
  new = json.loads(json.dumps(CONFIG))
  new["train"]["warmup"] = 100
  with pytest.raises(wd.ConfigChanged, match="train.warmup: <absent> -> 100"):
    wd.check_resume(record, new, [], [])
  assert wd.check_resume(record, new, ["train.warmup"], []) == [
      ("train.warmup", "<absent>", 100)]
