"""nearid_jax: NearID identity embeddings (SigLIP2 + MAP head) in JAX/Flax."""
# Before anything compiles: XLA reads XLA_FLAGS once (see xla_flags.py).
from nearid_jax import xla_flags

xla_flags.add_defaults()

# pylint: disable=g-import-not-at-top,wrong-import-position
from nearid_jax.formats import CheckpointError
from nearid_jax.model import NearID

__all__ = ["NearID", "CheckpointError"]
