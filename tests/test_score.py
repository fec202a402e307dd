"""python -m nearid_jax.score against transformers, and its failures."""
import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import pil_images
from conftest import transformers_embed
from input_pipeline import preprocess
from nearid_jax import metrics
from nearid_jax import score

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_images(folder, seed=0, names=None):
  """pil_images() saved as PNG (alpha and palette modes kept) and JPEG."""
  out = []
  for i, im in enumerate(pil_images(seed)):
    ext = "jpg" if im.mode in ("RGB", "L") else "png"
    path = os.path.join(folder, names[i] if names else f"im{i}.{ext}")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    keep = {k: v for k, v in im.info.items() if k == "transparency"}
    im.save(path, **keep)
    out.append(path)
  return out


def write_csv(path, header, rows):
  with open(path, "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(header)
    w.writerows(rows)
  return str(path)


def read_csv(path):
  with open(path, newline="") as f:
    reader = csv.DictReader(f)
    return reader.fieldnames, list(reader)


def reference_cos(directory, a, b):
  """transformers' cosine of each pair of image files."""
  paths = sorted(set(a) | set(b))
  emb = dict(zip(paths, transformers_embed(
      directory, [Image.open(p) for p in paths])))
  return np.array([emb[x] @ emb[y] for x, y in zip(a, b)])


def test_pairs_equal_transformers(siglip_dir, tmp_path, monkeypatch):
  paths = write_images(str(tmp_path / "img"))
  rel = [os.path.relpath(p, tmp_path) for p in paths]
  # Relative and absolute paths, images in several pairs, an extra column.
  pairs = [(rel[i], rel[(i + 1) % len(rel)], f"n{i}") for i in range(len(rel))]
  pairs += [(paths[0], rel[3], "abs"), (rel[2], rel[2], "same")]
  csv_path = write_csv(tmp_path / "pairs.csv", ["a", "b", "note"], pairs)
  reads = []
  read_image = preprocess.read_image
  monkeypatch.setattr(preprocess, "read_image",
                      lambda p: reads.append(p) or read_image(p))
  out = tmp_path / "out" / "scores.csv"
  score.run(siglip_dir, str(out), pairs=csv_path, batch_size=4,
            log=lambda *a: None)
  header, rows = read_csv(out)
  assert header == ["a", "b", "note", "score"]
  assert [(r["a"], r["b"], r["note"]) for r in rows] == pairs
  assert sorted(reads) == sorted(paths)  # each image read once
  want = reference_cos(siglip_dir, [str(tmp_path / r[0]) for r in pairs],
                       [str(tmp_path / r[1]) for r in pairs])
  got = np.array([float(r["score"]) for r in rows])
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
  assert os.listdir(tmp_path / "out") == ["scores.csv"]


def test_folders_pair_by_relative_path(siglip_dir, tmp_path):
  names = ["x.jpg", "sub/y.jpg", "sub/z.png", "w.jpg", "v.png", "u.png",
           "t.png"]
  a = write_images(str(tmp_path / "A"), 0, names)
  write_images(str(tmp_path / "B"), 1, names)
  os.remove(a[1])  # sub/y.jpg only in B
  Image.new("RGB", (9, 9)).save(tmp_path / "A" / "only_a.png")
  lines = []
  out = str(tmp_path / "s.csv")
  score.run(siglip_dir, out, a=str(tmp_path / "A"), b=str(tmp_path / "B"),
            log=lines.append)
  assert any(l.startswith("1 images only in") and "only_a.png" in l
             for l in lines), lines
  assert any(l.startswith("1 images only in") and "sub/y.jpg" in l
             for l in lines), lines
  header, rows = read_csv(out)
  assert header == ["a", "b", "score"]
  paired = sorted(n for n in names if n != "sub/y.jpg")
  assert [os.path.relpath(r["a"], tmp_path / "A") for r in rows] == paired
  want = reference_cos(siglip_dir, [r["a"] for r in rows],
                       [r["b"] for r in rows])
  np.testing.assert_allclose([float(r["score"]) for r in rows], want,
                             atol=1e-4, rtol=0)


@pytest.fixture(name="bad_pairs")
def fixture_bad_pairs(tmp_path):
  write_images(str(tmp_path))
  (tmp_path / "broken.png").write_bytes(b"not an image")
  return write_csv(tmp_path / "p.csv", ["a", "b"], [
      ("im0.jpg", "im1.jpg"), ("im1.jpg", "missing.png"),
      ("broken.png", "im2.png"), ("im3.jpg", "im0.jpg")])


@pytest.mark.parametrize("broken,match", [
    (False, r"p.csv line 3, column b: image .*missing.png: not found"),
    (True, r"p.csv line 4, column a: image .*broken.png: cannot read image"),
])
def test_bad_image_is_named_and_nothing_is_written(siglip_dir, bad_pairs,
                                                   broken, match):
  folder = os.path.dirname(bad_pairs)
  if broken:  # the missing file is there now; the broken one is left
    Image.new("RGB", (5, 5)).save(os.path.join(folder, "missing.png"))
  before = sorted(os.listdir(folder))
  with pytest.raises((FileNotFoundError, ValueError), match=match):
    score.run(siglip_dir, os.path.join(folder, "out.csv"), pairs=bad_pairs,
              log=lambda *a: None)
  assert sorted(os.listdir(folder)) == before


def test_skip_bad_writes_empty_scores(siglip_dir, bad_pairs):
  lines = []
  out = os.path.join(os.path.dirname(bad_pairs), "out.csv")
  score.run(siglip_dir, out, pairs=bad_pairs, skip_bad=True, log=lines.append)
  header, rows = read_csv(out)
  assert header == ["a", "b", "score", "error"]
  assert [r["score"] == "" for r in rows] == [False, True, True, False]
  assert rows[1]["error"] == "b: not found"
  assert rows[2]["error"].startswith("a: cannot read image")
  assert rows[0]["error"] == rows[3]["error"] == ""
  assert "2 of 4 rows not scored" in "\n".join(lines)


def test_csv_without_image_columns(siglip_dir, tmp_path):
  path = write_csv(tmp_path / "p.csv", ["ref", "gen"], [("x", "y")])
  with pytest.raises(ValueError, match=r"p.csv: no column \['a', 'b'\]"):
    score.run(siglip_dir, str(tmp_path / "o.csv"), pairs=path)


def test_dreambench_scores_and_mh(siglip_dir, dreambench, tmp_path):
  # The human files of 2 methods cut to a few keys per category, in file
  # order: per category, keys until every rating vector varies (a Pearson r).
  methods = metrics.DB_METHODS[:2]
  ratings = {(g, m): json.load(open(os.path.join(dreambench, "human", g,
                                                 f"{m}-cp.json")))
             for g in ("group1", "group2") for m in methods}
  keys = []
  for c in metrics.DB_CATEGORIES:
    sel = []
    for k in [k for k in ratings["group1", methods[0]]
              if k.startswith(c + "_")]:
      if len(sel) >= 2 and all(len({r[x] for x in sel}) > 1
                               for r in ratings.values()):
        break
      sel.append(k)
    keys += sel
  keys = [k for k in ratings["group1", methods[0]] if k in set(keys)]
  human = tmp_path / "human"
  for (g, m), r in ratings.items():
    (human / g).mkdir(parents=True, exist_ok=True)
    (human / g / f"{m}-cp.json").write_text(json.dumps({k: r[k] for k in keys}))
  rng = np.random.default_rng(0)
  img = tmp_path / "img"
  img.mkdir()

  def image(name):
    Image.fromarray(rng.integers(0, 256, (24, 20, 3), np.uint8)).save(
        img / name)
    return f"img/{name}"
  refs = {k: image(f"ref_{i}.png") for i, k in enumerate(keys)}
  rows = [(m, k, refs[k], image(f"{m}_{i}.png"))
          for m in methods for i, k in enumerate(keys)]
  rows = [rows[i] for i in rng.permutation(len(rows))]  # order from the CSV
  path = write_csv(tmp_path / "db.csv", ["method", "key", "a", "b"], rows)
  lines = []
  out = tmp_path / "o.csv"
  _, mh = score.run(siglip_dir, str(out), pairs=path,
                    dreambench_dir=str(human), log=lines.append)
  _, written = read_csv(out)
  cos = {(r["method"], r["key"]): float(r["score"]) for r in written}
  scores_dir = tmp_path / "dreambench"
  for m in methods:
    got = json.load(open(scores_dir / f"{m}.json"))
    assert list(got) == keys
    np.testing.assert_allclose([got[k] for k in keys],
                               [100 * cos[m, k] for k in keys], rtol=1e-12)
  want = metrics.dreambench_mh(str(human), str(scores_dir), methods,
                               metrics.DB_CATEGORIES + (metrics.DB_ALL,))
  assert np.isfinite(list(want.values())).all() and mh == want
  for c, v in want.items():
    assert f"  {c}: {v:.4f}" in lines


def test_dreambench_needs_every_key(siglip_dir, tmp_path):
  human = tmp_path / "human" / "group1"
  human.mkdir(parents=True)
  (human / "emu2-cp.json").write_text('{"object_a-0": 1, "object_a-1": 2}')
  Image.new("RGB", (8, 8)).save(tmp_path / "x.png")
  path = write_csv(tmp_path / "p.csv", ["method", "key", "a", "b"],
                   [("emu2", "object_a-0", "x.png", "x.png")])
  with pytest.raises(ValueError, match=r"emu2: pairs do not match .* 1 "
                     r"missing \(first \['object_a-1'\]\)"):
    score.run(siglip_dir, str(tmp_path / "o.csv"), pairs=path,
              dreambench_dir=str(tmp_path / "human"))
  assert not (tmp_path / "o.csv").exists()


@pytest.mark.slow
def test_command_line(siglip_dir, tmp_path):
  paths = write_images(str(tmp_path))
  good = write_csv(tmp_path / "p.csv", ["a", "b"], [(paths[0], paths[1])])
  cmd = [sys.executable, "-m", "nearid_jax.score", "--model", siglip_dir,
         "--out", str(tmp_path / "o.csv")]
  r = subprocess.run(cmd + ["--pairs", good], cwd=REPO, capture_output=True,
                     text=True, check=False)
  assert r.returncode == 0, r.stderr
  assert "images/s" in r.stderr and "ETA" in r.stderr
  _, rows = read_csv(tmp_path / "o.csv")
  want = reference_cos(siglip_dir, paths[:1], paths[1:2])
  np.testing.assert_allclose(float(rows[0]["score"]), want[0], atol=1e-4)
  bad = write_csv(tmp_path / "q.csv", ["a", "b"], [(paths[0], "nope.png")])
  r = subprocess.run(cmd[:-1] + [str(tmp_path / "o2.csv"), "--pairs", bad],
                     cwd=REPO, capture_output=True, text=True, check=False)
  assert r.returncode == 1
  assert "q.csv line 2, column b: image" in r.stderr
  assert not (tmp_path / "o2.csv").exists()


def test_bfloat16_is_close(siglip_dir, tmp_path):
  paths = write_images(str(tmp_path))
  pairs = write_csv(tmp_path / "p.csv", ["a", "b"],
                    [(paths[i], paths[i + 1]) for i in range(len(paths) - 1)])
  got = {}
  for dtype in ("float32", "bfloat16"):
    rows, _ = score.run(siglip_dir, str(tmp_path / f"{dtype}.csv"),
                        pairs=pairs, dtype=dtype, log=lambda *a: None)
    got[dtype] = np.array([float(r["score"]) for r in rows])
  np.testing.assert_allclose(got["bfloat16"], got["float32"], atol=2e-2)
  assert not np.array_equal(got["bfloat16"], got["float32"])


def test_folders_name_the_pair_of_a_bad_image(siglip_dir, tmp_path):
  for d in ("A", "B"):
    (tmp_path / d).mkdir()
    Image.new("RGB", (9, 9)).save(tmp_path / d / "ok.png")
  Image.new("RGB", (9, 9)).save(tmp_path / "A" / "bad.png")
  (tmp_path / "B" / "bad.png").write_bytes(b"truncated")
  with pytest.raises(ValueError, match=r"the pair bad.png, column b: image "
                     r".*B/bad.png: cannot read image"):
    score.run(siglip_dir, str(tmp_path / "o.csv"), a=str(tmp_path / "A"),
              b=str(tmp_path / "B"), log=lambda *a: None)
  assert not (tmp_path / "o.csv").exists()
