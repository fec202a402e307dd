"""One process of a multi-process CPU run (tests/test_multihost.py starts it).

usage: multihost_worker.py PROCESS_ID NUM_PROCESSES PORT DEVICES_PER_PROCESS OUT
Trains 3 steps of the tiny config on all processes' devices and, on process
0, writes the head parameters to OUT (.npz).
"""
import os
import sys

pid, nproc, port, ndev, out = sys.argv[1:6]
os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={ndev}"
sys.path[:0] = [os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                os.path.dirname(os.path.abspath(__file__))]

import jax  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top

if int(nproc) > 1:
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(f"localhost:{port}", int(nproc), int(pid))

from fake_data import FakeGroups  # pylint: disable=g-import-not-at-top
from nearid_jax import sharding  # pylint: disable=g-import-not-at-top
from nearid_jax import train  # pylint: disable=g-import-not-at-top
from nearid_jax.formats import common  # pylint: disable=g-import-not-at-top
from test_train import tiny_config  # pylint: disable=g-import-not-at-top

config = tiny_config()
mesh = sharding.make_mesh(config.mesh)
_, frozen, state, step = train.setup(config, mesh)
data = FakeGroups(config.input.batch_size, config.model.res,
                  process_index=jax.process_index(),
                  process_count=jax.process_count())
for _ in range(3):
  state, _ = step(frozen, state, sharding.global_batch(next(data), mesh))
params = jax.device_get(state.params)  # replicated: every process has it all
if jax.process_index() == 0:
  np.savez(out, **common.flatten(params))
print(f"process {jax.process_index()}/{jax.process_count()}: "
      f"{len(jax.devices())} devices, done", flush=True)
