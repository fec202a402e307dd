"""NearID splits: the release's split files, or a seeded split when none.

The release ships `splits/{train,val,test}.json`, each a JSON list of 0-based
row positions into the (unshuffled) datasets, pairwise disjoint; positions,
not `id` values. The synthetic generator writes the same files.
"""
import json
import os

import numpy as np

NAMES = ("train", "val", "test")


def seeded(n, seed, val_fraction=0.05, test_fraction=0.15):
  """A seeded split of n rows -> {split: sorted row positions}."""
  order = np.random.default_rng(seed).permutation(n)
  n_val = max(1, round(n * val_fraction))
  n_test = max(1, round(n * test_fraction))
  if n_val + n_test >= n:
    raise ValueError(f"{n} rows are too few for a train/val/test split")
  parts = {"train": order[n_val + n_test:], "val": order[:n_val],
           "test": order[n_val:n_val + n_test]}
  return {k: sorted(int(i) for i in v) for k, v in parts.items()}


def read(folder, n):
  """{split: positions} from `folder/<split>.json`, checked against n rows."""
  out, seen = {}, {}
  for name in NAMES:
    path = os.path.join(folder, f"{name}.json")
    if not os.path.exists(path):
      continue
    with open(path) as f:
      rows = json.load(f)
    if isinstance(rows, dict):  # the release's loader also takes {"indices"}
      rows = rows.get("indices")
    if not isinstance(rows, list) or not all(
        isinstance(r, int) and not isinstance(r, bool) for r in rows):
      raise ValueError(f"{path}: expected a JSON list of row positions")
    for r in rows:
      if not 0 <= r < n:
        raise ValueError(f"{path}: row {r} out of range (the datasets have "
                         f"{n} rows)")
      if r in seen:
        raise ValueError(f"{path}: row {r} is also in split {seen[r]!r}")
      seen[r] = name
    out[name] = rows
  if not out:
    raise ValueError(f"{folder}: no split files ({', '.join(NAMES)}.json)")
  return out
