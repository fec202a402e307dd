"""SIGTERM and SIGINT turned into clean stops, in every mode.

launch.py calls `install()` before any work. The first notice (SIGTERM: a
scheduler's preemption notice or `kill`; SIGINT: Ctrl-C) is then
  * inside a `deferred()` section only recorded. The training loop is one
    (training/preemption.py): it saves a checkpoint at its next step and
    stops. Others are a few files written together: they finish, then stop.
  * anywhere else `Interrupted`, raised in the main thread at once: the work
    in flight stops. What it writes appears whole or not at all (renamed
    into place, or sealed by a file written last), so a rerun redoes it.
A second SIGINT raises KeyboardInterrupt at once, in a deferred section
too; a third one gets the default action (the process ends).
"""
import contextlib
import signal

SIGNALS = (signal.SIGTERM, signal.SIGINT)

_notice = None  # the first notice's signal number, until cleared
_depth = 0  # deferred() sections entered and not left


class Interrupted(BaseException):
  """A notice stopped the work in flight. A BaseException, as
  KeyboardInterrupt: an `except Exception` fallback (e.g. to an older
  checkpoint) must not take it for the work's own fault."""

  def __init__(self, signum):
    self.signum = signum
    self.name = signal.Signals(signum).name
    super().__init__(f"stopped by {self.name}")


def _on_signal(signum, frame):
  del frame
  global _notice
  if _notice is not None:
    if signum == signal.SIGINT:
      signal.signal(signal.SIGINT, signal.SIG_DFL)  # a third one ends it
      raise KeyboardInterrupt
    return  # SIGTERM again: the stop is under way
  _notice = signum
  if not _depth:
    raise Interrupted(signum)


def install(signums=SIGNALS):
  """Handles `signums` from now on (main thread only) -> previous handlers."""
  return {s: signal.signal(s, _on_signal) for s in signums}


def installed(signum):
  return signal.getsignal(signum) is _on_signal


def notice():
  """The first notice's signal number, or None."""
  return _notice


def clear():
  """Forgets the notice once it was acted on (the run stopped cleanly)."""
  global _notice
  _notice = None


@contextlib.contextmanager
def deferred():
  """A section a notice does not break: it is recorded, and `Interrupted`
  raised when the section ends."""
  global _depth
  _depth += 1
  try:
    yield
  finally:
    _depth -= 1
  if not _depth and _notice is not None:
    raise Interrupted(_notice)
