"""float32 exp written as multiply-adds, for the tower's softmax on XLA:CPU.

jaxlib's XLA:CPU computes jnp.exp at a fraction of the vector units' rate
(docs/benchmarks.md). This one's relative error is at most 1.2e-7 over its
range (XLA's: 8.2e-8), so it takes jnp.exp's place wherever a float32 exp
feeds a sum, as in a softmax.

exp(x) = 2^n exp(r) with n = round(x / ln 2) and |r| <= ln(2) / 2: r comes
from a two-part ln 2 (Cody and Waite) so that n * ln 2 loses no bits, exp(r)
from a degree-6 polynomial, and 2^n by writing n into a float's exponent.
"""
import jax
import jax.numpy as jnp

_LOG2E = 1.4426950408889634
# ln 2 = _LN2_HI + _LN2_LO; _LN2_HI = 22713 / 2^15 has 15 significant bits,
# so n * _LN2_HI is exact in float32 for every |n| < 2^9.
_LN2_HI = 0.693145751953125
_LN2_LO = 1.4286068202862268e-06
# Least-squares fit of exp on [-ln(2)/2, ln(2)/2] (numpy.polyfit, degree 6),
# highest power first; the fit's own error is 6e-9, far below float32's.
_COEFFS = (0.0013944596, 0.008371909, 0.04166628, 0.16666456, 0.5, 1.0, 1.0)
# 2^n must stay a normal float: n in [-126, 127].
_MIN_X, _MAX_X = -87.33, 88.37


@jax.custom_jvp
def exp(x):
  """e^x for float32 x; x outside [-87.33, 88.37] is clamped to it.

  So exp(-inf) is 1.2e-38, not 0, and exp(89) is 2.4e38, not inf: use it
  where the arguments are bounded, as after a softmax's max subtraction.
  """
  x = jnp.clip(x, _MIN_X, _MAX_X)
  n = jnp.round(x * _LOG2E)
  r = x - n * _LN2_HI - n * _LN2_LO
  p = jnp.float32(_COEFFS[0])
  for c in _COEFFS[1:]:
    p = p * r + jnp.float32(c)
  two_n = jax.lax.bitcast_convert_type(
      jax.lax.shift_left(n.astype(jnp.int32) + 127, 23), jnp.float32)
  return p * two_n


@exp.defjvp
def _exp_jvp(primals, tangents):
  y = exp(primals[0])
  return y, y * tangents[0]


def softmax_exp(x):
  """exp for softmax logits: this module's for float32, jnp.exp for bf16
  (which has no use for the extra precision work)."""
  return exp(x) if x.dtype == jnp.float32 else jnp.exp(x)
