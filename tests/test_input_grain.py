"""grain pipelines: training groups (SPEC §4), sharding, restore, eval rows."""
import io
import itertools
import re
import shutil

import numpy as np
from PIL import Image
import pytest

import input_pipeline
from input_pipeline import grain_pipeline
from input_pipeline import groups
from input_pipeline import hf_format
from input_pipeline import splits as splits_lib
from input_pipeline import synthetic
from input_pipeline import preprocess

SOURCES = ("Flux", "Qwen")
N = 12
TRAIN = splits_lib.seeded(N, 0)["train"]


def _config(manual_dir, data_dir, **kw):
  cfg = input_pipeline.default_config()
  cfg.manual_dir, cfg.data_dir = str(manual_dir), str(data_dir)
  cfg.sources = cfg.eval_sources = SOURCES
  cfg.res, cfg.batch_size, cfg.mtg_repeat = 32, 3, 0
  cfg.num_threads, cfg.num_workers = 1, 0
  cfg.update(kw)
  return cfg


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  manual = tmp_path_factory.mktemp("hf")
  synthetic.generate(str(manual), N, 32, seed=0, sources=SOURCES, mtg=6)
  cfg = _config(manual, tmp_path_factory.mktemp("tfds"))
  input_pipeline.prepare(cfg)
  return manual, cfg


def _decode(data, mode="RGB"):
  return np.asarray(Image.open(io.BytesIO(data)).convert(mode))


def _hf(manual):
  """Reference images straight from the HF files, by row."""
  pos = hf_format.Table(str(manual / "NearID"))
  neg = {s: hf_format.Table(str(manual / f"NearID-{s}")) for s in SOURCES}
  def view(r, k):
    return _decode(pos.row(r)[f"images{k + 1}"]["bytes"])
  def mask(r, k):
    return _decode(pos.row(r)[f"masks{k + 1}"]["bytes"], "L") > 0
  def dist(r, k, s):
    return _decode(neg[s].row(r)[f"nimg{k + 1}"]["bytes"])
  n_images = lambda r: pos.row(r)["n_images"]
  return view, mask, dist, n_images


def _take(it, n):
  return [next(it) for _ in range(n)]


def _groups(batches):
  keys = batches[0].keys()
  return [{k: b[k][i] for k in keys} for b in batches
          for i in range(len(b["index"]))]


