"""Randomly initialised towers in canonical layout: tests, demos, benchmarks."""
import jax
import jax.numpy as jnp
import numpy as np

from nearid_jax import vit
from nearid_jax.formats import common


def random_tower(arch, seed=0):
  """Canonical flat float32 dict of a freshly initialised tower + MAP head."""
  k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
  images = jnp.zeros((1, arch.image_size, arch.image_size, 3))
  tokens = jnp.zeros((1, arch.num_patches, arch.width))
  tower = jax.jit(vit.VisionTower(arch).init)(k1, images)["params"]
  head = jax.jit(vit.NearIDHead(arch).init)(k2, tokens)["params"]
  flat = {**common.flatten(tower), **common.flatten(head)}
  return {k: np.asarray(v, np.float32) for k, v in flat.items()}
