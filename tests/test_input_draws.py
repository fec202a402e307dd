"""Counter-based draws: SplitMix64 by the book, uniform, keyed, vectorised."""
import numpy as np

from input_pipeline import draws

MASK = (1 << 64) - 1


def _mix(x):
  """SplitMix64's finaliser on Python ints (the published constants)."""
  x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & MASK
  x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & MASK
  return x ^ (x >> 31)


def _key(*fields):
  h = 0
  for f in fields:
    h = _mix(((h + 0x9E3779B97F4A7C15) & MASK) ^ (f & MASK))
  return h


def _bits(k, n):
  return [_mix((k + 0x9E3779B97F4A7C15 * (i + 1)) & MASK) for i in range(n)]


def test_draws_are_splitmix64_keyed_field_by_field():
  fields = [(0, 0, 0), (1, 2, 3), (3, 2, 1), (-1, 7, 2 ** 40), (5, -5, 0)]
  for f in fields:
    k = draws.key(*f)
    assert k.shape == (1,) and int(k[0]) == _key(*f)
    assert [int(b) for b in draws.bits(k, 4)[0]] == _bits(_key(*f), 4)
  # Arrays broadcast against scalars: each element is its own key.
  rows = np.array([0, 5, 2 ** 33, 7])
  ks = draws.key(9, rows, 1)
  assert [int(k) for k in ks] == [_key(9, int(r), 1) for r in rows]
  b = draws.bits(ks, 6)
  assert b.shape == (4, 6) and b.dtype == np.uint64
  # Order and sign of fields matter.
  assert len({_key(*f) for f in fields}) == len(fields)


def test_draws_are_uniform_and_independent():
  n = 200_000
  b = draws.bits(draws.key(draws.GROUP, 0, np.arange(n)), 6)
  u = (b >> np.uint64(11)).astype(np.float64) * 2.0 ** -53
  # Means and correlations within ~5 standard errors of the uniform's.
  se = 1 / np.sqrt(12 * n)
  assert np.all(np.abs(u.mean(0) - 0.5) < 5 * se)
  corr = np.corrcoef(u.T)[~np.eye(6, dtype=bool)]
  assert np.all(np.abs(corr) < 5 / np.sqrt(n))
  # Neighbouring keys give unrelated draws.
  assert abs(np.corrcoef(u[1:, 0], u[:-1, 0])[0, 1]) < 5 / np.sqrt(n)
  for m in (1, 2, 7):
    c = draws.below(b[:, 0], m)
    assert c.min() >= 0 and c.max() == m - 1
    counts = np.bincount(c, minlength=m)
    p = 1 / m
    assert np.all(np.abs(counts - n * p) < 5 * np.sqrt(n * p * (1 - p)) + 1)


def test_permutations_are_keyed():
  p = draws.permutation(1000, 0, 3)
  np.testing.assert_array_equal(np.sort(p), np.arange(1000))
  np.testing.assert_array_equal(p, draws.permutation(1000, 0, 3))
  for other in ((0, 4), (1, 3)):  # another epoch, another seed
    assert (draws.permutation(1000, *other) != p).mean() > 0.9
  # Every position is equally likely to take any entry (over many keys).
  first = [draws.permutation(4, 0, e)[0] for e in range(4000)]
  counts = np.bincount(first, minlength=4)
  assert np.all(np.abs(counts - 1000) < 5 * np.sqrt(4000 * 0.25 * 0.75))
