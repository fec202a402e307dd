"""The canonical parameter layout every checkpoint format converts through.

Canonical = big_vision's image-tower subtree (what sits under `params/img`),
flattened with "/" and with unrolled blocks (`Transformer/encoderblock_{i}`),
values float32 numpy arrays. Each format maps to and from this, so the Flax
modules and the checkpoint files never meet directly.
"""
import math
import re

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import scipy.ndimage

from nearid_jax import vit

BLOCK = "Transformer/encoderblock"
_BLOCK_RE = re.compile(r"^Transformer/encoderblock_(\d+)/")


class CheckpointError(ValueError):
  """A checkpoint that cannot be read: names the file and the key or shape."""


def flatten(tree, prefix=""):
  out = {}
  for k, v in tree.items():
    key = f"{prefix}{k}"
    if isinstance(v, dict):
      out.update(flatten(v, key + "/"))
    else:
      out[key] = v
  return out


def unflatten(flat):
  tree = {}
  for key, v in flat.items():
    *parents, leaf = key.split("/")
    node = tree
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = v
  return tree


def unscan(flat):
  """Scanned blocks (leading depth axis) -> encoderblock_{i} entries."""
  out = {}
  for key, v in flat.items():
    if key.startswith(BLOCK + "/"):
      rest = key[len(BLOCK) + 1:]
      for i in range(v.shape[0]):
        out[f"{BLOCK}_{i}/{rest}"] = v[i]
    else:
      out[key] = v
  return out


def scan(flat, depth):
  """encoderblock_{i} entries -> one stacked `encoderblock` subtree."""
  out, stacked = {}, {}
  for key, v in flat.items():
    m = _BLOCK_RE.match(key)
    if m:
      stacked.setdefault(key[m.end():], [None] * depth)[int(m.group(1))] = v
    else:
      out[key] = v
  for rest, vs in stacked.items():
    out[f"{BLOCK}/{rest}"] = np.stack(vs)
  return out


def depth_of(flat):
  """Number of unrolled blocks in a canonical tree."""
  return 1 + max((int(m.group(1)) for m in map(_BLOCK_RE.match, flat) if m),
                 default=-1)


def infer_arch(flat, source, image_size=None):
  """Recovers the tower's shape from tensor shapes.

  image_size: the resolution when known from elsewhere (a file name); shapes
  only give grid * patch, which is 378 for So400m/14@384.
  """
  need = ("embedding/kernel", "pos_embedding",
          f"{BLOCK}_0/MlpBlock_0/Dense_0/kernel")
  for k in need:
    if k not in flat:
      raise CheckpointError(f"{source}: missing tensor {k!r}; not a SigLIP "
                            "image tower")
  p, _, c, width = flat["embedding/kernel"].shape
  if c != 3:
    raise CheckpointError(f"{source}: embedding/kernel has shape "
                          f"{flat['embedding/kernel'].shape}, expected "
                          "(p, p, 3, D)")
  n = flat["pos_embedding"].shape[1]
  grid = math.isqrt(n)
  if grid * grid != n:
    raise CheckpointError(f"{source}: pos_embedding has {n} positions, not a "
                          "square grid")
  q = flat.get(f"{BLOCK}_0/MultiHeadDotProductAttention_0/query/kernel")
  if q is None or q.ndim != 3:
    raise CheckpointError(f"{source}: cannot read the number of heads from "
                          "MultiHeadDotProductAttention_0/query/kernel")
  if image_size is None or image_size // p != grid:
    image_size = grid * p
  mlp = flat[f"{BLOCK}_0/MlpBlock_0/Dense_0/kernel"].shape[1]
  return vit.Arch(int(width), depth_of(flat), int(mlp), int(q.shape[1]),
                  int(p), int(image_size))


def expected_shapes(arch, out_dim=None):
  """Canonical key -> shape, read off the Flax modules themselves."""
  images = jax.ShapeDtypeStruct((1, arch.image_size, arch.image_size, 3),
                                jnp.float32)
  tokens = jax.ShapeDtypeStruct((1, arch.num_patches, arch.width), jnp.float32)
  key = jax.random.PRNGKey(0)
  tower = jax.eval_shape(vit.VisionTower(arch).init, key, images)["params"]
  head = jax.eval_shape(vit.NearIDHead(arch, out_dim).init, key,
                        tokens)["params"]
  shapes = {k: v.shape for k, v in flatten(tower).items()}
  shapes.update({k: v.shape for k, v in flatten(head).items()})
  return shapes


def check(flat, arch, source, out_dim=None, allow_missing=()):
  """Every expected tensor present with its shape; errors name the key."""
  for key, shape in expected_shapes(arch, out_dim).items():
    if key not in flat:
      if key.startswith(allow_missing):
        continue
      raise CheckpointError(f"{source}: missing tensor {key!r} "
                            f"(expected shape {shape})")
    if tuple(flat[key].shape) != tuple(shape):
      raise CheckpointError(f"{source}: tensor {key!r} has shape "
                            f"{tuple(flat[key].shape)}, expected {shape}")


def resample_posemb(posemb, new_grid):
  """(1, N, D) on a sqrt(N) grid -> (1, new_grid**2, D), linear zoom."""
  _, n, d = posemb.shape
  old = math.isqrt(n)
  if old == new_grid:
    return posemb
  grid = posemb.reshape(old, old, d)
  zoom = (new_grid / old, new_grid / old, 1)
  grid = scipy.ndimage.zoom(grid, zoom, order=1)
  return grid.reshape(1, new_grid * new_grid, d).astype(posemb.dtype)


def to_float32(x):
  """bf16 saved by np.savez comes back as raw 2-byte void: view it back."""
  x = np.asarray(x)
  if x.dtype.kind == "V" and x.dtype.itemsize == 2:
    x = x.view(ml_dtypes.bfloat16)
  return x.astype(np.float32)
