"""Stop notices in this process: signals.py's handler, raised or deferred.

The processes launch.py runs are in test_reliability.py and test_demo.py.
"""
import signal

import pytest

from nearid_jax import signals


@pytest.fixture
def handlers():
  previous = signals.install()
  yield
  signals.clear()
  for s, h in previous.items():
    signal.signal(s, h)


@pytest.mark.parametrize("signum", signals.SIGNALS)
def test_outside_a_deferred_section_the_notice_stops_at_once(handlers,
                                                             signum):
  done = []
  with pytest.raises(signals.Interrupted) as e:
    signal.raise_signal(signum)
    done.append("after")  # the work in flight does not go on
  assert done == [] and e.value.signum == signum
  assert str(e.value) == f"stopped by {signal.Signals(signum).name}"


def test_interrupted_is_not_an_exception_to_fall_back_from(handlers):
  with pytest.raises(signals.Interrupted):
    try:
      signal.raise_signal(signal.SIGTERM)
    except Exception:  # pylint: disable=broad-except
      pytest.fail("an `except Exception` took the notice")


def test_deferred_section_finishes_then_stops(handlers):
  done = []
  with pytest.raises(signals.Interrupted, match="SIGTERM"):
    with signals.deferred():
      signal.raise_signal(signal.SIGTERM)
      done.append("rest of the section")
      signal.raise_signal(signal.SIGTERM)  # again: the same stop
      done.append("end")
  assert done == ["rest of the section", "end"]
  assert signals.notice() == signal.SIGTERM


def test_second_ctrl_c_stops_a_deferred_section_at_once(handlers):
  done = []
  with pytest.raises(KeyboardInterrupt):
    with signals.deferred():
      signal.raise_signal(signal.SIGINT)
      done.append("after the first")
      signal.raise_signal(signal.SIGINT)
      done.append("after the second")
  assert done == ["after the first"]
  # a third Ctrl-C gets the default action: the process ends
  assert signal.getsignal(signal.SIGINT) == signal.SIG_DFL


def test_no_notice_no_stop(handlers):
  with signals.deferred():
    pass
  assert signals.notice() is None
