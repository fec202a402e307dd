"""Faults a run survives: preemption, kill -9, unreadable checkpoints, NaNs.

docs/faults.md lists these tests with their faults. Training
runs in a separate process (tests/train_worker.py) where a signal is the
fault; the tiny config takes ms per step, so the worker sleeps per batch to
let the test hit a known step.
"""
import json
import os
import re
import shutil
import signal
import time

import jax
import numpy as np
import pytest

import tb_events
from fake_data import FakeGroups
from fake_data import FakeTokens
from nearid_jax import checkpointing
from nearid_jax.training import train
from nearid_jax.model import NearID
from test_multihost import start
from test_multihost import wait
from test_train import tiny_config
from workers import free_port

# Every test here starts processes or trains a run.
pytestmark = pytest.mark.slow

TOKENS, WIDTH = 4, 64  # pico/8 at 16 px


@pytest.fixture(autouse=True)
def _no_retry_wait(monkeypatch):
  """Unreadable checkpoints here are truncated files: retrying is moot."""
  monkeypatch.setattr(checkpointing, "RETRY_DELAYS", (0.0, 0.0))


def _read_until(proc, text, timeout_lines=5000):
  """The worker's output lines up to the first one holding `text`."""
  lines = []
  for _ in range(timeout_lines):
    line = proc.stdout.readline()
    if not line:
      raise AssertionError(f"worker ended before {text!r}:\n"
                           + "".join(lines[-40:]))
    lines.append(line)
    if text in line:
      return "".join(lines)
  raise AssertionError(f"no {text!r} in {timeout_lines} lines")


def _steps_logged(workdir):
  rows = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  return [r["step"] for r in rows]


def _saved_steps(workdir):
  return list(checkpointing.manager(workdir, read_only=True).all_steps())


def _train(tmp_path, name, *opts):
  return start(str(tmp_path / f"{name}.npz"), 0, 1, 0, 8, "mode=train",
               f"workdir={tmp_path / name}", *opts)


@pytest.mark.parametrize("signum,launch", [
    (signal.SIGTERM, False),  # the loop's own handler (a library call)
    (signal.SIGINT, True),  # handlers from the start, as launch.py's
], ids=["sigterm", "sigint"])
def test_sigterm_checkpoints_the_next_step_and_exits_0(tmp_path, signum,
                                                       launch):
  run = tmp_path / "run"
  p = _train(tmp_path, "run", "total_steps=1000", "ckpt_every=1000",
             "delay=0.05", f"launch={int(launch)}")
  _read_until(p, "step 3/1000")
  p.send_signal(signum)
  (out,) = wait([p])  # exit status 0
  stop = int(re.search(r"preempted at step (\d+)", out).group(1))
  assert 3 <= stop < 1000
  assert f"preemption notice: saved step {stop}, stopping" in out
  # ckpt_every=1000: the only checkpoint is the one the notice made
  assert _saved_steps(run) == [stop]
  assert _steps_logged(run)[-1] == stop

  (out,) = wait([_train(tmp_path, "run", f"total_steps={stop + 2}",
                        "ckpt_every=1000")])
  assert f"resumed from step {stop}" in out
  assert _steps_logged(run) == list(range(1, stop + 3))


def test_second_ctrl_c_stops_at_once_without_saving(tmp_path):
  # 5 s per batch: both notices come while the loop waits for step 3's.
  p = _train(tmp_path, "run", "total_steps=1000", "ckpt_every=1000",
             "delay=5", "launch=1")
  _read_until(p, "step 2/1000")
  p.send_signal(signal.SIGINT)
  time.sleep(1)  # two notices, not one: Python would merge them
  p.send_signal(signal.SIGINT)
  out = p.communicate(timeout=300)[0]
  assert p.returncode != 0 and "KeyboardInterrupt" in out, out[-3000:]
  assert "preempted" not in out
  assert not list(checkpointing.manager(tmp_path / "run").all_steps())


def test_notice_in_an_evaluation(tmp_path):
  run = tmp_path / "run"
  opts = ("total_steps=1000", "ckpt_every=1000", "eval_every=2",
          "eval_delay=3", "launch=1")
  # The step-0 evaluation (before the loop): it stops, nothing is saved.
  p = _train(tmp_path, "run", *opts)
  _read_until(p, "evaluating step 0")
  p.send_signal(signal.SIGTERM)
  (out,) = wait([p])
  assert "process 0: stopped by SIGTERM" in out
  assert "evaluating step 1" not in out and "step 1/1000" not in out
  assert not list(checkpointing.manager(run).all_steps())
  # An evaluation in the loop finishes; the step after it is saved.
  p = _train(tmp_path, "run", *opts)
  _read_until(p, "evaluating step 2")
  p.send_signal(signal.SIGTERM)
  (out,) = wait([p])
  assert "process 0: preempted at step 3" in out
  assert list(checkpointing.manager(run).all_steps()) == [3]
  rows = [json.loads(l) for l in open(run / "metrics.jsonl")]
  assert [r["step"] for r in rows if "eval/step" in r] == [0, 2]
  assert _steps_logged(run)[-1] == 3


