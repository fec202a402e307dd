"""MTG scores (SPEC.md §5): SSR, PA, M-O and M-O_pair of embedded MTG rows."""
import numpy as np

from input_pipeline import tfds_builders
from nearid_jax import metrics
from nearid_jax.evaluators import embed as embed_lib

MTG_SPLIT = "test"  # MTG has train and test only


def mtg_scores(emb):
  """{head: metrics.mtg(...)} over the rows with both originals and edits."""
  ok = (emb.view_mask[:, 0] & emb.view_mask[:, 1] &
        emb.distractor_mask[:, 0, 0] & emb.distractor_mask[:, 0, 1])
  if not ok.any():
    raise ValueError(f"MTG split {emb.split!r}: no row has both originals and "
                     f"both edits ({len(ok)} rows)")
  out = {}
  for head in emb.views:
    v, d = emb.views[head][ok], emb.distractors[head][ok, 0]
    cos = lambda a, b: np.asarray(metrics.cosine_rows(a, b))
    out[head] = metrics.mtg(
        s_12=cos(v[:, 0], v[:, 1]), s_11p=cos(v[:, 0], d[:, 0]),
        s_22p=cos(v[:, 1], d[:, 1]), s_12p=cos(v[:, 0], d[:, 1]),
        s_21p=cos(v[:, 1], d[:, 0]), o1=emb.oracle[ok, 0],
        o2=emb.oracle[ok, 1])
  return out


def mtg(model, heads, cfg_input, mesh=None, batch_size=None, split=MTG_SPLIT,
        tokens=None):
  """MTG SSR, PA, M-O and M-O_pair of each head (mtg_scores)."""
  return mtg_scores(embed_lib.embed_split(model, heads, cfg_input, split, None, mesh,
                                          batch_size, dataset="mtg",
                                          tokens=tokens))


def mtg_prepared(cfg_input):
  """Whether MTG has been prepared under cfg_input.data_dir."""
  try:
    tfds_builders.load_mtg(cfg_input)
  except tfds_builders.DataError:
    return False
  return True

