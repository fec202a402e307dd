"""The CPU's attention forms and the folded MAP head against the plain math.

The reference is flax's nn.MultiHeadDotProductAttention with its default
nn.dot_product_attention: the textbook formulation, projecting every token.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nearid_jax import kernels as kernels_lib
from nearid_jax import model as model_lib
from nearid_jax import vit
from nearid_jax.cpu import attention as cpu_attention


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


# Each kernel set on one shape: that the two sets agree on any shape is
# test_cpu_kernels_equal_plain_in_float64's.
@pytest.mark.slow  # float64 gradients of two heads
@pytest.mark.parametrize("kernels,width,heads,tokens",
                         [("plain", 64, 4, 36), ("cpu", 48, 3, 17)])
def test_folded_map_head_equals_flax_attention_pooling(kernels, width, heads,
                                                       tokens):
  x = jnp.asarray(np.random.default_rng(0).standard_normal(
      (5, tokens, width), np.float32))
  ours = vit.MAPHead(4 * width, heads, kernels_lib.kernels(kernels))
  ref = _ReferenceMAPHead(4 * width, heads)
  key = jax.random.PRNGKey(7)
  # Every call jitted: op by op, the float64 gradients take half a minute.
  init = jax.jit(ours.init)(key, x)["params"]
  # Same parameter tree and, from the same key, the same initial values:
  # checkpoints and random towers are unchanged by the fold.
  want_init = jax.jit(ref.init)(key, x)["params"]
  assert jax.tree.structure(init) == jax.tree.structure(want_init)
  jax.tree.map(np.testing.assert_array_equal, init, want_init)

  params = _perturbed(init, 1)
  out = jax.jit(ours.apply)({"params": params}, x)
  assert out.shape == (5, width)
  want = jax.jit(ref.apply)({"params": params}, x)
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
    np.testing.assert_allclose(jax.jit(ours.apply)({"params": p64}, x64),
                               jax.jit(ref.apply)({"params": p64}, x64),
                               atol=1e-10)
    grad = lambda f: jax.jit(jax.grad(f))
    g, g_want = grad(loss(ours))(p64), grad(loss(ref))(p64)
    assert jax.tree.leaves(g)[0].dtype == np.float64
    # The tokens' gradient too (the pooling's backward is hand-written; tower
    # pretraining differentiates through it).
    loss_x = lambda m: lambda x: jnp.sum(jnp.tanh(m.apply({"params": p64}, x))
                                         * w)
    gx, gx_want = grad(loss_x(ours))(x64), grad(loss_x(ref))(x64)
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


def _rand(shape, seed):
  return np.random.default_rng(seed).standard_normal(shape)


@pytest.mark.parametrize("dtype,atol", [(jnp.float32, 1e-5),
                                        (jnp.bfloat16, 3e-2)])
def test_cpu_attention_equals_plain(dtype, atol):
  q, k, v = (jnp.asarray(_rand((3, 11, 4, 8), s), dtype) for s in range(3))
  out = cpu_attention.attention(q, k, v, dtype=dtype)
  want = nn.dot_product_attention(*(x.astype(jnp.float32) for x in (q, k, v)))
  assert out.dtype == dtype and out.shape == want.shape
  np.testing.assert_allclose(np.asarray(out, np.float32), want, atol=atol)


def test_cpu_kernels_equal_plain_in_float64():
  """Forward and gradients of both CPU forms against the plain ones (flax's
  attention, vit.attention_pool): the same function, only layouts and exp
  differ (fast_exp leaves float64 to jnp.exp, so this checks the algebra
  exactly)."""
  with jax.enable_x64(True):
    qkv = [jnp.asarray(_rand((3, 11, 4, 8), s)) for s in range(3)]
    w = jnp.asarray(_rand((3, 11, 4, 8), 4))
    f = lambda fn: lambda q, k, v: jnp.sum(jnp.sin(fn(q, k, v)) * w)
    assert vit.Kernels().attention is nn.dot_product_attention
    np.testing.assert_allclose(cpu_attention.attention(*qkv),
                               nn.dot_product_attention(*qkv), atol=1e-12)
    g = jax.grad(f(cpu_attention.attention), (0, 1, 2))(*qkv)
    g_want = jax.grad(f(nn.dot_product_attention), (0, 1, 2))(*qkv)
    for a, b in zip(g, g_want):
      assert a.dtype == np.float64 and np.abs(b).max() > 1e-3
      np.testing.assert_allclose(a, b, atol=1e-12)

    x, u = jnp.asarray(_rand((5, 17, 12), 5)), jnp.asarray(_rand((3, 12), 6))
    wp = jnp.asarray(_rand((5, 3, 12), 7))
    f = lambda fn: lambda x, u: jnp.sum(jnp.tanh(fn(x, u)) * wp)
    np.testing.assert_allclose(cpu_attention.attention_pool(x, u),
                               vit.attention_pool(x, u), atol=1e-12)
    g = jax.grad(f(cpu_attention.attention_pool), (0, 1))(x, u)
    g_want = jax.grad(f(vit.attention_pool), (0, 1))(x, u)
    for a, b in zip(g, g_want):
      assert a.dtype == np.float64 and np.abs(b).max() > 1e-3
      np.testing.assert_allclose(a, b, atol=1e-12 * np.abs(b).max())


def test_model_and_config_pick_the_kernels():
  arch = vit.Arch.from_variant("mu/8@16")
  params = model_lib.split_params(model_lib.random_tower(arch), arch, False)
  images = np.random.default_rng(0).integers(0, 256, (3, 16, 16, 3), np.uint8)
  out = {}
  for k in ("plain", "cpu", "gpu"):
    m = model_lib.NearID(arch, params, kernels=k)
    assert m.tower.kernels == m.head.kernels == kernels_lib.kernels(k)
    out[k] = m.embed(images)
  # float32 rounding of unit vectors: the forms sum in other orders (the
  # "gpu" one runs XLA's jax.nn.dot_product_attention off a GPU).
  np.testing.assert_allclose(out["cpu"], out["plain"], atol=1e-5)
  np.testing.assert_allclose(out["gpu"], out["plain"], atol=1e-5)


def test_cpu_attention_takes_our_exp():
  q, k, v = (jnp.asarray(_rand((2, 9, 2, 8), s), jnp.float32)
             for s in range(3))
  text = jax.jit(cpu_attention.attention).lower(q, k, v).as_text()
  assert "bitcast_convert" in text and "exponential" not in text
  # and the plain form keeps XLA's exp
  text = jax.jit(nn.dot_product_attention).lower(q, k, v).as_text()
  assert "exponential" in text