def test_kill_9_then_restart_equals_the_uninterrupted_run(tmp_path):
  kill_at = int(np.random.default_rng().integers(2, 12))
  p = _train(tmp_path, "cut", "total_steps=14", "ckpt_every=3", "delay=0.1")
  _read_until(p, f"step {kill_at}/14")
  p.kill()  # SIGKILL: no handler, no cleanup, maybe in the middle of a save
  p.communicate()
  wait([_train(tmp_path, "cut", "total_steps=14", "ckpt_every=3"),
        _train(tmp_path, "full", "total_steps=14", "ckpt_every=3")])
  cut, full = np.load(tmp_path / "cut.npz"), np.load(tmp_path / "full.npz")
  assert sorted(cut) == sorted(full)
  for k in full:  # same programs, same data from the restored iterator
    np.testing.assert_array_equal(cut[k], full[k],
                                  err_msg=f"{k} (killed at step {kill_at})")
  # rows of the steps redone after the restart appear once, in TensorBoard
  # too (the restart hides the events past its checkpoint)
  assert _steps_logged(tmp_path / "cut") == list(range(1, 15)), kill_at
  shown = tb_events.scalars(str(tmp_path / "cut"))["train/loss"]
  assert [s for s, _ in shown] == list(range(1, 15)), kill_at


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT],
                         ids=["sigterm", "sigint"])
def test_every_process_stops_at_the_same_step(tmp_path, signum):
  run = tmp_path / "run"
  port = free_port()
  procs = [start(str(tmp_path / "out.npz"), i, 2, port, 2, "mode=train",
                 f"workdir={run}", "total_steps=1000", "ckpt_every=1000",
                 "delay=0.05") for i in range(2)]
  head = _read_until(procs[0], "step 3/1000")
  procs[1].send_signal(signum)  # only one host hears the notice
  outs = wait(procs)
  stops = [int(re.search(rf"process {i}: preempted at step (\d+)",
                         out).group(1)) for i, out in enumerate(outs)]
  assert stops[0] == stops[1] >= 3, (stops, head)
  assert _saved_steps(run) == [stops[0]]


def _run(config, workdir, data=None):
  data = data or FakeGroups(config.input.batch_size, config.model.res)
  state, _ = train.train_and_evaluate(config, str(workdir), data_iter=data)
  return jax.device_get(state)


def _damage(step_dir):
  """Cuts every file of the saved train state to half its length."""
  files = [f for f in (step_dir / "state").rglob("*") if f.is_file()]
  assert files
  for f in files:
    f.write_bytes(f.read_bytes()[:f.stat().st_size // 2])


def test_unreadable_latest_checkpoint_is_set_aside(tmp_path, capsys):
  cut, full = tmp_path / "cut", tmp_path / "full"
  config = tiny_config(total_steps=8, ckpt_every=2)
  with pytest.raises(KeyboardInterrupt):  # stopped after step 6's save
    _run(config, cut, FakeGroups(8, config.model.res, fail_at=6))
  _damage(cut / "checkpoints" / "6")
  # and a save that crashed half way: orbax's temporary dir of step 8
  shutil.copytree(cut / "checkpoints" / "4",
                  cut / "checkpoints" / "8.orbax-checkpoint-tmp-1234")
  _damage(cut / "checkpoints" / "8.orbax-checkpoint-tmp-1234")
  capsys.readouterr()

  resumed = _run(config, cut)
  log = capsys.readouterr().out
  assert "checkpoints/6 cannot be restored" in log
  assert "resumed from step 4" in log
  assert (cut / "checkpoints_unreadable" / "6" / "state").is_dir()  # kept
  assert not list((cut / "checkpoints").glob("*tmp*"))
  want = _run(config, full)
  jax.tree.map(np.testing.assert_array_equal, resumed.params, want.params)
  assert _steps_logged(cut) == list(range(1, 9))


def test_no_readable_checkpoint_stops_and_moves_nothing(tmp_path):
  run = tmp_path / "run"
  _run(tiny_config(total_steps=4, ckpt_every=2), run)
  for step in ("2", "4"):
    _damage(run / "checkpoints" / step)
  with pytest.raises(RuntimeError, match=r"no checkpoint in .*checkpoints "
                     r"can be restored .* \(newest: step 4\)"):
    _run(tiny_config(total_steps=6, ckpt_every=2), run)
  assert sorted(os.listdir(run / "checkpoints")) == ["2", "4"]
  assert not (run / "checkpoints_unreadable").exists()


def _tokens(nan_at=None):
  return FakeTokens(8, TOKENS, WIDTH, nan_at=nan_at)


def test_nonfinite_update_stops_naming_the_step(tmp_path):
  run = tmp_path / "run"
  # NaN in batch 2 = step 3; the next host sync is step 4's save, which it
  # must not make. log_every=5: no log step in between.
  config = tiny_config(ckpt_every=2, log_every=5)
  with pytest.raises(FloatingPointError,
                     match=r"step 3: the loss or a gradient is not finite.*"
                     r"Last good checkpoint: step 2"):
    _run(config, run, _tokens(nan_at=2))
  assert _saved_steps(run) == [2]
  clean = _run(tiny_config(total_steps=2), tmp_path / "clean", _tokens())
  saved = NearID.load(str(run)).params["head"]  # the workdir's latest head
  jax.tree.map(np.testing.assert_array_equal, saved, clean.params)


def test_nonfinite_update_skipped_and_counted(tmp_path):
  run = tmp_path / "run"
  state = _run(tiny_config(on_nonfinite="skip"), run, _tokens(nan_at=2))
  assert int(state.step) == 6 and int(state.skipped) == 1
  assert int(state.first_nonfinite) == 3
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(state.params))
  rows = [json.loads(l) for l in open(run / "metrics.jsonl")]
  skipped = {r["step"]: r["train/skipped_updates"] for r in rows}
  assert skipped == {1: 0, 2: 0, 3: 1, 4: 1, 5: 1, 6: 1}
  assert np.isnan(rows[2]["train/loss"])
  # the finite steps did train: the head is not the initial one
  init = NearID.from_config(tiny_config()).params["head"]
  moved = max(float(np.abs(a - b).max()) for a, b in zip(
      jax.tree.leaves(state.params), jax.tree.leaves(init)))
  assert moved > 1e-3
