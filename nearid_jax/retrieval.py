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

`topk` is exact but does not score every pair in float32: a bf16 screen
(about twice the float32 matmul rate) keeps candidates that provably hold
the float32 top k, and only they are rescored in float32
(`_screened_topk`); where that proof fails, the reference kernel
(`_exact_topk`, every pair in float32) runs instead.
"""
import functools
from typing import NamedTuple

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


def _exact_scores(queries, rows):
  """(Q, b) float32 inner products of the queries with gallery rows."""
  return jnp.dot(queries, rows.T, precision=HIGHEST)


def _scan_blocks(gallery, block, offset, n_valid, step, carry, axes):
  """carry = step(carry, rows (b, D), ids (b,), valid (b,)) over blocks.

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
    local = start + jnp.arange(block, dtype=jnp.int32)
    ids = offset + local
    valid = (local >= i * block) & (ids < n_valid)
    return step(carry, g, ids, valid), None

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


def _exact_topk(queries, gallery, k, block, mesh, axes):
  """The reference kernel: every score in float32, a running top k."""
  n_valid = gallery.shape[0]

  def local(q, g, offset, axes):
    init = (jnp.full((q.shape[0], k), -jnp.inf, q.dtype),
            jnp.full((q.shape[0], k), -1, jnp.int32))

    def step(carry, rows, ids, valid):
      scores = jnp.where(valid, _exact_scores(q, rows), -jnp.inf)
      # The running list comes first: its ids are lower, so it wins ties.
      ids = jnp.broadcast_to(ids, scores.shape)
      return _merge_topk(jnp.concatenate([carry[0], scores], 1),
                         jnp.concatenate([carry[1], ids], 1), k)

    return _scan_blocks(g, block, offset, n_valid, step, init, axes)

  def merge(parts):
    s, i = (x.transpose(1, 0, 2).reshape(x.shape[1], -1) for x in parts)
    return _merge_topk(s, i, k)

  return _over_gallery(local, merge, queries, gallery, (), mesh, axes)


def _norm(x):
  return jnp.sqrt(jnp.sum(jnp.square(x), -1))


class Gallery(NamedTuple):
  """A gallery with the bounds the bf16 screen needs: make it with
  `prepare_gallery`, once, to spare every `topk` call a pass over it."""
  rows: jax.Array  # (G, D) float32
  bounds: jax.Array  # (2,): max row norm, max row norm of the bf16 error


@jax.jit
def _gallery_bounds(rows):
  err = rows.astype(jnp.bfloat16).astype(jnp.float32) - rows
  return jnp.stack([jnp.max(_norm(rows)), jnp.max(_norm(err))])


def prepare_gallery(gallery):
  """(G, D) float array -> Gallery for `topk` (its rows as float32)."""
  rows = jnp.asarray(gallery, jnp.float32)
  if rows.ndim != 2:
    raise ValueError(f"gallery must be 2-D (n, D); got shape {rows.shape}")
  return Gallery(rows, _gallery_bounds(rows))


def _screen_margin(queries, gallery_norm, gallery_err):
  """(Q,) bounds on |bf16 screen score - float32 score| over the gallery.

  For a query q and gallery row g with bf16 roundings q' = q + dq and
  g' = g + dg: q'.g' - q.g = dq.g' + q.dg, at most |dq||g'| + |q||dg|
  (Cauchy-Schwarz). The screen sums the D products q'_i g'_i in float32
  (each product is exact: 8-bit significands), so it is off q'.g' by at
  most c |q'||g'|, c = 2 (D + 2) 2^-24 in any summation order, even with
  accumulators that truncate instead of rounding (twice the usual bound);
  any float32 score of q.g (the reference kernel's) is off q.g by at most
  c |q||g|. With G = max |g|, E = max |dg| over the gallery and
  |g'| <= G + E, the two scores differ by at most
    |dq| (G + E) + |q| E + c (|q'| (G + E) + |q| G).
  The factor (1 + 4c) and the extra 4 2^-24 in c cover the rounding of
  these norms and of the certificate's one addition; the last term covers
  subnormals flushed to zero (each of the < 4D operations moves by less
  than 2^-126 (1 + |q| + |g|); D < 2^20).
  """
  q16 = queries.astype(jnp.bfloat16).astype(jnp.float32)
  c = (2 * (queries.shape[1] + 2) + 4) * 2.0 ** -24
  q_norm, g16_norm = _norm(queries), gallery_norm + gallery_err
  bound = (_norm(q16 - queries) * g16_norm + q_norm * gallery_err
           + c * (_norm(q16) * g16_norm + q_norm * gallery_norm))
  return (1 + 4 * c) * bound + 2.0 ** -100 * (1 + q_norm) * (1 + gallery_norm)


