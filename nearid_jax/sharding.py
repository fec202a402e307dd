"""One device mesh from the config, and the shardings of params and batches.

`config.mesh` lists (axis name, size) pairs; one size may be -1 ("the rest").
The batch is split over "data"; the frozen tower's weights may be split over
"model" (or "fsdp"), the trainable head is small and replicated.
"""
import math

import jax
import numpy as np
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

DATA = "data"
WEIGHT_AXES = ("model", "fsdp")


def mesh_shape(spec, n_devices):
  """[(name, size), ...] with at most one -1 -> dict name: size; validated."""
  spec = [(str(name), int(size)) for name, size in spec]
  names = [n for n, _ in spec]
  if len(set(names)) != len(names) or DATA not in names:
    raise ValueError(f"config.mesh={spec}: needs distinct axis names and a "
                     f"{DATA!r} axis")
  unknown = [n for n in names if n != DATA and n not in WEIGHT_AXES]
  if unknown:
    raise ValueError(f"config.mesh={spec}: unknown axes {unknown}; use "
                     f"{DATA!r} and optionally one of {WEIGHT_AXES}")
  free = [n for n, s in spec if s == -1]
  fixed = math.prod(s for _, s in spec if s != -1)
  if len(free) > 1 or any(s == 0 or s < -1 for _, s in spec):
    raise ValueError(f"config.mesh={spec}: sizes must be positive, with at "
                     "most one -1")
  if n_devices % fixed or (not free and fixed != n_devices):
    raise ValueError(f"config.mesh={spec} does not divide the {n_devices} "
                     "devices")
  return {n: (n_devices // fixed if s == -1 else s) for n, s in spec}


def make_mesh(spec, devices=None):
  devices = jax.devices() if devices is None else devices
  shape = mesh_shape(spec, len(devices))
  grid = np.asarray(devices).reshape(tuple(shape.values()))
  return Mesh(grid, tuple(shape))


def check_batch(mesh, global_batch):
  """Refuses, before any compute, a batch the data axis cannot split."""
  n_data = mesh.shape[DATA]
  if global_batch % n_data:
    raise ValueError(f"input.batch_size={global_batch} is not divisible by "
                     f"the {n_data}-way {DATA!r} mesh axis")
  if global_batch % jax.process_count():
    raise ValueError(f"input.batch_size={global_batch} is not divisible by "
                     f"the {jax.process_count()} processes")


def batch_sharding(mesh):
  return NamedSharding(mesh, P(DATA))


def replicated(mesh):
  return NamedSharding(mesh, P())


def weight_shardings(mesh, params):
  """Frozen weights: each leaf split on its largest axis the weight axis divides."""
  axis = next((a for a in WEIGHT_AXES if a in mesh.shape), None)
  size = mesh.shape[axis] if axis else 1

  def spec(x):
    if size == 1:
      return replicated(mesh)
    dims = sorted(range(x.ndim), key=lambda d: -x.shape[d])
    d = next((d for d in dims if x.shape[d] % size == 0), None)
    if d is None:
      return replicated(mesh)
    parts = [None] * x.ndim
    parts[d] = axis
    return NamedSharding(mesh, P(*parts))
  return jax.tree.map(spec, params)


def global_batch(local, mesh):
  """This process's share of the batch -> global arrays sharded over data."""
  sharding = batch_sharding(mesh)
  if jax.process_count() == 1:
    # The local batch is the global one: one transfer for the whole tree,
    # cheaper than one per key.
    return jax.device_put(local, sharding)
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, x), local)
