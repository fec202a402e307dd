"""A training workdir as a reader sees it: its config and its trained head."""
import json
import os

import ml_collections
import numpy as np

from nearid_jax import checkpointing


def is_workdir(path):
  return (os.path.isdir(os.path.join(path, "checkpoints"))
          and os.path.exists(os.path.join(path, "config.json")))


def read_config(workdir, step=None):
  """The config the newest checkpoint (or `step`'s) was saved with: an edit
  of config.json after training changes nothing. config.json for a
  checkpoint saved before configs were kept with checkpoints."""
  mngr = checkpointing.manager(workdir, async_save=False)
  steps = sorted(mngr.all_steps(), reverse=True) if step is None else [step]
  for s in steps:
    try:
      saved = checkpointing.saved_config(mngr, s)
    except Exception:  # pylint: disable=broad-except
      if step is not None:
        raise
      continue  # unreadable: restore_head reports it and reads an older one
    if saved is None:
      break
    return ml_collections.ConfigDict(saved)
  with open(os.path.join(workdir, "config.json")) as f:
    return ml_collections.ConfigDict(json.load(f))


def restore_head(workdir, head):
  """-> (the trained head's params, their step) from the newest readable
  checkpoint; `head` gives their structure. Only the head is read: no
  optimizer state, no training code."""
  mngr = checkpointing.manager(workdir, async_save=False)
  restored = checkpointing.restore(
      mngr, {"params": head, "step": np.zeros((), np.int32)}, partial=True)
  if restored is None:
    raise FileNotFoundError(f"{workdir}: no checkpoint in "
                            f"{os.path.join(workdir, 'checkpoints')}")
  return restored["params"], int(restored["step"])


def resolve_data_dirs(config, workdir):
  """input.data_dir / manual_dir left "" live in the workdir (the demo's)."""
  inp = config.input
  inp.manual_dir = inp.manual_dir or os.path.join(workdir, "data", "hf")
  inp.data_dir = inp.data_dir or os.path.join(workdir, "data", "tfds")
