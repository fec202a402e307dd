"""Deterministic stand-ins for unit tests: the grain iterator (checkpointable),
the holder of a directory's writer lock."""
import json
import os
import socket

import numpy as np

from input_pipeline import locks


class FakeGroups:
  """Batch i is a pure function of (seed, i); state is the next index.

  Rows [offset, offset + batch) of a conceptual global batch of `global_batch`
  groups, so several processes can feed disjoint shares of the same batch.
  """

  def __init__(self, global_batch, res, seed=0, process_index=0,
               process_count=1, fail_at=None, fail_with=KeyboardInterrupt):
    self.global_batch, self.res, self.seed = global_batch, res, seed
    self.local = global_batch // process_count
    self.offset = process_index * self.local
    self.fail_at, self.fail_with = fail_at, fail_with
    self.i = 0

  def _masks(self, rng):
    b = self.global_batch
    view_mask = np.ones((b, 3), bool)
    view_mask[rng.random(b) < 0.3, 2] = False  # some groups have 2 views
    dist_mask = view_mask & (rng.random((b, 3)) < 0.8)
    return {"view_mask": view_mask, "distractor_mask": dist_mask}

  def global_batch_at(self, i):
    rng = np.random.default_rng([self.seed, i])
    b, r = self.global_batch, self.res
    masks = self._masks(rng)
    return {
        "views": rng.integers(0, 256, (b, 3, r, r, 3), np.uint8),
        "distractors": rng.integers(0, 256, (b, 3, r, r, 3), np.uint8),
        **masks,
    }

  def __iter__(self):
    return self

  def __next__(self):
    if self.fail_at is not None and self.i == self.fail_at:
      raise self.fail_with(f"simulated fault before batch {self.i}")
    batch = self.global_batch_at(self.i)
    self.i += 1
    return {k: v[self.offset:self.offset + self.local] for k, v in
            batch.items()}

  def get_state(self):
    return json.dumps({"i": self.i}).encode()

  def set_state(self, state):
    self.i = json.loads(state)["i"]

  def start_prefetch(self):
    """grain's checkpoint handler calls this after set_state; nothing to do."""


class FakeTokens(FakeGroups):
  """Feature-cache batches: frozen tokens (B, 6, N, D) instead of images.

  nan_at: the batch index whose first token holds a NaN.
  """

  def __init__(self, global_batch, num_tokens, width, nan_at=None, **kw):
    super().__init__(global_batch, None, **kw)
    self.num_tokens, self.width, self.nan_at = num_tokens, width, nan_at

  def global_batch_at(self, i):
    rng = np.random.default_rng([self.seed, i])
    masks = self._masks(rng)
    tokens = rng.standard_normal(
        (self.global_batch, 6, self.num_tokens, self.width), np.float32)
    if i == self.nan_at:
      tokens[0, 0, 0, 0] = np.nan
    return {"tokens": tokens, **masks}


def plant_lock(directory, **holder):
  """A lock file of `holder` (defaults: this test's parent process, alive
  on this host, training) -> its path."""
  os.makedirs(directory, exist_ok=True)
  pid = holder.get("pid", os.getppid())
  holder = {"what": "training", "host": socket.gethostname(), "pid": pid,
            "pid_start": locks.pid_start(pid),
            "started": "2026-01-02 03:04:05 +0000",
            "command": "launch.py --mode train", **holder}
  path = os.path.join(directory, locks.NAME)
  with open(path, "w") as f:
    json.dump(holder, f)
  return path
