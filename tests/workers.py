"""Worker processes of a multi-process JAX test, on localhost."""
import os
import socket
import subprocess
import sys

from nearid_jax.cpu import xla_flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def run(script, nproc, *args, devices=2, timeout=300):
  """`python script PID NPROC PORT *args` for each PID, each process with
  `devices` CPU devices -> their outputs; every one must exit 0."""
  port = free_port()
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  xla_flags.add_defaults(env)  # the settings of the test process
  env["PYTHONPATH"] = REPO
  procs = [subprocess.Popen(
      [sys.executable, script, str(i), str(nproc), str(port),
       *map(str, args)], env=env, stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT, text=True) for i in range(nproc)]
  outs = [p.communicate(timeout=timeout)[0] for p in procs]
  for p, o in zip(procs, outs):
    assert p.returncode == 0, o[-3000:]
  return outs
