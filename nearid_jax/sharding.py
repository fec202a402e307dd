"""One device mesh from the config, and the shardings of params and batches.

`config.mesh` lists (axis name, size) pairs; one size may be -1 ("the rest").
Two axes, both splitting the batch: "data" (required) and "fsdp" (optional).
Over "fsdp" the frozen tower's weights are also split, and each layer's
weights are all-gathered where that layer runs (FSDP): the batch stays split
over every device, so no activation is ever reduced across devices. The
trainable head is small and replicated.
"""
import math

import jax
import numpy as np
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

DATA = "data"
FSDP = "fsdp"
AXES = (DATA, FSDP)
# The name of the scanned layer stack (vit.Transformer): its leaves carry a
# leading depth axis, which is never split (each step of the scan reads one
# layer, so a split there would gather the whole stack at once).
SCANNED = "encoderblock"


def mesh_shape(spec, n_devices):
  """[(name, size), ...] with at most one -1 -> dict name: size; validated."""
  spec = [(str(name), int(size)) for name, size in spec]
  names = [n for n, _ in spec]
  if len(set(names)) != len(names) or DATA not in names:
    raise ValueError(f"config.mesh={spec}: needs distinct axis names and a "
                     f"{DATA!r} axis")
  unknown = [n for n in names if n not in AXES]
  if unknown:
    raise ValueError(f"config.mesh={spec}: unknown axes {unknown}; the axes "
                     f"are {DATA!r} and optionally {FSDP!r}")
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


def batch_axes(mesh):
  """The mesh axes the batch is split over, in mesh order."""
  return tuple(a for a in mesh.axis_names if a in AXES)


def batch_shards(mesh):
  """How many ways the batch is split: every batch must divide by this."""
  return math.prod(mesh.shape[a] for a in batch_axes(mesh))


def batch_spec(mesh):
  return P(batch_axes(mesh))


def check_batch(mesh, global_batch):
  """Refuses, before any compute, a batch the batch axes cannot split."""
  n = batch_shards(mesh)
  if global_batch % n:
    raise ValueError(f"input.batch_size={global_batch} is not divisible by "
                     f"the {n}-way batch split (mesh axes "
                     f"{batch_axes(mesh)})")
  if global_batch % jax.process_count():
    raise ValueError(f"input.batch_size={global_batch} is not divisible by "
                     f"the {jax.process_count()} processes")


def batch_sharding(mesh):
  return NamedSharding(mesh, batch_spec(mesh))


def replicated(mesh):
  return NamedSharding(mesh, P())


def weight_shardings(mesh, params):
  """Frozen weights: each leaf split over "fsdp" on its largest axis that
  "fsdp" divides (never a scanned stack's depth axis); replicated without
  an "fsdp" axis."""
  size = mesh.shape.get(FSDP, 1)

  def spec(path, x):
    scanned = any(getattr(k, "key", None) == SCANNED for k in path)
    dims = [d for d in range(int(scanned), x.ndim)
            if x.shape[d] % size == 0]
    if size == 1 or not dims:
      return replicated(mesh)
    parts = [None] * x.ndim
    parts[max(dims, key=lambda d: x.shape[d])] = FSDP
    return NamedSharding(mesh, P(*parts))
  return jax.tree_util.tree_map_with_path(spec, params)


def fsdp_tower(tower, mesh):
  """The tower as it runs on `mesh`: with an "fsdp" axis, each block's
  weights (split by weight_shardings) are all-gathered where the block runs,
  so the batch stays split over every device and no activation is reduced
  across devices. Without one (or mesh None), the tower unchanged."""
  if mesh is None or mesh.shape.get(FSDP, 1) == 1:
    return tower
  whole = replicated(mesh)

  def gather(params):
    return jax.tree.map(
        lambda w: jax.lax.with_sharding_constraint(w, whole), params)
  return tower.clone(layer_params=gather)


def global_batch(local, mesh):
  """This process's share of the batch -> global arrays split over the
  batch axes."""
  sharding = batch_sharding(mesh)
  if jax.process_count() == 1:
    # The local batch is the global one: one transfer for the whole tree,
    # cheaper than one per key.
    return jax.device_put(local, sharding)
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, x), local)
