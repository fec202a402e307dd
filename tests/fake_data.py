"""A deterministic, checkpointable stand-in for the grain iterator (unit tests)."""
import json

import numpy as np


class FakeGroups:
  """Batch i is a pure function of (seed, i); state is the next index.

  Rows [offset, offset + batch) of a conceptual global batch of `global_batch`
  groups, so several processes can feed disjoint shares of the same batch.
  """

  def __init__(self, global_batch, res, seed=0, process_index=0,
               process_count=1, fail_at=None):
    self.global_batch, self.res, self.seed = global_batch, res, seed
    self.local = global_batch // process_count
    self.offset = process_index * self.local
    self.fail_at = fail_at
    self.i = 0

  def global_batch_at(self, i):
    rng = np.random.default_rng([self.seed, i])
    b, r = self.global_batch, self.res
    view_mask = np.ones((b, 3), bool)
    view_mask[rng.random(b) < 0.3, 2] = False  # some groups have 2 views
    dist_mask = view_mask & (rng.random((b, 3)) < 0.8)
    return {
        "views": rng.integers(0, 256, (b, 3, r, r, 3), np.uint8),
        "view_mask": view_mask,
        "distractors": rng.integers(0, 256, (b, 3, r, r, 3), np.uint8),
        "distractor_mask": dist_mask,
    }

  def __iter__(self):
    return self

  def __next__(self):
    if self.fail_at is not None and self.i == self.fail_at:
      raise KeyboardInterrupt(f"simulated stop before batch {self.i}")
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
