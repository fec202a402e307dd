"""One writer per directory: a training workdir, a TFDS data dir, a cache.

`hold(directory, what)` takes `<directory>/.lock`, a file created atomically
(O_CREAT | O_EXCL) that holds its writer as JSON: host, pid, the pid's start
time, when and by which command it was taken. A second writer is refused at
once, naming them and the lock file. A lock left by a dead process of this
host is taken over with a line saying so; another host's never is (the
message says how to remove it). Readers never take it.
"""
import contextlib
import fcntl
import json
import os
import socket
import sys
import time

NAME = ".lock"

# Lock path -> [depth, the JSON written]: a writer may take its own lock
# again (the demo holds its workdir while training takes it).
_held = {}


class Locked(RuntimeError):
  """Another writer holds the directory."""


def pid_start(pid):
  """The process's start in clock ticks since boot (Linux), else None: a
  later process given the same pid starts later."""
  try:
    with open(f"/proc/{pid}/stat") as f:
      return int(f.read().rsplit(")", 1)[1].split()[19])
  except (OSError, IndexError, ValueError):
    return None


def running(host, pid, start=None):
  """Whether process `pid` of `host` may still run: another host's is
  always taken as running."""
  if host != socket.gethostname():
    return True
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # another user's process
    pass
  now = pid_start(pid)
  return start is None or now is None or now == start


def _read(path):
  """The holder's dict; None when the file is gone; {} when it cannot be
  parsed (a writer between creating and filling it, or damage)."""
  for _ in range(20):  # filled right after it is created
    try:
      with open(path) as f:
        text = f.read()
    except FileNotFoundError:
      return None
    try:
      holder = json.loads(text)
      if isinstance(holder, dict):
        return holder
    except ValueError:
      pass
    time.sleep(0.05)
  return {}


def _stale(holder):
  return (isinstance(holder.get("pid"), int)
          and not running(holder.get("host"), holder["pid"],
                          holder.get("pid_start")))


def _describe(h):
  return (f"{h.get('what', 'a writer')} (pid {h.get('pid')} on host "
          f"{h.get('host')}, started {h.get('started')}: "
          f"{h.get('command')})")


def _refusal(directory, path, holder):
  if not holder:
    return (f"{directory} is locked by {path}, which names no writer; if no "
            "process writes there, remove that file")
  msg = (f"{directory} is in use by {_describe(holder)}; lock file {path}. "
         "Wait for it to finish, or use another directory")
  if holder.get("host") != socket.gethostname():
    msg += (f". If that process no longer runs on {holder.get('host')}, "
            f"remove {path}")
  return msg


def _take_over(path, stale, mine):
  """Replaces the stale lock by `mine` unless another taker was first."""
  try:
    f = open(path)
  except FileNotFoundError:
    return False
  with f:
    try:  # one taker at a time: they all open the stale file
      fcntl.flock(f, fcntl.LOCK_EX)
    except OSError:
      pass  # a filesystem without flock: the check below still narrows it
    if _read(path) != stale:
      return False
    tmp = f"{path}.{os.getpid()}"
    with open(tmp, "w") as t:
      t.write(mine)
    os.replace(tmp, path)
  return True


def acquire(directory, what, log=print):
  """Takes `directory`'s lock (making the directory) -> the lock's path;
  raises Locked when another live writer holds it."""
  directory = os.path.abspath(os.fspath(directory))
  path = os.path.join(directory, NAME)
  if path in _held:
    _held[path][0] += 1
    return path
  os.makedirs(directory, exist_ok=True)
  mine = json.dumps({
      "what": what, "host": socket.gethostname(), "pid": os.getpid(),
      "pid_start": pid_start(os.getpid()),
      "started": time.strftime("%Y-%m-%d %H:%M:%S %z"),
      "command": " ".join(sys.argv)})
  for _ in range(3):  # a holder may leave between our tries
    try:
      fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except FileExistsError:
      holder = _read(path)
      if holder is None:
        continue
      if not _stale(holder):
        raise Locked(_refusal(directory, path, holder)) from None
      if _take_over(path, holder, mine):
        log(f"took over the lock {path} of {_describe(holder)}: that "
            "process no longer runs")
        break
    else:
      with os.fdopen(fd, "w") as f:
        f.write(mine)
      break
  else:
    raise Locked(_refusal(directory, path, _read(path)))
  _held[path] = [1, mine]
  return path


def release(path):
  """Undoes one acquire; the last removes the file if it is still ours."""
  _held[path][0] -= 1
  if _held[path][0]:
    return
  _, mine = _held.pop(path)
  try:
    with open(path) as f:
      ours = f.read() == mine
  except FileNotFoundError:
    return
  if ours:
    os.remove(path)


@contextlib.contextmanager
def hold(directory, what, log=print):
  """`directory`'s lock for the block (see the module doc)."""
  path = acquire(directory, what, log)
  try:
    yield path
  finally:
    release(path)
