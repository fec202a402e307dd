"""fast_exp.exp against float64 numpy, and which dtypes take it."""
import jax
import jax.numpy as jnp
import numpy as np

from nearid_jax.cpu import fast_exp


def test_exp_is_as_accurate_as_xlas_over_its_range():
  x = np.linspace(-87.33, 88.37, 2_000_003, dtype=np.float32)
  want = np.exp(x.astype(np.float64))
  ours = np.asarray(jax.jit(fast_exp.exp)(x), np.float64)
  xla = np.asarray(jax.jit(jnp.exp)(x), np.float64)
  rel = np.abs(ours - want) / want
  assert rel.max() < 2e-7, rel.max()
  # no worse than XLA's own by more than a float32 rounding step
  assert rel.max() < np.max(np.abs(xla - want) / want) + 6e-8
  assert float(fast_exp.exp(jnp.float32(0))) == 1.0


def test_exp_clamps_outside_its_range_and_keeps_nan():
  x = jnp.array([-np.inf, -1e4, -87.33, 88.37, 1e4, np.inf, np.nan],
                jnp.float32)
  y = np.asarray(fast_exp.exp(x))
  low, high = np.exp(np.float32([-87.33, 88.37]).astype(np.float64))
  np.testing.assert_allclose(y[:3], low, rtol=2e-7)
  np.testing.assert_allclose(y[3:6], high, rtol=2e-7)
  assert np.isfinite(y[:6]).all() and np.isnan(y[6])


def test_exp_gradient_is_its_value():
  x = jnp.linspace(-30.0, 30.0, 1001)
  g = jax.vmap(jax.grad(fast_exp.exp))(x)
  np.testing.assert_array_equal(g, fast_exp.exp(x))
  # second order too (the jvp rule is recursive)
  g2 = jax.vmap(jax.grad(jax.grad(fast_exp.exp)))(x)
  np.testing.assert_array_equal(g2, fast_exp.exp(x))


def test_softmax_exp_is_ours_for_float32_only():
  x = jnp.linspace(-20.0, 0.0, 777)
  # Ours and XLA's differ somewhere on this grid: the choice is observable.
  assert not np.array_equal(fast_exp.exp(x), jnp.exp(x))
  np.testing.assert_array_equal(fast_exp.softmax_exp(x), fast_exp.exp(x))
  xb = x.astype(jnp.bfloat16)
  assert fast_exp.softmax_exp(xb).dtype == jnp.bfloat16
  np.testing.assert_array_equal(fast_exp.softmax_exp(xb), jnp.exp(xb))
