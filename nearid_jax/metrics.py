"""Evaluation metrics of SPEC.md §5: NearID SSR/PA, MTG, DreamBench++ M-H.

Identity retrieval (recall@k, mAP) lives in retrieval.py with its kernels.
"""
import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np

from nearid_jax.retrieval import l2_normalize

DB_METHODS = ("textual_inversion_sd", "dreambooth_sd", "dreambooth_lora_sdxl",
              "blip_diffusion", "emu2", "ip_adapter_plus_vit_h_sdxl",
              "ip_adapter_vit_g_sdxl")
DB_CATEGORIES = ("object", "live_subject_animal", "live_subject_human",
                 "style")
# The category of every key: M-H over all of a method's images.
DB_ALL = "all"
# Metric files spell one object differently from the human rating files.
DB_SPELLINGS = {"rubik's_cube": "magic_cube"}
_INDEX_SUFFIX = re.compile(r"_\d+$")


def fisher_z_mean(r, clip):
  """tanh(mean(arctanh(r))) with r clipped to +-clip."""
  return float(np.tanh(np.mean(np.arctanh(np.clip(r, -clip, clip)))))


def pearson(x, y):
  """Pearson r of two 1-D samples; nan when either is constant."""
  x = np.asarray(x, np.float64) - np.mean(x)
  y = np.asarray(y, np.float64) - np.mean(y)
  den = np.sqrt(np.sum(x * x) * np.sum(y * y))
  return float(np.sum(x * y) / den) if den > 0 else float("nan")


@jax.jit
def cosine_rows(a, b):
  """Row-wise cosine of two (..., D) arrays -> (...)."""
  return jnp.sum(l2_normalize(a) * l2_normalize(b), -1)


# --- NearID benchmark ---


@jax.jit
def _margins(views, view_mask, distractors, distractor_mask):
  v, n = l2_normalize(views), l2_normalize(distractors)
  i, j = np.triu_indices(views.shape[1], 1)
  # All three cosines of a pair come from one reduction, so a distractor
  # equal to the other view ties exactly (and a tie loses).
  left = jnp.stack([v[:, i], v[:, i], v[:, j]], 2)
  right = jnp.stack([v[:, j], n[:, i], n[:, j]], 2)
  sim = jnp.sum(left * right, -1)  # (N, pairs, 3)
  margins = jnp.stack([sim[..., 0] - sim[..., 1], sim[..., 0] - sim[..., 2]],
                      -1)
  pair = view_mask[:, i] & view_mask[:, j]
  valid = jnp.stack([pair & distractor_mask[:, i],
                     pair & distractor_mask[:, j]], -1)
  shape = (views.shape[0], 2 * len(i))
  return margins.reshape(shape), valid.reshape(shape)


def nearid_margins(views, view_mask, distractors, distractor_mask):
  """Per-sample directed margins of SPEC §5, for pooling across sources.

  Args:
    views: (N, V, D) embeddings (normalised inside).
    view_mask: (N, V) bool, valid views.
    distractors: (N, V, D); distractor k sits on view k's background.
    distractor_mask: (N, V) bool, valid distractors.

  Returns:
    margins (N, 2 * V * (V - 1) / 2) float32 and valid (same shape) bool, as
    numpy. For each view pair i < j (in np.triu_indices order) the two
    columns are m_i = cos(v_i, v_j) - cos(v_i, n_i) and
    m_j = cos(v_i, v_j) - cos(v_j, n_j).
    Concatenate several sources' outputs on axis 0 to pool them.
  """
  views, distractors = np.asarray(views), np.asarray(distractors)
  view_mask = np.asarray(view_mask, bool)
  distractor_mask = np.asarray(distractor_mask, bool)
  if views.ndim != 3 or views.shape[1] < 2:
    raise ValueError(f"views must be (N, V, D) with V >= 2; got shape "
                     f"{views.shape}")
  if distractors.shape != views.shape:
    raise ValueError(f"distractors have shape {distractors.shape}; expected "
                     f"views' shape {views.shape}")
  for name, m in (("view_mask", view_mask),
                  ("distractor_mask", distractor_mask)):
    if m.shape != views.shape[:2]:
      raise ValueError(f"{name} has shape {m.shape}; expected "
                       f"{views.shape[:2]} (views are {views.shape})")
  margins, valid = _margins(views.astype(np.float32), view_mask,
                            distractors.astype(np.float32), distractor_mask)
  return np.asarray(margins), np.asarray(valid)


