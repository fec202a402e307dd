"""checkpointing.restore when a read fails: once (retried) or every time (set
aside, never deleting what was set aside before)."""
import os

import numpy as np
import pytest

from nearid_jax import checkpointing


def _state(x):
  return {"w": np.full((4,), x, np.float32)}


@pytest.fixture
def mngr(tmp_path):
  m = checkpointing.manager(tmp_path, keep=5, async_save=False)
  for step in (1, 2):
    checkpointing.save(m, step, _state(step))
  yield m
  m.close()


def _failing(monkeypatch, step, times):
  """Reads of `step` fail `times` times (None: always); -> their count."""
  real, reads = checkpointing._restore_step, []  # pylint: disable=protected-access

  def flaky(mngr, s, *args, **kw):
    if s == step:
      reads.append(s)
      if times is None or len(reads) <= times:
        raise OSError(f"transient read error {len(reads)}")
    return real(mngr, s, *args, **kw)

  monkeypatch.setattr(checkpointing, "_restore_step", flaky)
  return reads


def test_transient_read_error_is_retried(mngr, tmp_path, monkeypatch):
  reads = _failing(monkeypatch, 2, times=2)
  log = []
  got = checkpointing.restore(mngr, _state(0), log=log.append,
                              retry_delays=(0, 0))
  np.testing.assert_array_equal(got["w"], _state(2)["w"])  # the newest
  assert len(reads) == 3
  assert sum("read failed (OSError: transient read error" in l
             for l in log) == 2, log
  assert sorted(mngr.all_steps()) == [1, 2]  # nothing moved
  assert not (tmp_path / checkpointing.UNREADABLE).exists()


def test_persistent_read_error_sets_aside_and_keeps_earlier_copies(
    mngr, tmp_path, monkeypatch):
  reads = _failing(monkeypatch, 2, times=None)
  got = checkpointing.restore(mngr, _state(0), log=lambda _: None,
                              retry_delays=(0, 0))
  np.testing.assert_array_equal(got["w"], _state(1)["w"])
  assert len(reads) == 3  # tried 3 times before it was set aside
  aside = tmp_path / checkpointing.UNREADABLE
  assert sorted(os.listdir(aside)) == ["2"]

  # Step 2 again, unreadable again, twice: every copy is kept, numbered.
  for _ in range(2):
    checkpointing.save(mngr, 2, _state(2))
    checkpointing.restore(mngr, _state(0), log=lambda _: None,
                          retry_delays=(0, 0))
  assert sorted(os.listdir(aside)) == ["2", "2.1", "2.2"]
  assert sorted(mngr.all_steps()) == [1]
  for name in ("2", "2.1", "2.2"):
    assert (aside / name / "state").is_dir(), name
