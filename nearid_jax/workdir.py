"""A training workdir as a reader sees it (its config and its trained head,
read-only) and the one writer lock of a run."""
import contextlib
import json
import os

import jax
from jax.experimental import multihost_utils
import ml_collections
import numpy as np

from input_pipeline import locks
from nearid_jax import checkpointing


def is_workdir(path):
  return (os.path.isdir(os.path.join(path, "checkpoints"))
          and os.path.exists(os.path.join(path, "config.json")))


def read_config(workdir, step=None):
  """The config the newest checkpoint (or `step`'s) was saved with: an edit
  of config.json after training changes nothing. config.json for a
  checkpoint saved before configs were kept with checkpoints. Read-only, as
  restore_head."""
  return read_config_and_step(workdir, step)[0]


def read_config_and_step(workdir, step=None):
  """-> (read_config's config, the step it was read from; None when it is
  config.json's)."""
  mngr = checkpointing.manager(workdir, read_only=True)
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
    return ml_collections.ConfigDict(saved), s
  with open(os.path.join(workdir, "config.json")) as f:
    return ml_collections.ConfigDict(json.load(f)), None


def restore_head(workdir, head):
  """-> (the trained head's params, their step) from the newest readable
  checkpoint; `head` gives their structure. Only the head is read: no
  optimizer state, no training code. Read-only: a run still writing there
  keeps its saves in flight; unreadable checkpoints are skipped, not moved."""
  mngr = checkpointing.manager(workdir, read_only=True)
  restored = checkpointing.restore(
      mngr, {"params": head, "step": np.zeros((), np.int32)}, partial=True,
      read_only=True)
  if restored is None:
    raise FileNotFoundError(f"{workdir}: no checkpoint in "
                            f"{os.path.join(workdir, 'checkpoints')}")
  return restored["params"], int(restored["step"])


def resolve_data_dirs(config, workdir):
  """input.data_dir / manual_dir left "" live in the workdir (the demo's)."""
  inp = config.input
  inp.manual_dir = inp.manual_dir or os.path.join(workdir, "data", "hf")
  inp.data_dir = inp.data_dir or os.path.join(workdir, "data", "tfds")


@contextlib.contextmanager
def writer_lock(directory, what):
  """locks.hold(directory) for a run: process 0 takes it for all of the
  run's processes, and all stop when it is refused."""
  with contextlib.ExitStack() as stack:
    refused = None
    if jax.process_index() == 0:
      try:
        stack.enter_context(locks.hold(directory, what))
      except (locks.Locked, OSError) as e:  # others must not wait for it
        refused = e
    if jax.process_count() > 1:
      taken = multihost_utils.broadcast_one_to_all(np.int32(refused is None))
      if not taken and refused is None:
        refused = locks.Locked(f"{directory}: process 0 could not take its "
                               "lock (its output says who holds it)")
    if refused is not None:
      raise refused
    yield