@jax.jit
def _win_counts(margins, valid):
  wins = valid & (margins > 0)  # strictly: a tie loses
  n_valid = jnp.sum(valid, 1)
  n_wins = jnp.sum(wins, 1)
  counted = n_valid > 0
  return (jnp.sum(counted & (n_wins == n_valid)), jnp.sum(counted),
          jnp.sum(n_wins), jnp.sum(n_valid))


def ssr_from_margins(margins, valid):
  """SSR/PA from `nearid_margins` output (of one source or several pooled).

  SSR: fraction of samples whose valid margins all win (samples with no
  valid margin do not count); PA: wins / valid margins.
  """
  margins, valid = np.asarray(margins), np.asarray(valid, bool)
  if margins.shape != valid.shape or margins.ndim != 2:
    raise ValueError(f"margins {margins.shape} and valid {valid.shape} must "
                     "be equal (N, M) shapes")
  all_win, n_samples, wins, n_margins = (
      int(x) for x in _win_counts(margins, valid))
  if n_margins == 0:
    raise ValueError(f"no valid margin among {margins.shape[0]} samples: "
                     "every sample lacks two views or a distractor")
  return dict(ssr=all_win / n_samples, pa=wins / n_margins,
              n_samples=n_samples, n_margins=n_margins)


def ssr_pa(views, view_mask, distractors, distractor_mask):
  """NearID SSR and PA (SPEC §5); see `nearid_margins` for the arguments.

  Returns:
    dict(ssr, pa) as fractions in [0, 1], n_samples (samples with at least
    one valid margin) and n_margins (valid margins).
  """
  return ssr_from_margins(
      *nearid_margins(views, view_mask, distractors, distractor_mask))


# --- Mind-the-Glitch ---


def mtg(s_12, s_11p, s_22p, s_12p, s_21p, o1, o2):
  """MTG metrics (SPEC §5) from per-sample similarities and oracles.

  Args:
    s_12: (N,) s(I1, I2), the two originals (positives).
    s_11p, s_22p: (N,) s(I1, I1'), s(I2, I2'): original vs its part-edited
      version on the same background.
    s_12p, s_21p: (N,) s(I1, I2'), s(I2, I1').
    o1, o2: (N,) oracles of the edited images I1', I2'
      (input_pipeline.oracle.mtg_oracle).

  Returns:
    dict(ssr, pa) fractions in [0, 1] (a tie loses), mo and mo_pair
    (Fisher-z means of Pearson r, r clipped to +-0.999; nan when a
    similarity or oracle is constant) and n_samples.
  """
  arrays = [np.asarray(x, np.float64) for x in (s_12, s_11p, s_22p, s_12p,
                                                 s_21p, o1, o2)]
  n = arrays[0].shape
  for name, x in zip(("s_12", "s_11p", "s_22p", "s_12p", "s_21p", "o1", "o2"),
                     arrays):
    if x.ndim != 1 or x.shape != n or not x.size:
      raise ValueError(f"{name} has shape {x.shape}; every input must be the "
                       f"same non-empty (N,), s_12 is {n}")
  s_12, s_11p, s_22p, s_12p, s_21p, o1, o2 = arrays
  wins = np.stack([s_12 - s_11p > 0, s_12 - s_22p > 0])
  r_pair = [pearson(s_11p, o1), pearson(s_22p, o2)]
  r_cross = [pearson(s_12p, o2), pearson(s_21p, o1)]
  return dict(ssr=float(np.mean(wins.all(0))), pa=float(np.mean(wins)),
              mo=fisher_z_mean(r_pair + r_cross, 0.999),
              mo_pair=fisher_z_mean(r_pair, 0.999), n_samples=len(s_12))


# --- DreamBench++ ---


def _read_ratings(path):
  if not os.path.isfile(path):
    raise FileNotFoundError(f"DreamBench++ rating file not found: {path}")
  with open(path) as f:
    ratings = json.load(f)
  if not isinstance(ratings, dict) or not ratings:
    raise ValueError(f"{path}: expected a non-empty JSON object "
                     "{image_key: score}")
  for key, value in ratings.items():
    if isinstance(value, bool) or not isinstance(value, (int, float)):
      raise ValueError(f"{path}: key {key!r} has non-numeric score {value!r}")
  return list(ratings), np.array(list(ratings.values()), np.float64)


