"""The tower's attention layout and the folded MAP head against flax's own.

The reference is flax's nn.MultiHeadDotProductAttention with its default
nn.dot_product_attention: the textbook formulation, projecting every token.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nearid_jax import vit


class _ReferenceMAPHead(nn.Module):
  """big_vision's MAP head written with flax's attention, as SPEC §2."""
  mlp_dim: int
  num_heads: int

  @nn.compact
  def __call__(self, x):
    probe = self.param("probe", nn.initializers.xavier_uniform(),
                       (1, 1, x.shape[-1]), jnp.float32)
    x = nn.MultiHeadDotProductAttention(
        num_heads=self.num_heads,
        kernel_init=nn.initializers.xavier_uniform(),
        name="MultiHeadDotProductAttention_0")(
            jnp.tile(probe, [x.shape[0], 1, 1]), x)
    y = nn.LayerNorm(name="LayerNorm_0")(x)
    return (x + vit.MlpBlock(self.mlp_dim, name="MlpBlock_0")(y))[:, 0]


def _perturbed(params, seed):
  """Non-zero biases and non-unit LN scales: nothing cancels by accident."""
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
  return jax.tree.unflatten(tree, [
      x + 0.3 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])


@pytest.mark.parametrize("width,heads,tokens", [(64, 4, 36), (48, 3, 17)])
def test_folded_map_head_equals_flax_attention_pooling(width, heads, tokens):
  x = jnp.asarray(np.random.default_rng(0).standard_normal(
      (5, tokens, width), np.float32))
  ours, ref = vit.MAPHead(4 * width, heads), _ReferenceMAPHead(4 * width,
                                                               heads)
  key = jax.random.PRNGKey(7)
  init = ours.init(key, x)["params"]
  # Same parameter tree and, from the same key, the same initial values:
  # checkpoints and random towers are unchanged by the fold.
  want_init = ref.init(key, x)["params"]
  assert jax.tree.structure(init) == jax.tree.structure(want_init)
  jax.tree.map(np.testing.assert_array_equal, init, want_init)

  params = _perturbed(init, 1)
  out = ours.apply({"params": params}, x)
  assert out.shape == (5, width)
  want = ref.apply({"params": params}, x)
  # float32 rounding at the outputs' scale (|out| reaches ~30 here); the
  # float64 check below is the tight one.
  np.testing.assert_allclose(out, want, atol=1e-6 * np.abs(want).max(),
                             rtol=1e-5)

  # The fold is exact algebra: in float64 outputs and the gradients of a
  # loss mixing them agree to rounding, for every parameter.
  with jax.enable_x64(True):
    p64, x64 = jax.tree.map(lambda a: np.asarray(a, np.float64), (params, x))
    w = np.random.default_rng(2).standard_normal(out.shape)
    loss = lambda m: lambda p: jnp.sum(jnp.tanh(m.apply({"params": p}, x64))
                                       * w)
    np.testing.assert_allclose(ours.apply({"params": p64}, x64),
                               ref.apply({"params": p64}, x64), atol=1e-10)
    g, g_want = jax.grad(loss(ours))(p64), jax.grad(loss(ref))(p64)
    assert jax.tree.leaves(g)[0].dtype == np.float64
    # The tokens' gradient too (the pooling's backward is hand-written; tower
    # pretraining differentiates through it).
    loss_x = lambda m: lambda x: jnp.sum(jnp.tanh(m.apply({"params": p64}, x))
                                         * w)
    gx, gx_want = jax.grad(loss_x(ours))(x64), jax.grad(loss_x(ref))(x64)
    assert np.abs(gx_want).max() > 1e-3
    np.testing.assert_allclose(gx, gx_want, atol=1e-10 * np.abs(gx_want).max(),
                               rtol=1e-9)
  for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(g)[0],
                          jax.tree.leaves(g_want)):
    name = jax.tree_util.keystr(path)
    if "'key']['bias'" in name:
      # Softmax-invariant: exactly zero for us, rounding noise for flax.
      np.testing.assert_array_equal(a, 0)
      assert np.abs(b).max() < 1e-9 * np.abs(g_want["probe"]).max()
      continue
    assert np.abs(b).max() > 1e-3, name  # every other leaf is exercised
    np.testing.assert_allclose(a, b, atol=1e-10 * np.abs(b).max(),
                               rtol=1e-9, err_msg=name)


@pytest.mark.parametrize("dtype,atol", [(jnp.float32, 1e-5),
                                        (jnp.bfloat16, 3e-2)])
def test_tower_attention_equals_dot_product_attention(dtype, atol):
  rng = np.random.default_rng(3)
  q, k, v = (jnp.asarray(rng.standard_normal((3, 11, 4, 8), np.float32),
                         dtype) for _ in range(3))
  out = vit._attention(q, k, v, dtype=dtype)  # pylint: disable=protected-access
  want = nn.dot_product_attention(q.astype(jnp.float32), k.astype(jnp.float32),
                                  v.astype(jnp.float32))
  assert out.dtype == dtype and out.shape == want.shape
  np.testing.assert_allclose(np.asarray(out, np.float32), want, atol=atol)
  # and its gradient (the scan/remat tests differentiate through the tower)
  f = lambda fn: lambda q, k, v: jnp.sum(jnp.sin(fn(q, k, v)))
  a32 = [x.astype(jnp.float32) for x in (q, k, v)]
  g = jax.grad(f(vit._attention), (0, 1, 2))(*a32)  # pylint: disable=protected-access
  g_want = jax.grad(f(nn.dot_product_attention), (0, 1, 2))(*a32)
  for a, b in zip(g, g_want):
    np.testing.assert_allclose(a, b, atol=1e-5)
