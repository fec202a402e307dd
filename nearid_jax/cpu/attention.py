"""The tower's attention and the MAP head's pooling in the forms XLA:CPU runs
fastest (CPU_KERNELS; nearid_jax/kernels.py picks them on the CPU).

Each function computes what its plain twin in vit.py computes (tests/
test_cpu_kernels.py checks forward and gradients in float64); only the
layouts, the exp and the pooling's backward differ. Measurements are in
docs/benchmarks.md.
"""
import math

import jax
import jax.numpy as jnp

from nearid_jax import vit
from nearid_jax.cpu import fast_exp

def attention(query, key, value, dtype=None, **unused):
  """nn.dot_product_attention (no mask) with keys-major logits (B, H, Nk, Nq).

  The softmax then reduces over a non-minor axis (vectorised across
  queries, not along a row of Nk) and is normalised after the value
  matmul, one pass over the weights fewer; its exp is fast_exp's.
  """
  del unused
  q = query * (1 / math.sqrt(query.shape[-1]))  # a weak scalar: q's dtype
  s = jnp.einsum("bkhd,bqhd->bhkq", key, q)
  e = fast_exp.softmax_exp(
      s - jax.lax.stop_gradient(jnp.max(s, axis=-2, keepdims=True)))
  o = jnp.einsum("bhkq,bkhd->bqhd", e.astype(dtype or q.dtype), value)
  # (B, H, Nq), summed in float32 at least
  norm = jnp.sum(e, axis=-2, dtype=jnp.promote_types(e.dtype, jnp.float32))
  return o / jnp.swapaxes(norm, -1, -2)[..., None].astype(o.dtype)


@jax.custom_vjp
def attention_pool(x, u):
  """vit.attention_pool: (B, N, D), (H, D) -> (B, H, D).

  The logits are (B*N, D) x (D, H), reading the tokens as they lie, and the
  softmax writes the weights (B, H, N), so that the pooling is a plain
  batched matmul. The backward is written out because autodiff's
  transposes of these einsums run as (D, B*N) x (B*N, H) products, the
  layouts XLA:CPU is slowest at.
  """
  return _attention_pool_fwd(x, u)[0]


def _attention_pool_fwd(x, u):
  w = jax.nn.softmax(jnp.swapaxes(jnp.einsum("bnd,hd->bnh", x, u), 1, 2), -1)
  return jnp.einsum("bhn,bnd->bhd", w, x), (x, u, jnp.swapaxes(w, 1, 2))


def _attention_pool_bwd(res, g):
  x, u, w = res  # w: (B, N, H)
  gw = jnp.einsum("bnd,bhd->bnh", x, g)
  gs = w * (gw - jnp.sum(w * gw, axis=1, keepdims=True))  # softmax's vjp
  # Nothing downstream needs gx when the tokens are frozen: XLA drops it.
  gx = jnp.einsum("bnh,hd->bnd", gs, u) + jnp.einsum("bnh,bhd->bnd", w, g)
  return gx, jnp.einsum("bnh,bnd->hd", gs, x)


attention_pool.defvjp(_attention_pool_fwd, _attention_pool_bwd)

CPU_KERNELS = vit.Kernels(attention=attention, pool=attention_pool)

