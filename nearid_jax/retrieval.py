"""Blocked, optionally sharded similarity search and identity retrieval.

Neither kernel ever holds the whole query x gallery score matrix: a
`lax.scan` walks the gallery in blocks of `block` rows, so memory is
O(Q * block); the last block is shifted back to fit and its overlap masked,
so the gallery is never copied to pad it. With a `mesh`, the gallery is
split over mesh axes with `shard_map`; every device scans its own shard and
the per-device results are merged (top-k lists are re-ranked, rank counts
are summed).

Ties between equal scores always go to the lower gallery index, the same
rule as a stable argsort of -score, so results are deterministic.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from nearid_jax.cpu import xla_flags

# Exact float32 dot products on every backend: TPUs and GPUs would otherwise
# round inputs to bf16/tf32 and reorder near-equal scores.
HIGHEST = jax.lax.Precision.HIGHEST


def l2_normalize(x, axis=-1):
  """x / ||x|| along `axis`; zero vectors stay zero."""
  # A true sqrt and divide (not rsqrt): exact for exactly representable norms.
  norm = jnp.sqrt(jnp.sum(x * x, axis=axis, keepdims=True))
  return x / jnp.maximum(norm, 1e-12)


def _check_embeddings(queries, gallery):
  for name, x in (("queries", queries), ("gallery", gallery)):
    if x.ndim != 2:
      raise ValueError(f"{name} must be 2-D (n, D); got shape {x.shape}")
    if x.shape[0] == 0:
      raise ValueError(f"{name} is empty (shape {x.shape})")
  if queries.shape[1] != gallery.shape[1]:
    raise ValueError(f"embedding widths differ: queries {queries.shape} vs "
                     f"gallery {gallery.shape}")


def _mesh_axes(mesh, axes):
  """Mesh axes the gallery is split over: all of them unless named."""
  if mesh is None:
    return None
  if axes is None:
    axes = tuple(mesh.axis_names)
  axes = (axes,) if isinstance(axes, str) else tuple(axes)
  for a in axes:
    if a not in mesh.axis_names:
      raise ValueError(f"mesh has axes {mesh.axis_names}; no axis {a!r}")
  return axes


def _n_shards(mesh, axes):
  return 1 if mesh is None else int(np.prod([mesh.shape[a] for a in axes]))


def _scan_blocks(queries, gallery, block, offset, n_valid, step, carry, axes):
  """carry = step(carry, scores (Q, b), ids (b,), valid (b,)) over blocks.

  `ids` are global gallery indices (`offset` = first index of this shard);
  rows at or past `n_valid` (padding) are not valid.
  """
  if axes is not None:  # The carry differs per shard from the first block on.
    carry = jax.tree.map(lambda x: jax.lax.pcast(x, axes, to="varying"), carry)
  rows = gallery.shape[0]
  block = min(block, rows)

  def body(carry, i):
    # The last block is moved back to end at the last row (no padded copy
    # of the gallery); rows it shares with the block before are masked.
    start = jnp.minimum(i * block, rows - block)
    g = jax.lax.dynamic_slice_in_dim(gallery, start, block)
    scores = jnp.dot(queries, g.T, precision=HIGHEST)
    local = start + jnp.arange(block, dtype=jnp.int32)
    ids = offset + local
    valid = (local >= i * block) & (ids < n_valid)
    return step(carry, scores, ids, valid), None

  n = -(-rows // block)
  carry, _ = jax.lax.scan(body, carry, jnp.arange(n, dtype=jnp.int32))
  return carry


def _over_gallery(local, merge, queries, gallery, extra, mesh, axes):
  """Runs `local` on each gallery shard and `merge`s the results.

  `local(q, g_shard, offset, *extra, axes)` returns a pytree of per-shard
  results; `merge` gets them stacked on a leading shard axis (in mesh order,
  i.e. ascending gallery ids). With a mesh the gallery is padded to a
  multiple of the shard count; `local` masks rows past the real gallery.
  """
  stack = functools.partial(jax.tree.map, lambda x: x[None])
  if mesh is None:
    return merge(stack(local(queries, gallery, 0, *extra, None)))
  pad = -gallery.shape[0] % _n_shards(mesh, axes)
  if pad:
    gallery = jnp.pad(gallery, ((0, pad), (0, 0)))

  def per_shard(q, g, *extra):
    offset = jax.lax.axis_index(axes) * g.shape[0]
    return stack(local(q, g, offset, *extra, axes))

  parts = jax.shard_map(
      per_shard, mesh=mesh, in_specs=(P(), P(axes)) + (P(),) * len(extra),
      out_specs=P(axes))(queries, gallery, *extra)
  return merge(parts)


def _merge_topk(scores, ids, k):
  """Top k of concatenated candidate lists; earlier columns win ties."""
  scores, pos = jax.lax.top_k(scores, k)
  return scores, jnp.take_along_axis(ids, pos, axis=1)


@xla_flags.jit_ynn_dots(static_argnames=("k", "block", "mesh", "axes"))
def _topk(queries, gallery, *, k, block, mesh, axes):
  n_valid = gallery.shape[0]

  def local(q, g, offset, axes):
    init = (jnp.full((q.shape[0], k), -jnp.inf, q.dtype),
            jnp.full((q.shape[0], k), -1, jnp.int32))

    def step(carry, scores, ids, valid):
      scores = jnp.where(valid, scores, -jnp.inf)
      # The running list comes first: its ids are lower, so it wins ties.
      ids = jnp.broadcast_to(ids, scores.shape)
      return _merge_topk(jnp.concatenate([carry[0], scores], 1),
                         jnp.concatenate([carry[1], ids], 1), k)

    return _scan_blocks(q, g, block, offset, n_valid, step, init, axes)

  def merge(parts):
    s, i = (x.transpose(1, 0, 2).reshape(x.shape[1], -1) for x in parts)
    return _merge_topk(s, i, k)

  return _over_gallery(local, merge, queries, gallery, (), mesh, axes)


def topk(queries, gallery, k, *, block=1024, mesh=None, axes=None):
  """The k highest inner products of each query against the gallery.

  Args:
    queries: (Q, D) float array.
    gallery: (G, D) float array. For cosine similarity pass L2-normalised
      rows (`l2_normalize`); the kernel scores raw inner products.
    k: how many neighbours per query, 1 <= k <= G.
    block: gallery rows scored at a time (memory is about Q * block floats).
    mesh: optional `jax.sharding.Mesh`; the gallery is split over `axes`.
    axes: mesh axis name(s) to split the gallery over (default: all).

  Returns:
    (scores (Q, k) float32, ids (Q, k) int32), best first; ties go to the
    lower gallery index.
  """
  queries = jnp.asarray(queries, jnp.float32)
  gallery = jnp.asarray(gallery, jnp.float32)
  _check_embeddings(queries, gallery)
  if not 1 <= k <= gallery.shape[0]:
    raise ValueError(f"k={k} must be in [1, {gallery.shape[0]}] (gallery "
                     f"shape {gallery.shape})")
  if block < 1:
    raise ValueError(f"block={block} must be >= 1")
  axes = _mesh_axes(mesh, axes)
  return _topk(queries, gallery, k=int(k), block=int(block), mesh=mesh,
               axes=axes)


@xla_flags.jit_ynn_dots(static_argnames=("block", "mesh", "axes"))
def _positive_ranks(queries, gallery, self_index, pos_index, pos_mask, *,
                    block, mesh, axes):
  """1-based rank of each positive among all gallery items but the query.

  Negatives ranked above a positive are counted blockwise; positives ranked
  above it come from the (Q, P) positive scores alone, so both counts use
  one consistent score per positive.
  """
  queries = l2_normalize(queries)
  gallery = l2_normalize(gallery)
  n_valid = gallery.shape[0]
  pos_rows = gallery[jnp.where(pos_mask, pos_index, 0)]  # (Q, P, D)
  pos_scores = jnp.einsum("qd,qpd->qp", queries, pos_rows, precision=HIGHEST)

  def beats(s_other, id_other, s_pos, id_pos):
    """Whether `other` is ranked above the positive (ties: lower id first)."""
    return (s_other > s_pos) | ((s_other == s_pos) & (id_other < id_pos))

  def local(q, g, offset, self_index, pos_index, pos_scores, axes):
    def step(count, scores, ids, valid):
      negative = (valid[None] & (ids[None] != self_index[:, None]) &
                  jnp.all(ids[None, :, None] != pos_index[:, None], -1))
      above = beats(scores[:, :, None], ids[None, :, None],
                    pos_scores[:, None], pos_index[:, None])  # (Q, B, P)
      return count + jnp.sum(above & negative[:, :, None], 1, dtype=jnp.int32)

    return _scan_blocks(q, g, block, offset, n_valid, step,
                        jnp.zeros(pos_index.shape, jnp.int32), axes)

  neg_above = _over_gallery(local, lambda c: jnp.sum(c, 0), queries, gallery,
                            (self_index, pos_index, pos_scores), mesh, axes)
  pos_above = jnp.sum(
      beats(pos_scores[:, None, :], pos_index[:, None, :],
            pos_scores[:, :, None], pos_index[:, :, None]) & pos_mask[:, None],
      -1, dtype=jnp.int32)
  return 1 + neg_above + pos_above


def _positives(query_ids, gallery_ids, self_index):
  """(Q, P) gallery indices of each query's positives (same id, not itself).

  Grouped by sorting, so no (Q, G) table is built; valid entries come first.
  """
  order = np.argsort(gallery_ids, kind="stable")
  sorted_ids = gallery_ids[order]
  lo = np.searchsorted(sorted_ids, query_ids, "left")
  hi = np.searchsorted(sorted_ids, query_ids, "right")
  width = int((hi - lo).max())
  cand = lo[:, None] + np.arange(width)
  valid = cand < hi[:, None]
  index = order[np.minimum(cand, len(order) - 1)]
  valid &= index != self_index[:, None]
  first = np.argsort(~valid, axis=1, kind="stable")
  index = np.take_along_axis(index, first, 1)
  valid = np.take_along_axis(valid, first, 1)
  width = max(int(valid.sum(1).max()), 1)
  # -1 in unused slots, so they never mask a real gallery row.
  index = np.where(valid, index, -1)[:, :width].astype(np.int32)
  return index, valid[:, :width]


def retrieval_metrics(query_emb, query_ids, gallery_emb, gallery_ids,
                      self_index=None, *, ks=(1, 5, 10), block=1024,
                      mesh=None, axes=None):
  """Identity retrieval: recall@k and mAP by cosine similarity.

  A gallery item is a positive of a query when its id equals the query's id;
  give distractors ids that no query has. The query itself is left out of
  its own ranking via `self_index`. Queries without any positive are not
  scored. Ranks are exact (ties go to the lower gallery index) and computed
  blockwise, so the full score matrix is never built.

  Args:
    query_emb: (Q, D) embeddings (normalised inside).
    query_ids: (Q,) identity labels.
    gallery_emb: (G, D) embeddings (normalised inside).
    gallery_ids: (G,) identity labels.
    self_index: optional (Q,) int: gallery row that is the query itself, or
      -1 when the query is not in the gallery. None: no query is in it.
    ks: cut-offs for recall@k (a hit = at least one positive in the top k).
    block, mesh, axes: as in `topk`.

  Returns:
    dict with "r@{k}" for each k and "map" (fractions in [0, 1]), and
    "n_queries" (queries that have at least one positive).
  """
  query_emb = jnp.asarray(query_emb, jnp.float32)
  gallery_emb = jnp.asarray(gallery_emb, jnp.float32)
  _check_embeddings(query_emb, gallery_emb)
  query_ids, gallery_ids = np.asarray(query_ids), np.asarray(gallery_ids)
  n_q, n_g = query_emb.shape[0], gallery_emb.shape[0]
  if query_ids.shape != (n_q,):
    raise ValueError(f"query_ids has shape {query_ids.shape}; expected ({n_q},)"
                     f" to match query_emb {query_emb.shape}")
  if gallery_ids.shape != (n_g,):
    raise ValueError(f"gallery_ids has shape {gallery_ids.shape}; expected "
                     f"({n_g},) to match gallery_emb {gallery_emb.shape}")
  if self_index is None:
    self_index = np.full(n_q, -1, np.int32)
  self_index = np.asarray(self_index)
  if (self_index.shape != (n_q,) or
      np.any((self_index < -1) | (self_index >= n_g))):
    raise ValueError(f"self_index must be ({n_q},) ints in [-1, {n_g}); got "
                     f"shape {self_index.shape} with values in "
                     f"[{self_index.min()}, {self_index.max()}]")
  self_index = self_index.astype(np.int32)
  pos_index, pos_mask = _positives(query_ids, gallery_ids, self_index)
  scored = pos_mask.any(1)
  if not scored.any():
    raise ValueError(f"no query has a positive in the gallery ({n_q} queries, "
                     f"{n_g} gallery items)")
  ranks = _positive_ranks(query_emb[scored], gallery_emb,
                          jnp.asarray(self_index[scored]),
                          jnp.asarray(pos_index[scored]),
                          jnp.asarray(pos_mask[scored]), block=int(block),
                          mesh=mesh, axes=_mesh_axes(mesh, axes))
  ranks = np.asarray(ranks).astype(np.float64)
  mask = pos_mask[scored]
  # A positive's precision = (positives ranked at or above it) / its rank.
  ordered = np.sort(np.where(mask, ranks, np.inf), axis=1)
  hits = np.arange(1, ordered.shape[1] + 1)
  precision = np.where(np.isfinite(ordered), hits / ordered, 0.0)
  ap = precision.sum(1) / mask.sum(1)
  out = {f"r@{k}": float(np.mean(ordered[:, 0] <= k)) for k in ks}
  out["map"] = float(ap.mean())
  out["n_queries"] = int(scored.sum())
  return out
