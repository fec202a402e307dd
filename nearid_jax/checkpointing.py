"""Orbax checkpoints of a run: the train state and the data iterator together.

Layout: `{workdir}/checkpoints/{step}/{state,data,config}`. Saves are async
and atomic: orbax writes `{step}.orbax-checkpoint-tmp-*` and renames it when
complete, so a crash in the middle of a save leaves only a temporary
directory, which is never read and is removed at the next start. A latest
checkpoint that still cannot be read (a disk or copy fault) is reported and
moved to `{workdir}/checkpoints_unreadable/` and the one before it is used.
"""
import os
import shutil

import grain
import jax
from jax.experimental import multihost_utils
import numpy as np
import orbax.checkpoint as ocp

UNREADABLE = "checkpoints_unreadable"


def manager(workdir, keep=3, async_save=True):
  return ocp.CheckpointManager(
      os.path.join(os.path.abspath(workdir), "checkpoints"),
      options=ocp.CheckpointManagerOptions(
          max_to_keep=keep, create=True, cleanup_tmp_directories=True,
          enable_async_checkpointing=async_save))


def save(mngr, step, state, data_iter=None, force=False, config=None):
  """config: the run's config as JSON, kept with the step (saved_config)."""
  items = {"state": ocp.args.StandardSave(state)}
  if data_iter is not None:
    items["data"] = grain.checkpoint.CheckpointSave(data_iter)
  if config is not None:
    items["config"] = ocp.args.JsonSave(config)
  return mngr.save(step, args=ocp.args.Composite(**items), force=force)


def saved_config(mngr, step):
  """The config (a dict) checkpoint `step` was saved with; None for one
  saved before configs were kept with checkpoints."""
  try:
    return mngr.restore(step, args=ocp.args.Composite(
        config=ocp.args.JsonRestore())).config
  except KeyError:  # orbax's "Item "config" was not found in the checkpoint"
    return None


def _restore_step(mngr, step, state, data_iter, partial=False):
  if partial:  # a subtree of the saved state, as host arrays
    as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray),
                            state)
    items = {"state": ocp.args.PyTreeRestore(state, restore_args=as_numpy,
                                             partial_restore=True)}
  else:
    items = {"state": ocp.args.StandardRestore(state)}
  if data_iter is not None:
    items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
  return mngr.restore(step, args=ocp.args.Composite(**items)).state


def restore(mngr, state, data_iter=None, step=None, log=print, partial=False):
  """The newest readable (or the given `step`'s) checkpoint into `state`.

  `state` gives the structure and shardings; with `partial`, a dict holding
  part of the saved state (e.g. {"params": ..., "step": ...}) restored as
  host arrays. `data_iter` is restored in place. Returns None when there is no checkpoint. Unreadable checkpoints
  newer than the one restored are set aside (see the module doc); when none
  can be read, the first error is raised: that is a run of another config,
  not a disk fault, and nothing is moved.
  """
  if step is not None:
    return _restore_step(mngr, step, state, data_iter, partial)
  steps = sorted(mngr.all_steps(), reverse=True)
  failed = []
  for s in steps:
    try:
      restored = _restore_step(mngr, s, state, data_iter, partial)
    except Exception as e:  # pylint: disable=broad-except
      # orbax, tensorstore and grain each raise their own types here.
      log(f"checkpoint {mngr.directory / str(s)} cannot be restored "
          f"({type(e).__name__}: {str(e)[:300]}); trying the one before")
      failed.append((s, e))
      continue
    if failed:
      _set_aside(mngr, [f for f, _ in failed], log)
    return restored
  if failed:
    raise RuntimeError(
        f"no checkpoint in {mngr.directory} can be restored into this run's "
        f"state (newest: step {failed[0][0]}). Is it another config's "
        "workdir? Start this config in a new workdir.") from failed[0][1]
  return None


def _set_aside(mngr, steps, log):
  """Moves unreadable step dirs out of the manager's way, keeping them."""
  root = os.path.join(os.path.dirname(str(mngr.directory)), UNREADABLE)
  if jax.process_index() == 0:
    os.makedirs(root, exist_ok=True)
    for s in steps:
      dest = os.path.join(root, str(s))
      if os.path.exists(dest):
        shutil.rmtree(dest)
      os.replace(os.path.join(str(mngr.directory), str(s)), dest)
      log(f"moved unreadable checkpoint {s} to {dest}")
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("checkpoints set aside")
  mngr.reload()
