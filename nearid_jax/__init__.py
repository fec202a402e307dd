"""nearid_jax: NearID identity embeddings (SigLIP2 + MAP head) in JAX/Flax.

Importing it changes nothing in the process (no XLA_FLAGS): the XLA:CPU
settings are one explicit call, nearid_jax.cpu.xla_flags.add_defaults().
"""
from nearid_jax.formats import CheckpointError
from nearid_jax.model import NearID

__all__ = ["NearID", "CheckpointError"]
