"""report.json / report.md / plots / samples.csv, and the numbers behind
the plots."""
import csv
import json
import os

import numpy as np
from PIL import Image

from nearid_jax.evaluators import embed
from nearid_jax.evaluators import nearid
from nearid_jax.evaluators import report

SOURCES = ("Flux", "Qwen")


def unit(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def fake_embedded(n=8, d=6, seed=0):
  rng = np.random.default_rng(seed)
  view_mask = np.ones((n, 3), bool)
  view_mask[::3, 2] = False
  dmask = np.broadcast_to(view_mask[:, None], (n, len(SOURCES), 3)).copy()
  dmask[1, 0, 1] = False
  views = {h: unit(rng.standard_normal((n, 3, d))).astype(np.float32)
           for h in ("baseline", "trained")}
  dists = {h: unit(rng.standard_normal((n, len(SOURCES), 3, d))).astype(
      np.float32) for h in views}
  return embed.Embedded("test", SOURCES, np.arange(10, 10 + n), view_mask,
                           dmask, views, dists)


def fake_scores(seed=0, mtg=True):
  rng = np.random.default_rng(seed)
  r = lambda: float(rng.uniform())
  scores = {}
  for h in ("baseline", "trained"):
    s = {"nearid": {
        "sources": {src: {"ssr": r(), "pa": r(), "n_samples": 8,
                          "n_margins": 40} for src in SOURCES},
        "pooled": {"ssr": r(), "pa": r(), "n_samples": 16, "n_margins": 80},
        "pooled_sources": list(SOURCES),
        "retrieval": {"r@1": r(), "r@5": r(), "r@10": r(), "map": r(),
                      "n_queries": 21}}}
    if mtg:
      s["mtg"] = {"ssr": r(), "pa": r(), "mo": r() - 0.5,
                  "mo_pair": r() - 0.5, "n_samples": 4}
    scores[h] = s
  scores["trained"]["dreambench"] = {"object": 0.545}
  return scores


def parse_tables(md):
  """Every markdown table as a list of {header: cell} rows."""
  tables, cur = [], None
  for line in md.splitlines():
    if line.startswith("|"):
      cells = [c.strip() for c in line.strip("|").split("|")]
      if cur is None:
        cur = {"header": cells, "rows": []}
      elif not set("".join(cells)) <= {"-"}:
        cur["rows"].append(dict(zip(cur["header"], cells)))
    elif cur is not None:
      tables.append(cur["rows"])
      cur = None
  if cur is not None:
    tables.append(cur["rows"])
  return tables


def test_report_files_and_numbers(tmp_path):
  emb, scores = fake_embedded(), fake_scores()
  curve = tmp_path / "metrics.jsonl"
  with open(curve, "w") as f:
    for step in range(0, 30, 10):
      f.write(json.dumps({"step": step, "train/loss": 3.0 - step / 10}) + "\n")
      f.write(json.dumps({"step": step, "eval/nearid/ssr": step / 30,
                          "baseline/nearid/ssr": 0.1}) + "\n")
  out = tmp_path / "out"
  meta = {"checkpoint": "ckpt", "split": "test"}
  report.write(str(out), meta, scores, emb, str(curve))
  plots = ("similarity_hist.png", "kernel_pca.png", "training_curve.png")
  for f in plots:
    with Image.open(out / f) as im:
      assert im.format == "PNG" and im.size[0] > 100
  with open(out / "report.json") as f:
    rep = json.load(f)
  assert rep["scores"] == scores and rep["meta"] == meta
  assert rep["plots"] == list(plots)

  with open(out / "report.md") as f:
    md = f.read()
  t1, per_source, retr = parse_tables(md)
  pct = lambda x: f"{100 * x:.2f}"
  for row in t1:
    s = scores[row["scorer"]]
    assert row["NearID SSR"] == pct(s["nearid"]["pooled"]["ssr"])
    assert row["NearID PA"] == pct(s["nearid"]["pooled"]["pa"])
    assert row["MTG M-O"] == f"{s['mtg']['mo']:.3f}"
    assert row["M-O_pair"] == f"{s['mtg']['mo_pair']:.3f}"
    assert row["MTG SSR"] == pct(s["mtg"]["ssr"])
    assert row["MTG PA"] == pct(s["mtg"]["pa"])
  assert [r["DB++ M-H"] for r in t1] == ["-", "0.545"]
  assert [r["scorer"] for r in t1] == ["baseline", "trained"]
  assert [r["source"] for r in per_source] == list(SOURCES)
  for row in per_source:
    for h in scores:
      for m in ("ssr", "pa"):
        assert row[f"{h} {m.upper()}"] == pct(
            scores[h]["nearid"]["sources"][row["source"]][m])
  for row in retr:
    r = scores[row["scorer"]]["nearid"]["retrieval"]
    assert [row[c] for c in ("R@1", "R@5", "R@10", "mAP")] == [
        pct(r[k]) for k in ("r@1", "r@5", "r@10", "map")]
  for p in plots:
    assert f"]({p})" in md


def test_columns_follow_the_data(tmp_path):
  scores = fake_scores(mtg=False)
  del scores["trained"]["dreambench"]
  rep = report.write(str(tmp_path), {}, scores)  # no embeddings, no curve
  assert list(rep["table1"]["trained"]) == ["NearID SSR", "NearID PA"]
  assert rep["plots"] == []
  assert sorted(os.listdir(tmp_path)) == ["report.json", "report.md",
                                         "table1.csv", "table1.tex"]
  assert not report.plot_curve(_jsonl(tmp_path / "m.jsonl", [{"step": 1}]),
                               str(tmp_path / "c.png"))
  assert not os.path.exists(tmp_path / "c.png")


def _jsonl(path, rows):
  with open(path, "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in rows)
  return str(path)


def test_similarities_match_loops():
  emb = fake_embedded()
  for h in emb.views:
    pos, dist = report.similarities(emb, h)
    want_pos, want_dist = [], []
    for n in range(len(emb.index)):
      for i in range(3):
        for j in range(i + 1, 3):
          if emb.view_mask[n, i] and emb.view_mask[n, j]:
            want_pos.append(emb.views[h][n, i] @ emb.views[h][n, j])
      for s in range(len(SOURCES)):
        for k in range(3):
          if emb.distractor_mask[n, s, k]:
            want_dist.append(emb.views[h][n, k] @ emb.distractors[h][n, s, k])
    np.testing.assert_allclose(pos, want_pos, rtol=1e-5)
    np.testing.assert_allclose(dist, want_dist, rtol=1e-5)


def test_kernel_pca_is_the_best_low_rank_fit_of_the_centred_kernel():
  x = np.random.default_rng(0).standard_normal((12, 5))
  gamma = 0.3
  z = report.kernel_pca(x, n_components=3, gamma=gamma)
  n = len(x)
  k = np.array([[np.exp(-gamma * np.sum((a - b) ** 2)) for b in x]
                for a in x])
  c = np.eye(n) - np.ones((n, n)) / n
  kc = c @ k @ c
  u, s, _ = np.linalg.svd(kc)  # kc is PSD: its SVD is its eigendecomposition
  np.testing.assert_allclose(z @ z.T, (u[:, :3] * s[:3]) @ u[:, :3].T,
                             atol=1e-10)
  np.testing.assert_allclose(z.sum(0), 0, atol=1e-10)  # centred
  np.testing.assert_allclose(np.sum(z ** 2, 0), s[:3], rtol=1e-10)
  # default gamma: 1 / median squared distance
  d2 = np.sum((x[:, None] - x[None]) ** 2, -1)
  auto = 1 / np.median(d2[~np.eye(n, dtype=bool)])
  np.testing.assert_allclose(np.abs(report.kernel_pca(x)),
                             np.abs(report.kernel_pca(x, gamma=auto)),
                             atol=1e-10)


def test_kpca_points_pick_views_and_first_source_distractors():
  emb = fake_embedded()
  pts, ident, is_d = report.kpca_points(emb, "trained", n_identities=2)
  # rows 0 (2 views) and 1 (3 views, first source's distractor 1 missing)
  assert list(ident) == [0] * 4 + [1] * 5
  assert list(is_d) == [False, False, True, True, False, False, False,
                        True, True]
  np.testing.assert_array_equal(pts[7], emb.distractors["trained"][1, 0, 0])
  np.testing.assert_array_equal(pts[8], emb.distractors["trained"][1, 0, 2])


def repool(rows, head, sources):
  """SSR/PA of `sources` from samples.csv's rows alone."""
  wins = {}  # (row, source) -> [margin > 0 for every valid margin]
  for r in rows:
    if r["source"] in sources:
      for k in ("i", "j"):
        if r[f"{head}_margin_{k}"]:
          wins.setdefault((r["row"], r["source"]), []).append(
              float(r[f"{head}_margin_{k}"]) > 0)
  flat = [w for ws in wins.values() for w in ws]
  return {"ssr": np.mean([all(ws) for ws in wins.values()]),
          "pa": np.mean(flat), "n_samples": len(wins), "n_margins": len(flat)}


def test_samples_csv_repools_to_the_report(tmp_path):
  emb = fake_embedded(n=12, seed=3)
  scores = {h: {"nearid": r} for h, r in nearid.nearid_scores(emb).items()}
  report.write(str(tmp_path), {}, scores, emb)
  with open(tmp_path / "samples.csv", newline="") as f:
    rows = list(csv.DictReader(f))
  rep = json.load(open(tmp_path / "report.json"))["scores"]
  for h in ("baseline", "trained"):
    for s in SOURCES:
      got = repool(rows, h, {s})
      want = rep[h]["nearid"]["sources"][s]
      assert got["n_samples"] == want["n_samples"]
      assert got["n_margins"] == want["n_margins"]
      np.testing.assert_allclose([got["ssr"], got["pa"]],
                                 [want["ssr"], want["pa"]], rtol=1e-12)
    got, want = repool(rows, h, set(SOURCES)), rep[h]["nearid"]["pooled"]
    np.testing.assert_allclose([got["ssr"], got["pa"]],
                               [want["ssr"], want["pa"]], rtol=1e-12)
  # The similarities, against loops; a missing distractor leaves cells empty.
  v, n = emb.views["trained"], emb.distractors["trained"]
  for r in rows:
    row = int(r["row"]) - 10
    s, i, j = SOURCES.index(r["source"]), int(r["view_i"]), int(r["view_j"])
    assert emb.view_mask[row, i] and emb.view_mask[row, j]
    np.testing.assert_allclose(float(r["trained_pos"]), v[row, i] @ v[row, j],
                               atol=1e-6)
    for k, view in (("i", i), ("j", j)):
      if emb.distractor_mask[row, s, view]:
        d = v[row, view] @ n[row, s, view]
        np.testing.assert_allclose(float(r[f"trained_dist_{k}"]), d,
                                   atol=1e-6)
        np.testing.assert_allclose(float(r[f"trained_margin_{k}"]),
                                   float(r["trained_pos"]) - d, atol=1e-6)
      else:
        assert r[f"trained_dist_{k}"] == r[f"trained_margin_{k}"] == ""
  # sample_success: every valid margin of the (row, source) wins.
  for h in ("baseline", "trained"):
    for r in rows:
      wins = [float(x[f"{h}_margin_{k}"]) > 0 for x in rows for k in "ij"
              if (x["row"], x["source"]) == (r["row"], r["source"])
              and x[f"{h}_margin_{k}"]]
      assert r[f"{h}_sample_success"] == (str(int(all(wins))) if wins else "")
  # 12 rows, 4 of them with 2 views: (8 * 3 + 4) pairs per source.
  assert len(rows) == 2 * (8 * 3 + 4)


def _tex_rows(tex):
  """The data rows (cells) of each tabular in a .tex text."""
  tables, cur = [], None
  for line in tex.splitlines():
    if line.startswith(r"\midrule"):
      cur = [] if cur is None else cur
    elif line.startswith(r"\bottomrule"):
      tables.append(cur)
      cur = None
    elif cur is not None:
      cur.append([c.strip() for c in line.rstrip("\\ ").split("&")])
  return tables


def test_table1_tex_and_csv(tmp_path):
  scores = fake_scores()
  for s in scores.values():  # a source name LaTeX needs escaped
    s["nearid"]["sources"]["Flux_1024"] = s["nearid"]["sources"].pop("Qwen")
  report.write(str(tmp_path), {}, scores)
  pct = lambda x: f"{100 * x:.2f}"
  main, per_source = _tex_rows((tmp_path / "table1.tex").read_text())
  for row, h in zip(main, ("baseline", "trained"), strict=True):
    s = scores[h]
    assert row == [h, pct(s["nearid"]["pooled"]["ssr"]),
                   pct(s["nearid"]["pooled"]["pa"]), f"{s['mtg']['mo']:.3f}",
                   f"{s['mtg']['mo_pair']:.3f}", pct(s["mtg"]["ssr"]),
                   pct(s["mtg"]["pa"]),
                   "--" if h == "baseline" else "0.545"]
  names = {"Flux": "Flux", r"Flux\_1024": "Flux_1024"}
  assert [r[0] for r in per_source] == list(names) + ["pooled"]
  for row in per_source:
    r = {h: (scores[h]["nearid"]["pooled"] if row[0] == "pooled" else
             scores[h]["nearid"]["sources"][names[row[0]]]) for h in scores}
    assert row[1:] == [pct(r[h][m]) for m in ("ssr", "pa")
                       for h in ("baseline", "trained")]
  tex = (tmp_path / "table1.tex").read_text()
  assert r"M-O\_pair" in tex and "Flux_1024" not in tex
  with open(tmp_path / "table1.csv", newline="") as f:
    rows = list(csv.DictReader(f))
  for row in rows:
    s = scores[row["scorer"]]
    assert float(row["NearID SSR"]) == 100 * s["nearid"]["pooled"]["ssr"]
    assert float(row["MTG M-O"]) == s["mtg"]["mo"]
    assert float(row["NearID Flux_1024 PA"]) == (
        100 * s["nearid"]["sources"]["Flux_1024"]["pa"])
  assert [r["DB++ M-H"] for r in rows] == ["", "0.545"]
