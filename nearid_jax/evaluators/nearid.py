"""NearID benchmark scores (SPEC.md §5) of embedded splits: per-source and
pooled SSR/PA, and identity retrieval."""
import numpy as np

from nearid_jax import metrics
from nearid_jax import retrieval
from nearid_jax.evaluators import embed as embed_lib

# The sources SPEC.md §5 pools (FluxC and FluxC_1024 are left out).
POOLED_SOURCES = ("Flux", "Flux_1024", "Qwen", "Qwen_1328", "PowerPaint",
                  "SDXL", "SDXL_1024")
# A distractor's identity in retrieval: no query has it (rows are >= 0).
DISTRACTOR_ID = -1


def identity_retrieval(emb, head, mesh=None):
  """A view as query; its identity's other views positive; all else gallery.

  The gallery holds every valid view and every valid distractor of every
  source; distractors belong to no identity.
  """
  q = emb.views[head][emb.view_mask]
  q_ids = np.broadcast_to(emb.index[:, None], emb.view_mask.shape)[
      emb.view_mask]
  d = emb.distractors[head][emb.distractor_mask]
  gallery = np.concatenate([q, d])
  g_ids = np.concatenate([q_ids, np.full(len(d), DISTRACTOR_ID, q_ids.dtype)])
  # The kernel takes host arrays: across processes, each scores alone.
  if mesh is not None and mesh.is_multi_process:
    mesh = None
  return retrieval.retrieval_metrics(q, q_ids, gallery, g_ids,
                                     np.arange(len(q)), mesh=mesh)


def nearid_scores(emb, mesh=None):
  """{head: {"sources": {s: ssr_pa}, "pooled", "pooled_sources", "retrieval"}}.

  "pooled" pools the margins of the POOLED_SOURCES present (absent when none
  is); "retrieval" is identity_retrieval.
  """
  out = {}
  for head in emb.views:
    per_source, margins = {}, {}
    for s, name in enumerate(emb.sources):
      margins[name] = metrics.nearid_margins(
          emb.views[head], emb.view_mask, emb.distractors[head][:, s],
          emb.distractor_mask[:, s])
      try:
        per_source[name] = metrics.ssr_from_margins(*margins[name])
      except ValueError as e:
        raise ValueError(f"split {emb.split!r} source {name!r}: {e}") from e
    res = {"sources": per_source}
    pooled = [s for s in emb.sources if s in POOLED_SOURCES]
    if pooled:
      res["pooled"] = metrics.ssr_from_margins(
          np.concatenate([margins[s][0] for s in pooled]),
          np.concatenate([margins[s][1] for s in pooled]))
      res["pooled_sources"] = pooled
    res["retrieval"] = identity_retrieval(emb, head, mesh)
    out[head] = res
  return out


def nearid(model, heads, cfg_input, split, sources=None, mesh=None,
           batch_size=None):
  """Per-source and pooled SSR/PA and identity retrieval of each head.

  See embed_split for the arguments and nearid_scores for the result.
  """
  emb = embed_lib.embed_split(model, heads, cfg_input, split, sources, mesh,
                              batch_size)
  return nearid_scores(emb, mesh)

