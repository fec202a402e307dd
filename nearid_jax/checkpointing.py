"""Orbax checkpoints of a run: the train state and the data iterator together.

Layout: `{workdir}/checkpoints/{step}/{state,data}`. Saves are async and
atomic (orbax writes to a temporary name and renames), keep-N.
"""
import os

import grain
import orbax.checkpoint as ocp


def manager(workdir, keep=3, async_save=True):
  return ocp.CheckpointManager(
      os.path.join(os.path.abspath(workdir), "checkpoints"),
      options=ocp.CheckpointManagerOptions(
          max_to_keep=keep, create=True,
          enable_async_checkpointing=async_save))


def save(mngr, step, state, data_iter=None, force=False):
  items = {"state": ocp.args.StandardSave(state)}
  if data_iter is not None:
    items["data"] = grain.checkpoint.CheckpointSave(data_iter)
  return mngr.save(step, args=ocp.args.Composite(**items), force=force)


def restore(mngr, state, data_iter=None, step=None):
  """Latest (or `step`) checkpoint into `state`'s structure and shardings.

  Restores `data_iter` in place. Returns None when there is no checkpoint.
  """
  step = mngr.latest_step() if step is None else step
  if step is None:
    return None
  items = {"state": ocp.args.StandardRestore(state)}
  if data_iter is not None:
    items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
  return mngr.restore(step, args=ocp.args.Composite(**items)).state