def _same_key(metric_key, human_key):
  """Metric keys may add `_<index>` and spell objects as in DB_SPELLINGS."""
  for metric_name, human_name in DB_SPELLINGS.items():
    metric_key = metric_key.replace(metric_name, human_name)
  return (metric_key == human_key or
          (_INDEX_SUFFIX.search(metric_key) is not None and
           _INDEX_SUFFIX.sub("", metric_key) == human_key))


def _check_aligned(keys, ref_keys, path, ref_path, same):
  if len(keys) != len(ref_keys):
    raise ValueError(f"{path} has {len(keys)} keys but {ref_path} has "
                     f"{len(ref_keys)}")
  for pos, (key, ref) in enumerate(zip(keys, ref_keys)):
    if not same(key, ref):
      raise ValueError(f"{path}: key {key!r} at position {pos} does not match "
                       f"{ref!r} of {ref_path}")


def dreambench_keys(human_dir, method):
  """The image keys of `method`, in the human files' order."""
  path = os.path.join(human_dir, "group1", f"{method}-cp.json")
  keys, _ = _read_ratings(path)
  return keys


def dreambench_mh(human_dir, scores_dir, methods=DB_METHODS,
                  categories=DB_CATEGORIES):
  """Per-category metric-human correlation M-H of SPEC §5.

  For each method: Pearson r of the scores against each annotator group's
  ratings, averaged over the two groups; then the Fisher-z mean over the
  methods (r clipped to +-0.9999). Files pair up by position in key order;
  every key is checked.

  Args:
    human_dir: holds group1/{method}-cp.json and group2/{method}-cp.json.
    scores_dir: holds {method}.json (the metric's scores).
    methods: the personalisation methods to average over.
    categories: key prefixes to report; DB_ALL is every key.

  Returns:
    {category: M-H}.
  """
  per_method = {c: [] for c in categories}
  for method in methods:
    paths = [os.path.join(human_dir, g, f"{method}-cp.json")
             for g in ("group1", "group2")]
    (keys, h1), (keys2, h2) = (_read_ratings(p) for p in paths)
    _check_aligned(keys2, keys, paths[1], paths[0], str.__eq__)
    score_path = os.path.join(scores_dir, f"{method}.json")
    score_keys, scores = _read_ratings(score_path)
    _check_aligned(score_keys, keys, score_path, paths[0], _same_key)
    for c in categories:
      sel = np.array([c == DB_ALL or k.startswith(c + "_") for k in keys])
      if not sel.any():
        raise ValueError(f"{paths[0]}: no key of category {c!r}")
      r = [pearson(scores[sel], h[sel]) for h in (h1, h2)]
      per_method[c].append(np.mean(r))
  return {c: fisher_z_mean(r, 0.9999) for c, r in per_method.items()}


def dreambench_scores(ref_emb, gen_emb, keys):
  """{key: 100 * cos(ref, generated)} in the given key order.

  Args:
    ref_emb: (N, D) embeddings of each key's reference image.
    gen_emb: (N, D) embeddings of each key's generated image.
    keys: N image keys, in the human files' order (`dreambench_keys`).
  """
  ref_emb, gen_emb = np.asarray(ref_emb), np.asarray(gen_emb)
  if ref_emb.ndim != 2 or ref_emb.shape != gen_emb.shape:
    raise ValueError(f"ref_emb {ref_emb.shape} and gen_emb {gen_emb.shape} "
                     "must be equal (N, D) shapes")
  if len(keys) != ref_emb.shape[0]:
    raise ValueError(f"{len(keys)} keys for {ref_emb.shape[0]} embedding "
                     "pairs")
  scores = 100.0 * np.asarray(cosine_rows(ref_emb.astype(np.float32),
                                          gen_emb.astype(np.float32)))
  return {k: float(s) for k, s in zip(keys, scores)}


def write_dreambench_scores(scores, scores_dir, method):
  """Writes `dreambench_scores` output as scores_dir/{method}.json."""
  os.makedirs(scores_dir, exist_ok=True)
  path = os.path.join(scores_dir, f"{method}.json")
  with open(path, "w") as f:
    json.dump(scores, f)
  return path
