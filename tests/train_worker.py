"""One training process for the multi-process and preemption tests.

usage: train_worker.py OUT PROCESS_ID NUM_PROCESSES PORT DEVICES [KEY=VALUE...]
  mode=steps        3 train steps of the tiny config by hand (test_multihost)
  mode=train        train_and_evaluate into workdir=DIR (test_reliability)
  total_steps=N ckpt_every=N delay=SECONDS (per batch, so that a signal can
  be sent at a known step)
  launch=1          the signal handlers from the start, as launch.py has them
  eval_every=N eval_delay=SECONDS  an evaluation that prints "evaluating
  step N" and takes SECONDS
Writes the final head parameters to OUT (.npz) on process 0. A preemption
stops with exit status 0 and "preempted at step N" on every process, as
launch.py does; a notice outside the loop with "stopped by SIGTERM" (or
SIGINT).
"""
import os
import sys
import time

out, pid, nproc, port, ndev = sys.argv[1:6]
opts = dict(a.split("=", 1) for a in sys.argv[6:])
os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={ndev}"
sys.path[:0] = [os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                os.path.dirname(os.path.abspath(__file__))]

from nearid_jax.cpu import xla_flags  # pylint: disable=g-import-not-at-top

xla_flags.add_defaults()  # as launch.py: before JAX starts its backend

import jax  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top

from nearid_jax import signals  # pylint: disable=g-import-not-at-top

if opts.get("launch"):
  signals.install()

if int(nproc) > 1:
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(f"localhost:{port}", int(nproc), int(pid))

from fake_data import FakeGroups  # pylint: disable=g-import-not-at-top
from nearid_jax import sharding  # pylint: disable=g-import-not-at-top
from nearid_jax.training import train  # pylint: disable=g-import-not-at-top
from nearid_jax.formats import common  # pylint: disable=g-import-not-at-top
from nearid_jax.training.preemption import Preempted  # pylint: disable=g-import-not-at-top
from test_train import tiny_config  # pylint: disable=g-import-not-at-top


class SlowGroups(FakeGroups):

  def __next__(self):
    time.sleep(float(opts.get("delay", 0)))
    return super().__next__()


def evaluate(model, step):
  del model
  print(f"evaluating step {step}", flush=True)
  time.sleep(float(opts.get("eval_delay", 0)))
  return {"eval/step": step}


config = tiny_config()
for key in ("total_steps", "ckpt_every", "eval_every"):
  if key in opts:
    config[key] = int(opts[key])
data = SlowGroups(config.input.batch_size, config.model.res,
                  process_index=jax.process_index(),
                  process_count=jax.process_count())
if opts.get("mode", "steps") == "steps":
  mesh = sharding.make_mesh(config.mesh)
  _, frozen, state, step = train.setup(config, mesh)
  for _ in range(3):
    state, _ = step(frozen, state, sharding.global_batch(next(data), mesh))
else:
  try:
    state, _ = train.train_and_evaluate(config, opts["workdir"], data,
                                        evaluate=evaluate)
  except Preempted as e:
    print(f"process {jax.process_index()}: preempted at step {e.step}",
          flush=True)
    sys.exit(0)
  except signals.Interrupted as e:
    print(f"process {jax.process_index()}: {e}", flush=True)
    sys.exit(0)
params = jax.device_get(state.params)  # replicated: every process has it all
if jax.process_index() == 0:
  np.savez(out, **common.flatten(params))
print(f"process {jax.process_index()}/{jax.process_count()}: "
      f"{len(jax.devices())} devices, done", flush=True)