# The screen cuts each block's approximate scores into groups of this many
# consecutive gallery rows and keeps a running list of the best groups by
# their maximum: the running selection sorts GROUP times fewer numbers, and
# each kept group's rows are read back from the block (GROUP strided reads
# per query; 8 beat 4 and 16 on the retrieval row, docs/benchmarks.md).
GROUP = 8


def _screen_usable(gallery, k, candidates, block, mesh, axes):
  """Whether _screened_topk applies (else the reference kernel runs)."""
  rows = -(-gallery.shape[0] // _n_shards(mesh, axes))
  return (k <= candidates < gallery.shape[0] and min(block, rows) >= GROUP
          and gallery.shape[1] < 2 ** 20)


def _screened_topk(queries, gallery, bounds, k, candidates, block, mesh,
                   axes):
  """Exact top k via a bf16 screen -> (scores, ids, certified (Q,)).

  Every gallery row is scored with bf16 inputs and float32 sums (YNNPACK
  on AVX512_BF16 CPUs, the MXU / tensor cores elsewhere: about twice the
  float32 rate); the best `candidates` rows by that score are rescored in
  float32 and ranked as the reference kernel ranks them. A query is
  certified when no row outside its candidates can reach its k-th best
  float32 score: the best score left out, plus twice `_screen_margin`, is
  below the k-th best candidate's screen score. Then its top k are exactly
  the reference kernel's (up to the float32 rounding of the final scores,
  as between any two float32 matmuls).
  """
  n_valid, n_q = gallery.shape[0], queries.shape[0]
  rows = -(-gallery.shape[0] // _n_shards(mesh, axes))
  block = min(block, rows) // GROUP * GROUP

  def local(q, g, offset, axes):
    # (D, Q): the gallery block is the dot's row-major left operand, the
    # layout YNNPACK's bf16 kernels run fastest.
    q16_t = q.astype(jnp.bfloat16).T
    init = (jnp.full((n_q, candidates), -jnp.inf, jnp.float32),
            jnp.full((n_q, candidates, GROUP), -jnp.inf, jnp.float32),
            jnp.full((n_q, candidates), -1, jnp.int32))

    def step(carry, rows, ids, valid):
      best, values, first = carry
      scores = jnp.dot(rows.astype(jnp.bfloat16), q16_t,
                       preferred_element_type=jnp.float32)
      scores = scores.reshape(-1, GROUP, n_q)
      # Invalid rows (padding, or rows of the block before) count in their
      # group's maximum: it stays an upper bound of its valid rows, all the
      # selection and the certificate need, and the block is not masked.
      group_max = jnp.max(scores, 1).T
      best, pos = jax.lax.top_k(jnp.concatenate([best, group_max], 1),
                                candidates)
      kept = pos < candidates
      new = jnp.maximum(pos - candidates, 0)
      # The new groups' scores are read in the dot's layout: no transpose
      # of the whole block.
      new_values = jnp.where(valid.reshape(-1, GROUP)[new],
                             scores[new, :, jnp.arange(n_q)[:, None]],
                             -jnp.inf)
      values = jnp.where(
          kept[..., None],
          jnp.take_along_axis(values, jnp.where(kept, pos, 0)[..., None], 1),
          new_values)
      first = jnp.where(kept, jnp.take_along_axis(first, jnp.where(
          kept, pos, 0), 1), ids[new * GROUP])
      return best, values, first

    return _scan_blocks(g, block, offset, n_valid, step, init, axes)

  def merge(parts):
    best, values, first = parts
    flat = lambda x: jnp.moveaxis(x, 0, 1).reshape(n_q, -1, *x.shape[3:])
    # Every group left out of a shard's list is at most that list's last,
    # which is at most the merged list's last.
    best, pos = jax.lax.top_k(flat(best), candidates)
    values = jnp.take_along_axis(flat(values), pos[..., None], 1)
    first = jnp.take_along_axis(flat(first), pos, 1)
    return best, values, first

  best, values, first = _over_gallery(
      local, merge, queries, gallery, (), mesh, axes)
  ids = (first[..., None] + jnp.arange(GROUP, dtype=jnp.int32)).reshape(
      n_q, -1)
  screen, cand = _merge_topk(values.reshape(n_q, -1), ids, candidates)
  left_out = jnp.maximum(best[:, -1], screen[:, -1])
  certified = (left_out + 2 * _screen_margin(queries, *bounds)
               < screen[:, k - 1])
  # Lowest id first: top_k's tie rule (earlier column wins) is then the
  # reference kernel's.
  cand, screen = jax.lax.sort((cand, screen), dimension=1, num_keys=1)
  rows = gallery[jnp.clip(cand, 0, n_valid - 1)]
  exact = jnp.einsum("qd,qcd->qc", queries, rows, precision=HIGHEST)
  exact = jnp.where(screen > -jnp.inf, exact, -jnp.inf)
  scores, ids = _merge_topk(exact, cand, k)
  return scores, ids, certified


@xla_flags.jit_ynn_dots(
    static_argnames=("k", "candidates", "block", "mesh", "axes"))
def _topk(queries, gallery, bounds, *, k, candidates, block, mesh, axes):
  args = (queries, gallery, k, block, mesh, axes)
  if not _screen_usable(gallery, k, candidates, block, mesh, axes):
    return _exact_topk(*args)
  if bounds is None:
    bounds = _gallery_bounds(gallery)
  scores, ids, certified = _screened_topk(
      queries, gallery, bounds, k, candidates, block, mesh, axes)
  # A batch with a query the screen cannot certify (near-ties wider than
  # its candidates) gets the reference kernel.
  return jax.lax.cond(jnp.all(certified), lambda: (scores, ids),
                      lambda: _exact_topk(*args))


def topk(queries, gallery, k, *, block=1024, mesh=None, axes=None,
         candidates=64):
  """The k highest inner products of each query against the gallery.

  Exact: by default a bf16 screen picks `candidates` rows per query that
  provably hold the float32 top k, which are then rescored in float32
  (`_screened_topk`); a batch with a query the screen cannot certify, and
  any call with k > candidates or a gallery too small for a screen, runs
  the reference kernel, which scores every pair in float32.

  Args:
    queries: (Q, D) float array.
    gallery: (G, D) float array, or a `prepare_gallery` of one (then the
      screen's bounds are not recomputed). For cosine similarity pass
      L2-normalised rows (`l2_normalize`); the kernel scores raw inner
      products.
    k: how many neighbours per query, 1 <= k <= G.
    block: gallery rows scored at a time (memory is about Q * block floats).
    mesh: optional `jax.sharding.Mesh`; the gallery is split over `axes`.
    axes: mesh axis name(s) to split the gallery over (default: all).
    candidates: rows per query the screen keeps for float32 rescoring; 0
      runs the reference kernel.

  Returns:
    (scores (Q, k) float32, ids (Q, k) int32), best first; ties go to the
    lower gallery index.
  """
  queries = jnp.asarray(queries, jnp.float32)
  gallery, bounds = (gallery if isinstance(gallery, Gallery) else
                     (jnp.asarray(gallery, jnp.float32), None))
  _check_embeddings(queries, gallery)
  if not 1 <= k <= gallery.shape[0]:
    raise ValueError(f"k={k} must be in [1, {gallery.shape[0]}] (gallery "
                     f"shape {gallery.shape})")
  if block < 1:
    raise ValueError(f"block={block} must be >= 1")
  if candidates < 0:
    raise ValueError(f"candidates={candidates} must be >= 0")
  axes = _mesh_axes(mesh, axes)
  return _topk(queries, gallery, bounds, k=int(k),
               candidates=int(candidates), block=int(block), mesh=mesh,
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
    def step(count, rows, ids, valid):
      scores = _exact_scores(q, rows)
      negative = (valid[None] & (ids[None] != self_index[:, None]) &
                  jnp.all(ids[None, :, None] != pos_index[:, None], -1))
      above = beats(scores[:, :, None], ids[None, :, None],
                    pos_scores[:, None], pos_index[:, None])  # (Q, B, P)
      return count + jnp.sum(above & negative[:, :, None], 1, dtype=jnp.int32)

    return _scan_blocks(g, block, offset, n_valid, step,
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
