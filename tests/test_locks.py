"""One writer per workdir; readers change nothing; no leftovers.

docs/faults.md lists these tests with their faults. A live holder is this
test's parent process (alive, not this one); a dead one is a finished
child process, or this process's pid with another start time (the pid of
a dead process given to a later one).
"""
import json
import os
import shutil
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fake_data import FakeGroups
from fake_data import plant_lock
from input_pipeline import locks
from nearid_jax import checkpointing
from nearid_jax.model import NearID
from nearid_jax.training import train
from test_train import tiny_config


def test_second_writer_is_refused_naming_the_holder(tmp_path):
  path = plant_lock(tmp_path)
  with pytest.raises(locks.Locked) as e:
    locks.acquire(tmp_path, "training")
  msg = str(e.value)
  for part in (f"pid {os.getppid()} on host {socket.gethostname()}",
               "started 2026-01-02 03:04:05 +0000", "launch.py --mode train",
               f"lock file {path}"):
    assert part in msg, msg
  assert "remove" not in msg  # the holder runs: nothing to remove
  assert json.load(open(path))["pid"] == os.getppid()  # untouched


def test_another_hosts_lock_is_never_taken_over(tmp_path):
  path = plant_lock(tmp_path, host="other-host", pid=1)
  with pytest.raises(locks.Locked, match=rf"pid 1 on host other-host.*If "
                     rf"that process no longer runs on other-host, remove "
                     rf"{path}"):
    locks.acquire(tmp_path, "training")
  assert json.load(open(path))["host"] == "other-host"


def test_lock_of_a_dead_pid_reused_later_is_taken_over(tmp_path, capsys):
  start = locks.pid_start(os.getpid())
  if start is None:
    pytest.skip("no /proc/<pid>/stat: start times unknown")
  path = plant_lock(tmp_path, pid=os.getpid(), pid_start=start - 1)
  with locks.hold(tmp_path, "training"):
    assert json.load(open(path))["pid_start"] == start
  assert (f"took over the lock {path} of training (pid {os.getpid()} on host "
          in capsys.readouterr().out)
  assert not os.path.exists(path)


def test_released_on_exception_and_reentrant(tmp_path):
  path = os.path.join(tmp_path, locks.NAME)
  with pytest.raises(KeyError):
    with locks.hold(tmp_path, "demo"):
      with locks.hold(tmp_path, "training"):  # the same process: again
        pass
      assert os.path.exists(path)
      raise KeyError("fault")
  assert not os.path.exists(path)


def test_trainer_refused_before_writing_anything(tmp_path):
  plant_lock(tmp_path / "run")
  with pytest.raises(locks.Locked, match=f"pid {os.getppid()}"):
    train.train_and_evaluate(tiny_config(), str(tmp_path / "run"),
                             FakeGroups(8, 16))
  assert os.listdir(tmp_path / "run") == [locks.NAME]  # no config.json


@pytest.mark.slow
def test_two_processes_one_refused_and_dead_holder_taken_over(tmp_path):
  """A child process holds the lock: this one is refused naming it; once it
  is killed (no release), the lock is taken over."""
  ready = tmp_path / "ready"
  child = subprocess.Popen(
      [sys.executable, "-c",
       "import sys, time\n"
       "from input_pipeline import locks\n"
       f"locks.acquire({str(tmp_path)!r}, 'training')\n"
       f"open({str(ready)!r}, 'w').close()\n"
       "time.sleep(600)\n"],
      env={**os.environ, "PYTHONPATH": os.path.dirname(
          os.path.dirname(os.path.abspath(__file__)))})
  try:
    while not ready.exists():
      assert child.poll() is None, "the lock holder ended early"
    with pytest.raises(locks.Locked, match=rf"in use by training \(pid "
                       rf"{child.pid} on host"):
      locks.acquire(tmp_path, "training")
  finally:
    child.kill()
    child.wait()
  path = locks.acquire(tmp_path, "training")
  assert json.load(open(path))["pid"] == os.getpid()
  locks.release(path)


# --- readers: NearID.load and export of a workdir a run is still writing


def _damage(step_dir):
  for f in (step_dir / "state").rglob("*"):
    if f.is_file():
      f.write_bytes(f.read_bytes()[:f.stat().st_size // 2])


@pytest.fixture(name="model", scope="module")
def fixture_model():
  return NearID.from_config(tiny_config())


@pytest.fixture(name="written")
def fixture_written(tmp_path, model):
  """A run's workdir with steps 2 and 4, 4 unreadable, and a save of 6 in
  flight (orbax's temporary dir) -> (workdir, step 2's head)."""
  run, config = tmp_path / "run", tiny_config()
  head = model.params["head"]
  head2 = jax.tree.map(lambda x: x + 1, head)  # not the config's own head
  state, _ = train.create_train_state(config, head2)
  mngr = checkpointing.manager(run, async_save=False)
  checkpointing.save(mngr, 2, state.replace(step=jnp.int32(2)))
  (run / "config.json").write_text(config.to_json_best_effort())
  ckpts = run / "checkpoints"
  shutil.copytree(ckpts / "2", ckpts / "4")
  _damage(ckpts / "4")
  shutil.copytree(ckpts / "2", ckpts / "6.orbax-checkpoint-tmp-1234")
  return run, jax.device_get(head2)


def _listing(root):
  return sorted(os.path.relpath(os.path.join(d, f), root)
                for d, _, files in os.walk(root) for f in files)


def test_readers_change_nothing_in_a_workdir_being_written(written, tmp_path,
                                                           capsys):
  run, head2 = written
  before = _listing(run)
  loaded = NearID.load(str(run))
  log = capsys.readouterr().out
  assert "checkpoints/4 cannot be restored" in log
  assert "using checkpoint 2; the newer ones are left in place" in log
  assert loaded.step == 2
  jax.tree.map(np.testing.assert_array_equal, loaded.params["head"], head2)
  loaded.export(str(tmp_path / "out"))
  assert _listing(run) == before  # the save in flight and step 4 are there
  assert not (run / checkpointing.UNREADABLE).exists()


# --- leftovers and permissions of exports


def test_export_removes_dead_exports_and_follows_the_umask(model, tmp_path):
  host = socket.gethostname()
  # A dead export (this host, a pid that no longer runs), a live one (this
  # process) and another host's: only the dead one is removed.
  gone = tmp_path / f".export-{host}-{_free_pid()}-abcd"
  live = tmp_path / f".export-{host}-{os.getpid()}-abcd"
  other = tmp_path / ".export-other-host-1-abcd"
  for d in (gone, live, other):
    (d / "part").mkdir(parents=True)
  old = os.umask(0o022)
  try:
    out = model.export(str(tmp_path / "nearid"))
  finally:
    os.umask(old)
  assert not gone.exists() and live.exists() and other.exists()
  assert os.stat(out).st_mode & 0o777 == 0o755
  assert all(os.stat(os.path.join(out, f)).st_mode & 0o777 == 0o644
             for f in os.listdir(out))
  assert sorted(os.listdir(tmp_path)) == sorted(
      [live.name, other.name, "nearid"])


def _free_pid():
  """A pid no process has, as a dead process's."""
  pid = 1 << 22  # above Linux's default pid_max
  while True:
    try:
      os.kill(pid, 0)
    except ProcessLookupError:
      return pid
    except PermissionError:
      pass
    pid -= 1
