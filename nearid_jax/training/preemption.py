"""Stop notices (SIGTERM, SIGINT) turned into one agreed step to stop at.

TPU VMs and most schedulers send SIGTERM some time before they kill a job;
Ctrl-C sends SIGINT. The loop asks `reached(step)` after every step; once it
says yes, the loop saves a checkpoint at that step and raises `Preempted`,
which launch.py turns into exit status 0 (a clean stop the scheduler may
restart from). The loop is a signals.deferred() section: a notice there is
recorded, not raised (nearid_jax/signals.py has the other modes).

One process: signals.py's handler records the notice; the step after it is
the stop step. Several processes (jax.distributed): JAX's preemption sync
service hears SIGTERM on any process, agrees on a step every process has not
yet passed, and answers yes on all of them at that step, so every process
saves the same step. A Ctrl-C on one of them is passed on to it as SIGTERM.
"""
import contextlib
import os
import signal
import threading

import jax
from jax.experimental import multihost_utils

from nearid_jax import signals


class Preempted(Exception):
  """Training stopped at a notice after checkpointing `step`."""

  def __init__(self, step, workdir):
    super().__init__(f"preempted: checkpoint saved at step {step} in "
                     f"{workdir}; run the same command to resume")
    self.step = step


class Watch:
  """Use as a context manager around the training loop."""

  def __init__(self):
    # JAX's sync service installs its own SIGTERM listener, which ours would
    # replace: with several processes, only SIGINT is ours.
    self.distributed = jax.process_count() > 1
    self._signums = ((signal.SIGINT,) if self.distributed
                     else signals.SIGNALS)
    self._stack = contextlib.ExitStack()
    self._passed_on = False

  def __enter__(self):
    mine = [s for s in self._signums if not signals.installed(s)]
    if mine and threading.current_thread() is threading.main_thread():
      # Called as a library, without launch.py: handlers for the loop only.
      previous = signals.install(mine)
      self._stack.callback(
          lambda: [signal.signal(s, h) for s, h in previous.items()])
    self._stack.enter_context(signals.deferred())
    return self

  def __exit__(self, *exc):
    if exc[0] is Preempted:
      signals.clear()  # acted on: a later run in this process starts afresh
    return self._stack.__exit__(*exc)

  def reached(self, step):
    """True at the step every process stops at, once a notice has come."""
    if self.distributed:
      if signals.notice() == signal.SIGINT and not self._passed_on:
        self._passed_on = True
        os.kill(os.getpid(), signal.SIGTERM)  # to JAX's listener
      return multihost_utils.reached_preemption_sync_point(step)
    return signals.notice() is not None