def test_groups_are_right(data):
  manual, cfg = data
  view, mask, dist, n_images = _hf(manual)
  anchors = {r: set() for r in TRAIN}
  drawn = {s: 0 for s in SOURCES}
  epochs = 20
  batches = _take(input_pipeline.train_iterator(cfg, 0, 1),
                  epochs * len(TRAIN) // cfg.batch_size)
  assert batches[0]["views"].shape == (3, 3, 32, 32, 3)
  assert batches[0]["views"].dtype == np.uint8
  groups = _groups(batches)
  for e in range(epochs):  # each epoch is every training row once
    epoch = groups[e * len(TRAIN):(e + 1) * len(TRAIN)]
    assert sorted(int(g["index"]) for g in epoch) == TRAIN
  for g in groups:
    r, n = int(g["index"]), n_images(int(g["index"]))
    assert not g["is_mtg"] and g["n_skipped"] == 0
    np.testing.assert_array_equal(g["view_mask"], np.arange(3) < n)
    np.testing.assert_array_equal(g["distractor_mask"], np.arange(3) < n)
    assert not g["views"][n:].any() and not g["distractors"][n:].any()
    # Each view slot holds one of the row's views, each view exactly once.
    perm = [next(k for k in range(n) if np.array_equal(g["views"][j],
                                                       view(r, k)))
            for j in range(n)]
    assert sorted(perm) == list(range(n))
    anchors[r].add(perm[0])
    for j, k in enumerate(perm):
      # Distractor slot j: the row's distractor on view k's background.
      src = [s for s in SOURCES
             if np.array_equal(g["distractors"][j], dist(r, k, s))]
      assert src
      drawn[src[0]] += 1
      bg = ~mask(r, k)
      np.testing.assert_array_equal(g["distractors"][j][bg],
                                    g["views"][j][bg])
  for r in TRAIN:  # every valid view served as anchor
    assert anchors[r] == set(range(n_images(r))), r
  total = sum(drawn.values())
  assert all(d > 0.35 * total for d in drawn.values()), drawn  # uniform


def test_mtg_groups_mixed_in_with_repeats(data):
  manual, cfg = data
  mtg = hf_format.Table(str(manual / "mtg-dataset"), "train")
  cfg = _config(manual, cfg.data_dir, mtg_repeat=2, batch_size=1)
  per_epoch = len(TRAIN) + 2 * len(mtg)
  groups = _groups(_take(input_pipeline.train_iterator(cfg, 0, 1),
                         per_epoch))
  seen = [int(g["index"]) for g in groups if g["is_mtg"]]
  assert sorted(seen) == sorted(list(range(len(mtg))) * 2)
  assert sorted(int(g["index"]) for g in groups if not g["is_mtg"]) == TRAIN
  for g in groups:
    if not g["is_mtg"]:
      continue
    row = mtg.row(int(g["index"]))
    np.testing.assert_array_equal(g["view_mask"], [True, True, False])
    np.testing.assert_array_equal(g["distractor_mask"], [True, True, False])
    for j in range(2):
      k = next(k for k in range(2) if np.array_equal(
          g["views"][j], _decode(row[f"image_{k + 1}_original"]["bytes"])))
      edit = _decode(row[f"image_{k + 1}_inpainted"]["bytes"])
      np.testing.assert_array_equal(g["distractors"][j], edit)


def test_groups_do_not_depend_on_the_batch_size(data):
  _, cfg = data
  make = lambda b: input_pipeline.train_iterator(_config(
      cfg.manual_dir, cfg.data_dir, mtg_repeat=1, batch_size=b), 0, 1)
  batches = _take(make(4), 6)  # > 1 epoch of NearID and MTG entries
  # Batches mixing both datasets are made as one.
  assert any(0 < b["is_mtg"].sum() < 4 for b in batches)
  _assert_same(_groups(batches), _groups(_take(make(1), 24)))


def test_encoded_images_keep_trailing_nul_bytes():
  # (A fixed-width numpy bytes array would strip them.)
  cells = grain_pipeline._cells([b"png\x00\x00", b"\x00"])  # pylint: disable=protected-access
  assert list(cells) == [b"png\x00\x00", b"\x00", b""]


@pytest.mark.parametrize("count", [2, 4])
def test_process_shards_are_disjoint_and_cover_the_split(data, count):
  _, cfg = data
  cfg = _config(cfg.manual_dir, cfg.data_dir, batch_size=count)  # b = 1
  single = _groups(_take(input_pipeline.train_iterator(cfg, 0, 1),
                         2 * len(TRAIN) // count + 1))
  shards = []
  for p in range(count):
    local = _groups(_take(input_pipeline.train_iterator(cfg, p, count),
                          -(-2 * len(TRAIN) // count)))
    # Local element i is global position p + i * count.
    shards.append({p + i * count: g for i, g in enumerate(local)})
    for pos, g in shards[-1].items():
      if pos < len(single):  # the same group as in a one-process run
        np.testing.assert_array_equal(g["views"], single[pos]["views"])
  for epoch in (0, 1):
    rows = [[int(g["index"]) for pos, g in shard.items()
             if pos // len(TRAIN) == epoch] for shard in shards]
    for a, b in itertools.combinations(rows, 2):
      assert not set(a) & set(b)
    assert sorted(sum(rows, [])) == TRAIN


def _assert_same(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])


def test_restored_iterator_continues_exactly(data):
  _, cfg = data
  cfg = _config(cfg.manual_dir, cfg.data_dir, mtg_repeat=1, batch_size=4)
  it = input_pipeline.train_iterator(cfg, 1, 2)
  _take(it, 5)
  state = it.get_state()
  expected = _take(it, 6)
  restored = input_pipeline.train_iterator(cfg, 1, 2)
  restored.set_state(state)
  _assert_same(_take(restored, 6), expected)
  # A fresh iterator with the same seed repeats; another seed does not.
  _assert_same(_take(input_pipeline.train_iterator(cfg, 1, 2), 11),
               _take(input_pipeline.train_iterator(cfg, 1, 2), 11))
  cfg.seed = 1
  other = _take(input_pipeline.train_iterator(cfg, 1, 2), 1)[0]
  assert not np.array_equal(other["views"], expected[0]["views"])


def test_iterator_saved_and_restored_with_orbax(data, tmp_path):
  ocp = pytest.importorskip("orbax.checkpoint")
  import grain  # pylint: disable=g-import-not-at-top
  _, cfg = data
  it = input_pipeline.train_iterator(cfg, 0, 1)
  _take(it, 2)
  with ocp.CheckpointManager(tmp_path) as mngr:
    mngr.save(2, args=ocp.args.Composite(
        data=grain.checkpoint.CheckpointSave(it)))
    mngr.wait_until_finished()
    expected = _take(it, 3)
    restored = input_pipeline.train_iterator(cfg, 0, 1)
    mngr.restore(2, args=ocp.args.Composite(
        data=grain.checkpoint.CheckpointRestore(restored)))
  _assert_same(_take(restored, 3), expected)


@pytest.mark.parametrize("count", [1, 2])
def test_eval_batches_in_order_padded(data, count):
  manual, cfg = data
  view, _, dist, n_images = _hf(manual)
  rows = splits_lib.seeded(N, 0)["test"]
  assert len(rows) == 2
  sources = ("Qwen", "Flux")
  parts = [list(input_pipeline.eval_batches(cfg, "test", sources, 4, "nearid",
                                            p, count)) for p in range(count)]
  assert len({len(p) for p in parts}) == 1
  # Global batch j = the processes' local batches in process order.
  glob = [{k: np.concatenate([p[j][k] for p in parts]) for k in parts[0][j]}
          for j in range(len(parts[0]))]
  assert len(glob) == 1
  b = glob[0]
  np.testing.assert_array_equal(b["index"], rows + [-1, -1])
  np.testing.assert_array_equal(b["valid"], [True, True, False, False])
  assert b["distractors"].shape == (4, 2, 3, 32, 32, 3)
  assert not b["view_mask"][2:].any() and not b["distractor_mask"][2:].any()
  for i, r in enumerate(rows):
    n = n_images(r)
    np.testing.assert_array_equal(b["view_mask"][i], np.arange(3) < n)
    for k in range(n):
      np.testing.assert_array_equal(b["views"][i, k], view(r, k))
      for s, name in enumerate(sources):
        np.testing.assert_array_equal(b["distractors"][i, s, k],
                                      dist(r, k, name))


def test_mtg_eval_rows_and_oracle(data):
  manual, cfg = data
  mtg = hf_format.Table(str(manual / "mtg-dataset"), "test")
  (b,) = list(input_pipeline.eval_batches(cfg, "test", batch_size=2,
                                          dataset="mtg"))
  np.testing.assert_array_equal(b["valid"], [True, False])
  row = mtg.row(0)
  for k in range(2):
    obj = _decode(row[f"image_{k + 1}_object_mask"]["bytes"], "L") > 0
    part = _decode(row[f"image_{k + 1}_part_mask"]["bytes"], "L") > 0
    assert b["oracle"][0, k] == pytest.approx(1 - part.sum() / obj.sum())
    np.testing.assert_array_equal(
        b["distractors"][0, 0, k],
        _decode(row[f"image_{k + 1}_inpainted"]["bytes"]))
  np.testing.assert_array_equal(b["view_mask"][0], [True, True, False])


def test_truncated_shard_is_named_before_training(data, tmp_path):
  _, cfg = data
  shutil.copytree(cfg.data_dir, tmp_path / "tfds")
  (shard,) = (tmp_path / "tfds").rglob("nearid-train.array_record-*")
  shard.write_bytes(shard.read_bytes()[:shard.stat().st_size // 2])
  cut = _config(cfg.manual_dir, tmp_path / "tfds")
  with pytest.raises(input_pipeline.DataError,
                     match=re.escape(str(shard)) + ": unreadable ArrayRecord "
                     "shard .*run prepare again"):
    input_pipeline.train_iterator(cut, 0, 1)


def test_truncated_jpeg_is_named_or_skipped():
  buf = io.BytesIO()
  Image.fromarray(np.random.default_rng(0).integers(
      0, 256, (64, 64, 3), np.uint8)).save(buf, "JPEG")
  cut = buf.getvalue()[:len(buf.getvalue()) // 2]
  where = "NearID split 'train' row 3 field 'images1'"
  with pytest.raises(input_pipeline.CorruptImage,
                     match=f"{where}: corrupt image .*truncated"):
    groups.Decoder(16)(cut, where, [])
  skipped = []
  assert groups.Decoder(16, skip_corrupt=True)(cut, where, skipped) is None
  assert skipped == [where]


def _truncated(png):
  return png[:len(png) // 2]  # the header parses; decoding fails


@pytest.fixture(scope="module")
def corrupt(tmp_path_factory):
  """A distractor and a view whose bytes are cut short (prepare passes)."""
  pos, neg = synthetic.nearid_rows(N, 32, 0, SOURCES)
  r = TRAIN[0]
  for s in SOURCES:
    neg[s]["nimg2"][1][r] = _truncated(neg[s]["nimg2"][1][r])
  pos["images1"][1][TRAIN[1]] = _truncated(pos["images1"][1][TRAIN[1]])
  manual = tmp_path_factory.mktemp("bad")
  synthetic.write_nearid(str(manual), pos, neg, splits_lib.seeded(N, 0))
  cfg = _config(manual, tmp_path_factory.mktemp("bad_tfds"), batch_size=9)
  input_pipeline.prepare(cfg)
  return cfg


def test_corrupt_image_stops_with_its_place(corrupt):
  with pytest.raises(input_pipeline.CorruptImage,
                     match=r"(NearID-(Flux|Qwen) split 'train' row "
                     rf"{TRAIN[0]} field 'nimg2'|NearID split 'train' row "
                     rf"{TRAIN[1]} field 'images1') \(record \d+ of "
                     r"\S+/nearid-train.array_record-00000-of-00001, id "
                     r"\d+\): corrupt image"):
    next(input_pipeline.train_iterator(corrupt, 0, 1))


def test_corrupt_image_names_the_users_column_shard_record_and_id(tmp_path):
  """Positives with the dataset card's img1..3: a view that does not decode
  is named by its column, its ArrayRecord shard and record, and its row id,
  in training and in evaluation."""
  pos, neg = synthetic.nearid_rows(N, 32, 0, SOURCES)
  pos = {(f"img{c[6:]}" if c.startswith("images") else c): v
         for c, v in pos.items()}
  test = splits_lib.seeded(N, 0)["test"]
  for r in (TRAIN[2], test[0]):
    pos["img2"][1][r] = _truncated(pos["img2"][1][r])
  synthetic.write_nearid(str(tmp_path / "hf"), pos, neg,
                         splits_lib.seeded(N, 0))
  cfg = _config(tmp_path / "hf", tmp_path / "tfds", batch_size=9)
  shard = str(input_pipeline.prepare(cfg)["nearid"]) + "/nearid-{}.array_record"
  for split, r, read in (
      ("train", TRAIN[2], lambda: next(input_pipeline.train_iterator(cfg, 0,
                                                                     1))),
      ("test", test[0], lambda: list(input_pipeline.eval_batches(cfg,
                                                                 "test")))):
    with pytest.raises(input_pipeline.CorruptImage,
                       match=rf"^NearID split '{split}' row {r} field 'img2' "
                       rf"\(record {splits_lib.seeded(N, 0)[split].index(r)} "
                       rf"of {re.escape(shard.format(split))}-00000-of-00001, "
                       rf"id {pos['id'][1][r]}\): corrupt image"):
      read()


def test_corrupt_image_skipped_masks_and_counts(corrupt):
  corrupt = _config(corrupt.manual_dir, corrupt.data_dir, batch_size=9,
                    skip_corrupt=True)
  (b,) = _take(input_pipeline.train_iterator(corrupt, 0, 1), 1)
  g = {int(i): {k: v[j] for k, v in b.items()} for j, i in
       enumerate(b["index"])}
  assert sorted(g) == TRAIN
  bad_dist, bad_view = g[TRAIN[0]], g[TRAIN[1]]
  assert bad_dist["n_skipped"] == 1 and bad_view["n_skipped"] == 1
  assert bad_dist["view_mask"].sum() == bad_dist["distractor_mask"].sum() + 1
  # The view that did not decode is gone; its distractor with it.
  n = bad_view["view_mask"].sum()
  assert bad_view["distractor_mask"].sum() == n
  assert sum(int(x["n_skipped"]) for x in g.values()) == 2
  (e,) = list(input_pipeline.eval_batches(corrupt, "train", batch_size=9))
  i, j = list(e["index"]).index(TRAIN[0]), list(e["index"]).index(TRAIN[1])
  assert e["n_skipped"][i] == len(SOURCES) and e["n_skipped"][j] == 1
  assert not e["distractor_mask"][i, :, 1].any()
  assert not e["view_mask"][j, 0] and not e["distractor_mask"][j, :, 0].any()


def test_resize_uint8_matches_preprocess():
  image = np.random.default_rng(0).integers(0, 256, (37, 50, 3), np.uint8)
  for method in ("pil", "tf"):
    got = preprocess.scale(preprocess.resize_uint8(image, 24, method))
    want = preprocess.resize(image, 24, method)
    tol = 0 if method == "pil" else 0.5 / 127.5 + 1e-6
    np.testing.assert_allclose(got, want, atol=tol, rtol=0)
