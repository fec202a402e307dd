"""Blocked/sharded top-k and identity-retrieval metrics vs plain numpy."""
import jax
import numpy as np
import pytest
from jax.sharding import Mesh

from nearid_jax import retrieval


def np_topk(queries, gallery, k):
  """Full score matrix, stable argsort: ties go to the lower index."""
  scores = queries.astype(np.float64) @ gallery.astype(np.float64).T
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
