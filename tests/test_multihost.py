"""Two processes on localhost (2 CPU devices each) match one 4-device process."""
import os
import subprocess
import sys

import numpy as np
import pytest

from workers import free_port

# Every test here starts processes or trains a run.
pytestmark = pytest.mark.slow

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                      "train_worker.py")


def start(out, pid, nproc, port, ndev, *opts):
  """A tests/train_worker.py process (see its usage) with its own devices."""
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  return subprocess.Popen(
      [sys.executable, WORKER, out, str(pid), str(nproc), str(port),
       str(ndev), *opts], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
      text=True)


def wait(procs):
  outs = [p.communicate(timeout=600)[0] for p in procs]
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out[-3000:]
  return outs


def test_two_processes_match_one(tmp_path):
  port = free_port()
  multi = str(tmp_path / "multi.npz")
  single = str(tmp_path / "single.npz")
  outs = wait([start(multi, i, 2, port, 2) for i in range(2)])
  assert "process 1/2: 4 devices" in outs[1]
  wait([start(single, 0, 1, 0, 4)])
  a, b = np.load(multi), np.load(single)
  assert sorted(a) == sorted(b)
  for k in a:
    # see test_train: the key bias has a zero gradient, Adam amplifies noise
    tol = 1e-3 if k.endswith("key/bias") else 1e-5
    np.testing.assert_allclose(a[k], b[k], atol=tol, rtol=1e-5, err_msg=k)
