"""nearid_jax: NearID identity embeddings (SigLIP2 + MAP head) in JAX/Flax."""
from nearid_jax.formats import CheckpointError
from nearid_jax.model import NearID

__all__ = ["NearID", "CheckpointError"]
