"""Counter-based random draws: a pure function of their key, vectorised.

The training stream's randomness (the per-epoch order of the entries and
each group's view permutation and distractor sources) must not depend on
sharding, worker count or batch position, and must cost little per group:
a numpy Generator per group (SeedSequence + PCG64) costs more than a small
head's whole train step per cached group. So each draw is a hash of its key,
computed for a whole batch at once: SplitMix64's finaliser (a bijection of
uint64 with full avalanche) applied field by field.
"""
import numpy as np

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_S27, _S30, _S31 = np.uint64(27), np.uint64(30), np.uint64(31)
# Streams: distinct leading key fields for unrelated uses of one seed.
ORDER, GROUP = 0x6F72646572, 0x67726F7570  # "order", "group"


def _mix(x):
  # On arrays numpy's uint64 arithmetic wraps silently (0-d ones would warn):
  # every draw here is at least 1-d.
  x = (x ^ (x >> _S30)) * _M1
  x = (x ^ (x >> _S27)) * _M2
  return x ^ (x >> _S31)


def key(*fields):
  """uint64 hash of integer fields (scalars or arrays, broadcast together).

  At least 1-d: a key of scalar fields has shape (1,).
  """
  h = np.zeros(1, np.uint64)
  for f in fields:
    # int64 -> uint64 keeps the bits (negative seeds are distinct too).
    f = np.atleast_1d(np.asarray(f, np.int64)).view(np.uint64)
    h = _mix((h + _GOLDEN) ^ f)
  return h


def bits(k, n):
  """n independent uint64 draws per key: (...,) -> (..., n)."""
  return _mix(k[..., None] + _GOLDEN * np.arange(1, n + 1, dtype=np.uint64))


def below(b, m):
  """Integers in [0, m) from uint64 draws: floor(U * m), U the top 53 bits.

  Exact integer arithmetic (m < 2^11); bias below 2^-42.
  """
  return ((b >> np.uint64(11)) * np.uint64(m) >> np.uint64(53)).astype(
      np.int64)


def permutation(n, *fields):
  """A permutation of range(n) keyed by fields (e.g. seed, epoch)."""
  return np.argsort(bits(key(ORDER, *fields), n)[0], kind="stable")
