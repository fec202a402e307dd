"""Blocked/sharded top-k and identity-retrieval metrics vs plain numpy."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

from nearid_jax import retrieval


def np_topk(queries, gallery, k):
  """Full score matrix, stable argsort: ties go to the lower index.

  Each score is summed the same way (not by a BLAS matmul, whose rounding
  depends on the column), so equal rows score equal."""
  scores = np.sum(queries.astype(np.float64)[:, None] *
                  gallery.astype(np.float64)[None], -1)
  ids = np.argsort(-scores, axis=1, kind="stable")[:, :k]
  return np.take_along_axis(scores, ids, 1), ids


def np_retrieval(query_emb, query_ids, gallery_emb, gallery_ids, self_index,
                 ks=(1, 5, 10)):
  """Loops over queries: rank the gallery minus the query, then AP / R@k."""
  unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)
  q = unit(query_emb.astype(np.float64))
  g = unit(gallery_emb.astype(np.float64))
  aps, hits = [], {k: [] for k in ks}
  for i in range(len(q)):
    keep = np.arange(len(g)) != self_index[i]
    scores, ids = g[keep] @ q[i], gallery_ids[keep]
    relevant = ids[np.argsort(-scores, kind="stable")] == query_ids[i]
    if not relevant.any():
      continue
    ranks = np.flatnonzero(relevant) + 1
    aps.append(np.mean(np.arange(1, len(ranks) + 1) / ranks))
    for k in ks:
      hits[k].append(relevant[:k].any())
  out = {f"r@{k}": np.mean(h) for k, h in hits.items()}
  out.update(map=np.mean(aps), n_queries=len(aps))
  return out


def sparse_signs(rng, n, d=16, nonzero=4):
  """Rows with exactly `nonzero` entries +-1: every cosine is a multiple of
  1/4, exact in float32, so exact ties are everywhere."""
  x = np.zeros((n, d), np.float32)
  for row in x:
    row[rng.choice(d, nonzero, replace=False)] = rng.choice([-1, 1], nonzero)
  return x


def meshes():
  devices = np.array(jax.devices())
  assert len(devices) == 8, "conftest.py should simulate 8 CPU devices"
  return [(Mesh(devices, ("data",)), None),
          (Mesh(devices.reshape(2, 4), ("data", "model")), None),
          (Mesh(devices.reshape(2, 4), ("data", "model")), "model")]


def test_topk_matches_numpy_on_unaligned_gallery():
  rng = np.random.default_rng(0)
  q = rng.standard_normal((13, 24)).astype(np.float32)
  g = rng.standard_normal((1000, 24)).astype(np.float32)
  want_s, want_i = np_topk(q, g, 10)
  s, i = retrieval.topk(q, g, 10, block=128)
  np.testing.assert_array_equal(i, want_i)
  np.testing.assert_allclose(s, want_s, rtol=1e-5, atol=1e-5)


def test_topk_ties_go_to_lower_index():
  rng = np.random.default_rng(1)
  q = rng.integers(-2, 3, (9, 6)).astype(np.float32)
  g = rng.integers(-2, 3, (301, 6)).astype(np.float32)
  g[200:] = g[:101]  # duplicates: equal scores at different ids
  want_s, want_i = np_topk(q, g, 25)
  s, i = retrieval.topk(q, g, 25, block=64)
  np.testing.assert_array_equal(i, want_i)
  np.testing.assert_array_equal(s, want_s)


def test_topk_whole_gallery():
  rng = np.random.default_rng(2)
  q = rng.integers(-3, 4, (4, 5)).astype(np.float32)
  g = rng.integers(-3, 4, (37, 5)).astype(np.float32)
  want_s, want_i = np_topk(q, g, 37)
  s, i = retrieval.topk(q, g, 37, block=16)
  np.testing.assert_array_equal(i, want_i)
  np.testing.assert_array_equal(s, want_s)


@pytest.mark.parametrize("mesh_axes", range(3))
def test_topk_sharded_matches_numpy(mesh_axes):
  mesh, axes = meshes()[mesh_axes]
  rng = np.random.default_rng(3)
  q = rng.integers(-2, 3, (11, 8)).astype(np.float32)
  g = rng.integers(-2, 3, (1003, 8)).astype(np.float32)  # 8 shards: padded
  want_s, want_i = np_topk(q, g, 10)
  s, i = retrieval.topk(q, g, 10, block=32, mesh=mesh, axes=axes)
  np.testing.assert_array_equal(i, want_i)
  np.testing.assert_array_equal(s, want_s)


def screened(q, g, k, *, candidates=64, block=128, mesh=None, axes=None):
  """The bf16 screen alone (no fallback): (scores, ids, certified)."""
  q, g = jnp.asarray(q, jnp.float32), jnp.asarray(g, jnp.float32)
  fn = jax.jit(retrieval._screened_topk, static_argnums=range(3, 8))
  out = fn(q, g, retrieval.prepare_gallery(g).bounds, k, candidates, block,
           mesh, retrieval._mesh_axes(mesh, axes))
  return tuple(np.asarray(x) for x in out)


def unit_rows(rng, n, d):
  x = rng.standard_normal((n, d)).astype(np.float32)
  return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_screen_certifies_random_data_and_matches_reference():
  rng = np.random.default_rng(6)
  q, g = unit_rows(rng, 16, 64), unit_rows(rng, 3001, 64)
  want_s, want_i = np_topk(q, g, 10)
  s, i, certified = screened(q, g, 10, block=512)
  assert certified.all()
  np.testing.assert_array_equal(i, want_i)
  # Unit vectors, D = 64: float32 sums are off by < 64 * 2^-24.
  np.testing.assert_allclose(s, want_s, atol=1e-5)
  s, i = retrieval.topk(q, retrieval.prepare_gallery(g), 10, block=512)
  ref_s, ref_i = retrieval.topk(q, g, 10, block=512, candidates=0)
  np.testing.assert_array_equal(i, ref_i)
  np.testing.assert_allclose(s, ref_s, atol=1e-5)


def test_screen_margin_bounds_the_bf16_scores():
  rng = np.random.default_rng(7)
  # Unnormalised: row scales over six decades, one zero row each.
  q = rng.standard_normal((20, 96)) * 10.0 ** rng.uniform(-3, 3, (20, 1))
  g = rng.standard_normal((300, 96)) * 10.0 ** rng.uniform(-3, 3, (300, 1))
  q[3], g[5] = 0, 0
  q, g = q.astype(np.float32), g.astype(np.float32)
  bf16 = lambda x: jnp.asarray(x, jnp.bfloat16)
  approx = np.asarray(jnp.dot(bf16(q), bf16(g).T,
                              preferred_element_type=jnp.float32))
  exact = q.astype(np.float64) @ g.astype(np.float64).T
  norm_g = np.linalg.norm(g.astype(np.float64), axis=1).max()
  margin = np.asarray(retrieval._screen_margin(
      jnp.asarray(q), *retrieval.prepare_gallery(g).bounds))
  error = np.abs(approx - exact).max(1)
  assert np.all(error <= margin)
  # Not vacuous: about bf16's relative precision (2^-8 per input), plus
  # the tiny absolute term for flushed subnormals.
  assert np.all(margin <= 2.0 ** -6 * np.linalg.norm(q, axis=1) * norm_g
                + 2.0 ** -90 * (1 + norm_g))


def near_ties(rng, n_q=8, n_g=1000, d=16):
  """Integers: every score exact in float32 (|sum| < 2^24), but the rows are
  one row plus -1/0/+1 each, so scores differ by far less than the bf16
  rounding of the inputs, and many are equal."""
  q = rng.integers(-500, 501, (n_q, d)).astype(np.float32)
  g = (rng.integers(-500, 501, (1, d)) +
       rng.integers(-1, 2, (n_g, d))).astype(np.float32)
  return q, g


def test_screen_near_ties_fall_back_to_reference():
  rng = np.random.default_rng(8)
  q, g = near_ties(rng)
  _, _, certified = screened(q, g, 10)
  assert not certified.any()
  want_s, want_i = np_topk(q, g, 10)
  for candidates, mesh in ((64, None), (8, None), (64, meshes()[0][0])):
    # 8 < k: the reference kernel only; with a mesh the fallback runs
    # sharded.
    s, i = retrieval.topk(q, g, 10, block=128, candidates=candidates,
                          mesh=mesh)
    np.testing.assert_array_equal(i, want_i)
    np.testing.assert_array_equal(s, want_s)


def test_topk_unnormalised_zero_and_duplicate_rows():
  rng = np.random.default_rng(9)
  q = rng.standard_normal((12, 32)) * 10.0 ** rng.uniform(-2, 2, (12, 1))
  g = rng.standard_normal((700, 32)) * 10.0 ** rng.uniform(-2, 2, (700, 1))
  q[0] = 0  # every score 0: the first k ids
  g[:50] = 0
  g[600:] = g[100:200]  # equal scores at different ids
  q, g = q.astype(np.float32), g.astype(np.float32)
  want_s, want_i = np_topk(q, g, 20)
  # The zero query's scores all tie: it cannot be certified, and its batch
  # runs the reference kernel; the screen alone is right for the others.
  _, i, certified = screened(q, g, 20, block=64)
  assert not certified[0] and certified[1:].all()
  np.testing.assert_array_equal(i[1:], want_i[1:])
  s, i = retrieval.topk(q, g, 20, block=64)
  np.testing.assert_array_equal(i, want_i)
  np.testing.assert_array_equal(i[0], np.arange(20))
  # float32 sums of 32 products: within 32 * 2^-24 of |q||g|.
  scale = (np.linalg.norm(q, axis=1, keepdims=True) *
           np.linalg.norm(g, axis=1).max())
  assert np.all(np.abs(s - want_s) <= 32 * 2.0 ** -24 * scale)


def test_screen_sharded_matches_numpy():
  mesh, axes = meshes()[0]
  rng = np.random.default_rng(10)
  q, g = unit_rows(rng, 9, 48), unit_rows(rng, 2003, 48)
  want_s, want_i = np_topk(q, g, 10)
  s, i, certified = screened(q, g, 10, block=64, mesh=mesh, axes=axes)
  assert certified.all()
  np.testing.assert_array_equal(i, want_i)
  s, i = retrieval.topk(q, g, 10, block=64, mesh=mesh, axes=axes)
  np.testing.assert_array_equal(i, want_i)
  np.testing.assert_allclose(s, want_s, atol=1e-5)


def test_retrieval_metrics_with_ties_match_numpy():
  rng = np.random.default_rng(4)
  # 40 identities with 1 to 3 views (1 view: no positive, not scored) and
  # 150 distractors (id -1), some exact copies of views.
  n_views = rng.integers(1, 4, 40)
  view_ids = np.repeat(np.arange(40), n_views)
  views = sparse_signs(rng, len(view_ids))
  distractors = sparse_signs(rng, 150)
  distractors[:30] = views[rng.choice(len(views), 30)]
  gallery = np.concatenate([views, distractors])
  gallery_ids = np.concatenate([view_ids, np.full(150, -1)])
  self_index = np.arange(len(views))
  want = np_retrieval(views, view_ids, gallery, gallery_ids, self_index)
  assert 0 < want["r@1"] < want["r@10"] < 1 and 0 < want["map"] < 1
  got = retrieval.retrieval_metrics(views, view_ids, gallery, gallery_ids,
                                    self_index, block=32)
  assert got["n_queries"] == want["n_queries"] == np.sum(n_views[n_views > 1])
  for key in ("r@1", "r@5", "r@10", "map"):
    np.testing.assert_allclose(got[key], want[key], rtol=1e-12, err_msg=key)


def test_retrieval_metrics_sharded_random_data():
  rng = np.random.default_rng(5)
  view_ids = np.repeat(np.arange(30), 3)
  centers = rng.standard_normal((30, 16))
  views = (centers[view_ids] + 1.5 * rng.standard_normal((90, 16)))
  distractors = rng.standard_normal((131, 16))
  # Queries are not in this gallery (self_index None): all 3 views positive.
  gallery = np.concatenate([views, distractors]).astype(np.float32)
  gallery_ids = np.concatenate([view_ids, np.full(131, -1)])
  queries = (centers[view_ids] + rng.standard_normal((90, 16)))
  want = np_retrieval(queries, view_ids, gallery, gallery_ids,
                      np.full(90, -1))
  for mesh, axes in [(None, None)] + meshes()[:1]:
    got = retrieval.retrieval_metrics(queries, view_ids, gallery, gallery_ids,
                                      block=16, mesh=mesh, axes=axes)
    for key in ("r@1", "r@5", "r@10", "map"):
      np.testing.assert_allclose(got[key], want[key], rtol=1e-6, err_msg=key)


def test_errors_name_the_shapes():
  g = np.ones((10, 8), np.float32)
  with pytest.raises(ValueError, match=r"queries is empty \(shape \(0, 8\)\)"):
    retrieval.topk(np.ones((0, 8)), g, 1)
  with pytest.raises(ValueError, match=r"widths differ.*\(3, 6\).*\(10, 8\)"):
    retrieval.topk(np.ones((3, 6)), g, 1)
  with pytest.raises(ValueError, match=r"k=11 must be in \[1, 10\]"):
    retrieval.topk(np.ones((3, 8)), g, 11)
  with pytest.raises(ValueError, match=r"candidates=-1 must be >= 0"):
    retrieval.topk(np.ones((3, 8)), g, 1, candidates=-1)
  with pytest.raises(ValueError, match=r"widths differ.*\(3, 6\).*\(10, 8\)"):
    retrieval.retrieval_metrics(np.ones((3, 6)), np.arange(3), g,
                                np.arange(10))
  with pytest.raises(ValueError, match=r"gallery_ids has shape \(9,\)"):
    retrieval.retrieval_metrics(g[:3], np.arange(3), g, np.arange(9))
  with pytest.raises(ValueError, match="no query has a positive"):
    retrieval.retrieval_metrics(g[:3], np.arange(3), g, np.arange(10),
                                np.arange(3))
  with pytest.raises(ValueError, match="no axis 'x'"):
    retrieval.topk(g, g, 1, mesh=meshes()[0][0], axes="x")
