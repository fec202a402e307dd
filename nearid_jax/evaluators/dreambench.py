"""DreamBench++ scores: reference/generated pairs -> {key: 100 * cos} in the
human rating files' key order (metrics.dreambench_mh reads them)."""
import os

import numpy as np

from input_pipeline import preprocess
from nearid_jax import metrics


def _image(x, key, which):
  if isinstance(x, (str, os.PathLike)):
    if not os.path.isfile(x):
      raise FileNotFoundError(f"DreamBench++ key {key!r}: {which} image {x} "
                              "not found")
    return preprocess.read_image(x)
  return x


def check_keys(keys, human_dir, method):
  """The human files' keys of `method`, in their order, after checking that
  `keys` holds each of them and nothing else."""
  want = metrics.dreambench_keys(human_dir, method)
  known, given = set(want), set(keys)
  missing = [k for k in want if k not in given]
  extra = [k for k in keys if k not in known]
  if missing or extra:
    raise ValueError(
        f"{method}: pairs do not match the keys of "
        f"{os.path.join(human_dir, 'group1', method + '-cp.json')}: "
        f"{len(missing)} missing (first {missing[:3]}), {len(extra)} unknown "
        f"(first {extra[:3]})")
  return want


def dreambench(model, pairs, human_dir, out_dir, method, chunk=256):
  """Scores reference/generated pairs into out_dir/{method}.json.

  Args:
    model: a NearID.
    pairs: {key: (reference, generated)}, keys as in the human rating files,
      images uint8 (H, W, 3) arrays, PIL images or paths.
    human_dir: holds group1/{method}-cp.json (gives the keys and their order).
    out_dir: the scores folder metrics.dreambench_mh reads.
    method: one of metrics.DB_METHODS.
    chunk: images decoded at a time.

  Returns:
    the written path; its JSON is {key: 100 * cos} in the human files' order.
  """
  keys = check_keys(list(pairs), human_dir, method)
  ref, gen = [], []
  for i in range(0, len(keys), chunk):
    part = keys[i:i + chunk]
    ref.append(model.embed([_image(pairs[k][0], k, "reference")
                            for k in part]))
    gen.append(model.embed([_image(pairs[k][1], k, "generated")
                            for k in part]))
  scores = metrics.dreambench_scores(np.concatenate(ref), np.concatenate(gen),
                                     keys)
  return metrics.write_dreambench_scores(scores, out_dir, method)

