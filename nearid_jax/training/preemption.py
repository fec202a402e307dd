"""Preemption notices (SIGTERM) turned into one agreed step to stop at.

TPU VMs and most schedulers send SIGTERM some time before they kill a job.
The loop asks `reached(step)` after every step; once it says yes, the loop
saves a checkpoint at that step and raises `Preempted`, which launch.py turns
into exit status 0 (a clean stop the scheduler may restart from).

One process: a Python SIGTERM handler sets a flag; the step after the notice
is the stop step. Several processes (jax.distributed): JAX's preemption sync
service hears SIGTERM on any process, agrees on a step every process has not
yet passed, and answers yes on all of them at that step, so every process
saves the same step.
"""
import signal
import threading

import jax
from jax.experimental import multihost_utils


class Preempted(Exception):
  """Training stopped at a preemption notice after checkpointing `step`."""

  def __init__(self, step, workdir):
    super().__init__(f"preempted: checkpoint saved at step {step} in "
                     f"{workdir}; run the same command to resume")
    self.step = step


class Watch:
  """Use as a context manager around the training loop."""

  def __init__(self):
    # JAX's sync service installs its own SIGTERM listener; ours would
    # replace it, so the flag is only for runs without jax.distributed.
    self.distributed = jax.process_count() > 1
    self._notice = threading.Event()
    self._previous = None

  def __enter__(self):
    if (not self.distributed
        and threading.current_thread() is threading.main_thread()):
      self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)
    return self

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None

  def _on_sigterm(self, signum, frame):
    del signum, frame
    self._notice.set()

  def reached(self, step):
    """True at the step every process stops at, once a notice has come."""
    if self.distributed:
      return multihost_utils.reached_preemption_sync_point(step)
    return self._notice.is_set()
