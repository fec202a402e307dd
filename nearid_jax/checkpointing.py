"""Orbax checkpoints of a run: the train state and the data iterator together.

Layout: `{workdir}/checkpoints/{step}/{state,data,config}`. Saves are async
and atomic: orbax writes `{step}.orbax-checkpoint-tmp-*` and renames it when
complete, so a crash in the middle of a save leaves only a temporary
directory, which is never read and is removed at the trainer's next start. A
read that fails is tried again (a transient fault of a network disk); a
latest checkpoint that still cannot be read (a disk or copy fault) is
reported and moved to `{workdir}/checkpoints_unreadable/{step}` (`{step}.1`,
`{step}.2`, ... when that step was set aside before: nothing there is ever
deleted), and the one before it is used. A reader (read_only: NearID.load,
eval, export) changes nothing: a save in flight keeps its temporary
directory, and an unreadable checkpoint is skipped for the one before it and
left in place.
"""
import logging
import os
import time

import grain
import jax
from jax.experimental import multihost_utils
import numpy as np
import orbax.checkpoint as ocp

UNREADABLE = "checkpoints_unreadable"
# Seconds before the 2nd and the 3rd read of a checkpoint that failed.
RETRY_DELAYS = (1.0, 2.0)


def manager(workdir, keep=3, async_save=True, read_only=False):
  """The run's checkpoints; read_only: no directory made, no save, no
  deletion, no temporary directory cleaned up (another process may be
  writing them)."""
  path = os.path.join(os.path.abspath(workdir), "checkpoints")
  if not read_only:
    return ocp.CheckpointManager(path, options=ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=True, cleanup_tmp_directories=True,
        enable_async_checkpointing=async_save))
  # orbax warns on every read-only manager that it is read-only: as asked.
  absl_log = logging.getLogger("absl")
  level = absl_log.level
  absl_log.setLevel(logging.ERROR)
  try:
    return ocp.CheckpointManager(path, options=ocp.CheckpointManagerOptions(
        read_only=True, create=False, save_interval_steps=0,
        enable_async_checkpointing=False))
  finally:
    absl_log.setLevel(level)


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


def _restore_retried(mngr, step, state, data_iter, partial, delays, log):
  """_restore_step, tried again after each of `delays` (seconds)."""
  for delay in delays:
    try:
      return _restore_step(mngr, step, state, data_iter, partial)
    except Exception as e:  # pylint: disable=broad-except
      log(f"checkpoint {mngr.directory / str(step)}: read failed "
          f"({type(e).__name__}: {str(e)[:200]}); trying again in "
          f"{delay:g}s")
    time.sleep(delay)
  return _restore_step(mngr, step, state, data_iter, partial)


def restore(mngr, state, data_iter=None, step=None, log=print, partial=False,
            read_only=False, retry_delays=None):
  """The newest readable (or the given `step`'s) checkpoint into `state`.

  `state` gives the structure and shardings; with `partial`, a dict holding
  part of the saved state (e.g. {"params": ..., "step": ...}) restored as
  host arrays. `data_iter` is restored in place. Returns None when there
  is no checkpoint. A failed read is tried again after each of
  `retry_delays` (seconds; default RETRY_DELAYS). Checkpoints still
  unreadable and newer than the one restored are set aside (see the module
  doc), or only skipped when read_only (a reader's manager); when none can
  be read, the first error is raised: that is a run of another config, not a
  disk fault, and nothing is moved.
  """
  if step is not None:
    return _restore_step(mngr, step, state, data_iter, partial)
  steps = sorted(mngr.all_steps(), reverse=True)
  delays = RETRY_DELAYS if retry_delays is None else retry_delays
  failed = []
  for s in steps:
    try:
      restored = _restore_retried(mngr, s, state, data_iter, partial,
                                  delays, log)
    except Exception as e:  # pylint: disable=broad-except
      # orbax, tensorstore and grain each raise their own types here.
      log(f"checkpoint {mngr.directory / str(s)} cannot be restored "
          f"({type(e).__name__}: {str(e)[:300]}); trying the one before")
      failed.append((s, e))
      continue
    if failed and read_only:
      log(f"using checkpoint {s}; the newer ones are left in place")
    elif failed:
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
      dest, n = os.path.join(root, str(s)), 0
      while os.path.exists(dest):  # set aside before: keep both
        n += 1
        dest = os.path.join(root, f"{s}.{n}")
      os.replace(os.path.join(str(mngr.directory), str(s)), dest)
      log(f"moved unreadable checkpoint {s} to {dest}")
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("checkpoints set aside")
  mngr.reload()
