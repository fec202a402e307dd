"""SSR/PA, MTG and DreamBench++ M-H vs plain numpy written from SPEC §5."""
import itertools
import json
import os
import shutil

import numpy as np
import pytest

from input_pipeline import oracle
from nearid_jax import metrics



def cos(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return a @ b / (np.linalg.norm(a) * np.linalg.norm(b))


def np_ssr_pa(views, view_mask, distractors, distractor_mask):
  """SPEC §5 as loops: pairs (i, j), margins m_i and m_j, a win is > 0."""
  all_won, wins, total = [], 0, 0
  for v, vm, n, nm in zip(views, view_mask, distractors, distractor_mask):
    margins = []
    for i, j in itertools.combinations(range(len(v)), 2):
      if vm[i] and vm[j]:
        if nm[i]:
          margins.append(cos(v[i], v[j]) - cos(v[i], n[i]))
        if nm[j]:
          margins.append(cos(v[i], v[j]) - cos(v[j], n[j]))
    if margins:
      all_won.append(all(m > 0 for m in margins))
      wins += sum(m > 0 for m in margins)
      total += len(margins)
  return dict(ssr=np.mean(all_won), pa=wins / total, n_samples=len(all_won),
              n_margins=total)


def nearid_data(rng, n, v=3, d=8):
  """Views around a per-sample centre; distractors at varying distances."""
  centre = rng.standard_normal((n, 1, d))
  views = centre + 0.6 * rng.standard_normal((n, v, d))
  spread = rng.uniform(0.2, 2.0, (n, v, 1))
  distractors = centre + spread * rng.standard_normal((n, v, d))
  return views.astype(np.float32), distractors.astype(np.float32)


def check_close(got, want):
  assert got["n_samples"] == want["n_samples"]
  assert got["n_margins"] == want["n_margins"]
  np.testing.assert_allclose([got["ssr"], got["pa"]], [want["ssr"], want["pa"]],
                             rtol=1e-12)


def test_ssr_pa_matches_numpy_with_masks():
  rng = np.random.default_rng(0)
  views, distractors = nearid_data(rng, 200)
  view_mask = rng.random((200, 3)) < 0.8  # some samples keep < 2 views
  distractor_mask = rng.random((200, 3)) < 0.8
  distractors[:20, 0] = views[:20, 2]  # exact ties for pair (0, 2)
  want = np_ssr_pa(views, view_mask, distractors, distractor_mask)
  assert 0 < want["ssr"] < want["pa"] < 1 and want["n_samples"] < 200
  got = metrics.ssr_pa(views, view_mask, distractors, distractor_mask)
  check_close(got, want)


def test_ssr_pa_exact_ties_lose():
  rng = np.random.default_rng(1)
  # Two views almost equal and distractors far off: every margin wins ...
  centre = rng.standard_normal((6, 1, 8))
  views = (centre + 0.01 * rng.standard_normal((6, 2, 8))).astype(np.float32)
  distractors = rng.standard_normal((6, 2, 8)).astype(np.float32)
  # ... except exact ties: a distractor equal to the other view, also as a
  # scaled copy (cosines are normalised inside).
  distractors[0, 0] = views[0, 1]  # m_0 = 0
  distractors[1, 1] = 2.0 * views[1, 0]  # m_1 = 0
  mask = np.ones((6, 2), bool)
  margins, valid = metrics.nearid_margins(views, mask, distractors, mask)
  assert valid.all() and margins.shape == (6, 2)
  assert margins[0, 0] == 0 and margins[1, 1] == 0
  got = metrics.ssr_pa(views, mask, distractors, mask)
  assert got["ssr"] == 4 / 6 and got["pa"] == 10 / 12
  check_close(got, np_ssr_pa(views, mask, distractors, mask))


def test_pooled_sources_equal_concatenated_samples():
  rng = np.random.default_rng(2)
  views, distractors = nearid_data(rng, 30)
  mask = rng.random((30, 3)) < 0.9
  _, other = nearid_data(rng, 30)
  parts = [metrics.nearid_margins(views, mask, d, mask)
           for d in (distractors, other)]
  pooled = metrics.ssr_from_margins(np.concatenate([p[0] for p in parts]),
                                    np.concatenate([p[1] for p in parts]))
  want = np_ssr_pa(np.concatenate([views, views]), np.concatenate([mask, mask]),
                   np.concatenate([distractors, other]),
                   np.concatenate([mask, mask]))
  check_close(pooled, want)


def test_ssr_pa_errors():
  views = np.ones((4, 3, 8), np.float32)
  mask = np.ones((4, 3), bool)
  with pytest.raises(ValueError, match=r"distractors have shape \(4, 3, 6\); "
                     r"expected views' shape \(4, 3, 8\)"):
    metrics.ssr_pa(views, mask, np.ones((4, 3, 6)), mask)
  with pytest.raises(ValueError, match=r"view_mask has shape \(4, 2\)"):
    metrics.ssr_pa(views, mask[:, :2], views, mask)
  with pytest.raises(ValueError, match="no valid margin among 0 samples"):
    metrics.ssr_pa(views[:0], mask[:0], views[:0], mask[:0])
  with pytest.raises(ValueError, match="no valid margin among 4 samples"):
    metrics.ssr_pa(views, mask, views, np.zeros_like(mask))


def np_fisher(rs, clip):
  return np.tanh(np.mean(np.arctanh(np.clip(rs, -clip, clip))))


def test_mtg_matches_numpy():
  rng = np.random.default_rng(3)
  s = rng.uniform(0, 1, (5, 50))
  o1, o2 = rng.uniform(0, 1, (2, 50))
  s[2] += o2  # correlate s(I2, I2') with its oracle
  s[1, :5] = s[0, :5]  # ties: s(I1, I2) == s(I1, I1') loses
  got = metrics.mtg(*s, o1, o2)
  m1, m2 = s[0] - s[1] > 0, s[0] - s[2] > 0
  r = [np.corrcoef(s[1], o1)[0, 1], np.corrcoef(s[2], o2)[0, 1],
       np.corrcoef(s[3], o2)[0, 1], np.corrcoef(s[4], o1)[0, 1]]
  np.testing.assert_allclose(
      [got["ssr"], got["pa"], got["mo"], got["mo_pair"]],
      [np.mean(m1 & m2), (m1.sum() + m2.sum()) / 100, np_fisher(r, 0.999),
       np_fisher(r[:2], 0.999)], rtol=1e-12)
  assert got["n_samples"] == 50
  with pytest.raises(ValueError, match=r"o2 has shape \(49,\)"):
    metrics.mtg(*s, o1, o2[:49])


def test_mtg_oracle():
  rng = np.random.default_rng(4)
  obj = rng.random((20, 30)) < 0.6
  part = obj & (rng.random((20, 30)) < 0.3)
  want = 1 - part.sum() / obj.sum()
  assert oracle.mtg_oracle(part, obj) == pytest.approx(want, rel=1e-12)
  # 0/255 RGB masks read from PNGs count the same pixels.
  rgb = lambda m: np.repeat(m[..., None] * np.uint8(255), 3, -1)
  assert oracle.mtg_oracle(rgb(part), rgb(obj)) == pytest.approx(want,
                                                                  rel=1e-12)
  assert oracle.mtg_oracle(None, obj) == 0.0
  assert oracle.mtg_oracle(part, None) == 0.0


# --- DreamBench++ ---


def np_mh(human, scores, methods, category):
  """Fisher-z over methods of the two groups' mean Pearson r (category None:
  every key)."""
  zs = []
  for m in methods:
    keys = list(human["group1"][m])
    sel = [i for i, k in enumerate(keys)
           if category is None or k.startswith(category + "_")]
    x = np.array(list(scores[m].values()))[sel]
    r = [np.corrcoef(x, np.array(list(human[g][m].values()))[sel])[0, 1]
         for g in ("group1", "group2")]
    zs.append(np.arctanh(np.clip(np.mean(r), -0.9999, 0.9999)))
  return np.tanh(np.mean(zs))


def write_json(path, obj):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    json.dump(obj, f)


def synthetic_human(tmp_path, rng, methods=("m_a", "m_b")):
  keys = [f"{c}_{i:02d}_thing-{j}" for c in metrics.DB_CATEGORIES
          for i in range(2) for j in range(4)]
  human = {g: {m: {k: int(rng.integers(0, 5)) for k in keys} for m in methods}
           for g in ("group1", "group2")}
  for g, per_method in human.items():
    for m, ratings in per_method.items():
      write_json(str(tmp_path / "human" / g / f"{m}-cp.json"), ratings)
  return human, keys


@pytest.mark.parametrize("scorer,published", [
    ("dino", dict(object=0.492, live_subject_animal=0.434,
                  live_subject_human=0.248, style=0.374)),
    ("clipi", dict(object=0.493, live_subject_animal=0.364,
                   live_subject_human=0.413, style=0.418)),
])
def test_dreambench_mh_reproduces_published(dreambench, scorer, published):
  got = metrics.dreambench_mh(os.path.join(dreambench, "human"),
                              os.path.join(dreambench, scorer))
  assert {c: round(v, 3) for c, v in got.items()} == published


def test_dreambench_mh_rejects_misaligned_keys(dreambench, tmp_path):
  scores_dir = tmp_path / "scores"
  shutil.copytree(os.path.join(dreambench, "dino"), scores_dir)
  path = scores_dir / "emu2.json"
  scores = json.loads(path.read_text())
  items = list(scores.items())
  items[10], items[11] = items[11], items[10]
  path.write_text(json.dumps(dict(items)))
  with pytest.raises(ValueError, match=rf"emu2.json: key '{items[10][0]}' at "
                     "position 10 does not match"):
    metrics.dreambench_mh(os.path.join(dreambench, "human"), str(scores_dir))
  os.remove(path)
  with pytest.raises(FileNotFoundError, match="emu2.json"):
    metrics.dreambench_mh(os.path.join(dreambench, "human"), str(scores_dir))


def test_dreambench_scores_round_trip(tmp_path):
  rng = np.random.default_rng(5)
  methods = ("m_a", "m_b")
  human, keys = synthetic_human(tmp_path, rng, methods)
  human_dir = str(tmp_path / "human")
  assert metrics.dreambench_keys(human_dir, "m_a") == keys
  scores = {}
  for m in methods:
    ref = rng.standard_normal((len(keys), 12))
    gen = ref + rng.standard_normal((len(keys), 12))
    scores[m] = metrics.dreambench_scores(ref, gen, keys)
    assert list(scores[m]) == keys
    np.testing.assert_allclose(list(scores[m].values()),
                               [100 * cos(a, b) for a, b in zip(ref, gen)],
                               rtol=1e-5)
    metrics.write_dreambench_scores(scores[m], str(tmp_path / "s"), m)
  got = metrics.dreambench_mh(human_dir, str(tmp_path / "s"), methods,
                              metrics.DB_CATEGORIES + (metrics.DB_ALL,))
  for c in metrics.DB_CATEGORIES:
    np.testing.assert_allclose(got[c], np_mh(human, scores, methods, c),
                               rtol=1e-6)
  np.testing.assert_allclose(got[metrics.DB_ALL],
                             np_mh(human, scores, methods, None), rtol=1e-6)


def test_dreambench_metric_key_spellings(tmp_path):
  rng = np.random.default_rng(6)
  human, keys = synthetic_human(tmp_path, rng, ("m_a",))
  values = rng.uniform(0, 100, len(keys))
  # Metric files: a trailing `_<index>` is fine; so is rubik's_cube for
  # magic_cube; anything else is a misalignment.
  human_keys = [k.replace("object_01_thing", "object_01_magic_cube")
                for k in keys]
  write_json(str(tmp_path / "human" / "group1" / "m_a-cp.json"),
             dict(zip(human_keys, human["group1"]["m_a"].values())))
  write_json(str(tmp_path / "human" / "group2" / "m_a-cp.json"),
             dict(zip(human_keys, human["group2"]["m_a"].values())))
  metric_keys = [f"{k.replace('magic_cube', 'rubik' + chr(39) + 's_cube')}_{i}"
                 for i, k in enumerate(human_keys)]
  write_json(str(tmp_path / "s" / "m_a.json"), dict(zip(metric_keys, values)))
  got = metrics.dreambench_mh(str(tmp_path / "human"), str(tmp_path / "s"),
                              ("m_a",))
  want = np_mh(human, {"m_a": dict(zip(keys, values))}, ("m_a",), "style")
  np.testing.assert_allclose(got["style"], want, rtol=1e-12)
  metric_keys[3] = metric_keys[3].replace("thing-3", "thing-4")
  write_json(str(tmp_path / "s" / "m_a.json"), dict(zip(metric_keys, values)))
  with pytest.raises(ValueError, match=r"m_a.json: key .*thing-4_3' at "
                     "position 3"):
    metrics.dreambench_mh(str(tmp_path / "human"), str(tmp_path / "s"),
                          ("m_a",))
