"""Per-sample NearID results (samples.csv): find the failures and re-pool.

One row per (dataset row, distractor source, view pair i < j with both views
valid). For each head h (baseline, trained):
  h_pos             cos(v_i, v_j)
  h_dist_i, h_dist_j  cos(v_i, n_i), cos(v_j, n_j) (empty: no distractor)
  h_margin_i, h_margin_j  the directed margins of SPEC.md §5, exactly the
                    numbers SSR/PA count (metrics.nearid_margins; empty when
                    not valid)
  h_pair_success    every valid margin of this pair > 0 (empty: none valid)
  h_sample_success  every valid margin of this (row, source) > 0: the sample
                    SSR counts
PA = wins / valid margins over the rows, SSR = the mean of h_sample_success
over distinct (row, source), per source or pooled over sources.
"""
import csv

import numpy as np

from nearid_jax import metrics


def _cell(x, ok=True):
  return repr(float(x)) if ok else ""


def _flag(wins, valid):
  return "" if not valid.any() else str(int(bool(np.all(wins[valid]))))


def rows(emb):
  """The Embedded's per-sample rows as dicts (the columns above)."""
  n, v_slots = emb.view_mask.shape
  i, j = np.triu_indices(v_slots, 1)
  pair_ok = emb.view_mask[:, i] & emb.view_mask[:, j]
  out = []
  for s, source in enumerate(emb.sources):
    per_head = {}
    for h, views in emb.views.items():
      dists = emb.distractors[h][:, s]
      margins, valid = metrics.nearid_margins(
          views, emb.view_mask, dists, emb.distractor_mask[:, s])
      per_head[h] = (np.einsum("npd,npd->np", views[:, i], views[:, j]),
                     np.einsum("nkd,nkd->nk", views, dists),
                     margins.reshape(n, len(i), 2),
                     valid.reshape(n, len(i), 2))
    for r in range(n):
      for p in np.flatnonzero(pair_ok[r]):
        row = {"row": int(emb.index[r]), "source": source,
               "view_i": int(i[p]), "view_j": int(j[p])}
        for h, (pos, dist, m, ok) in per_head.items():
          d_ok = emb.distractor_mask[r, s]
          row.update({
              f"{h}_pos": _cell(pos[r, p]),
              f"{h}_dist_i": _cell(dist[r, i[p]], d_ok[i[p]]),
              f"{h}_dist_j": _cell(dist[r, j[p]], d_ok[j[p]]),
              f"{h}_margin_i": _cell(m[r, p, 0], ok[r, p, 0]),
              f"{h}_margin_j": _cell(m[r, p, 1], ok[r, p, 1]),
              f"{h}_pair_success": _flag(m[r, p] > 0, ok[r, p]),
              f"{h}_sample_success": _flag(m[r] > 0, ok[r])})
        out.append(row)
  return out


def columns(heads):
  return ["row", "source", "view_i", "view_j"] + [
      f"{h}_{c}" for h in heads
      for c in ("pos", "dist_i", "dist_j", "margin_i", "margin_j",
                "pair_success", "sample_success")]


def write(path, emb):
  with open(path, "w", newline="") as f:
    writer = csv.DictWriter(f, columns(list(emb.views)))
    writer.writeheader()
    writer.writerows(rows(emb))
