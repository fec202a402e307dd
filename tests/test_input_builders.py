"""TFDS builders: HF on-disk NearID/MTG -> ArrayRecord, without TensorFlow."""
import json
import os
import re
import shutil
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tensorflow_datasets as tfds

from fake_data import plant_lock
import input_pipeline
from input_pipeline import locks
from input_pipeline import splits as splits_lib
from input_pipeline import synthetic
from input_pipeline import tfds_builders

SOURCES = ("Flux", "Qwen")


def _config(manual_dir, data_dir, sources=SOURCES, **kw):
  cfg = input_pipeline.default_config()
  cfg.manual_dir, cfg.data_dir = str(manual_dir), str(data_dir)
  cfg.sources = cfg.eval_sources = sources
  cfg.mtg_repeat = 0
  cfg.update(kw)
  return cfg


def _hf_rows(path, split="train"):
  """Reference reader: pyarrow on whichever layout is there."""
  data = os.path.join(path, "data")
  if os.path.isdir(data):
    return pa.concat_tables(
        [pq.read_table(os.path.join(data, f)) for f in sorted(os.listdir(data))
         if f.startswith(split + "-")]).to_pylist()
  folder = os.path.join(path, split)
  with open(os.path.join(folder, "state.json")) as f:
    files = [d["filename"] for d in json.load(f)["_data_files"]]
  return pa.concat_tables(
      [pa.ipc.open_stream(pa.memory_map(os.path.join(folder, n))).read_all()
       for n in files]).to_pylist()


def _plain(x):
  if isinstance(x, dict):
    return {k: _plain(v) for k, v in x.items()}
  return x.tolist() if hasattr(x, "tolist") else x


def _records(prepared_dir, split):
  source = tfds.builder_from_directory(prepared_dir).as_data_source(split)
  return [_plain(source[i]) for i in range(len(source))]


def _image(value):
  return b"" if value is None else value["bytes"]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  manual = tmp_path_factory.mktemp("hf")
  synthetic.generate(str(manual), 12, 32, seed=0, sources=SOURCES, mtg=6)
  cfg = _config(manual, tmp_path_factory.mktemp("tfds"))
  return manual, cfg, input_pipeline.prepare(cfg)


def test_no_tensorflow_needed(built):
  del built
  assert "tensorflow" not in sys.modules


def test_nearid_records_are_the_hf_rows_in_split_order(built):
  manual, _, prepared = built
  pos = _hf_rows(manual / "NearID")
  neg = {s: _hf_rows(manual / f"NearID-{s}") for s in SOURCES}
  for split in ("train", "val", "test"):
    rows = json.loads((manual / "splits" / f"{split}.json").read_text())
    records = _records(prepared["nearid"], split)
    assert [r["index"] for r in records] == rows
    for r, rec in zip(rows, records):
      assert rec["id"].decode() == str(pos[r]["id"])
      assert rec["views"] == [_image(pos[r][f"images{k}"])
                                    for k in (1, 2, 3)]
      assert rec["masks"] == [_image(pos[r][f"masks{k}"])
                                    for k in (1, 2, 3)]
      for s in SOURCES:
        assert rec["distractors"][s] == [
            _image(neg[s][r][f"nimg{k}"]) for k in (1, 2, 3)]


def test_mtg_records(built):
  manual, _, prepared = built
  for split, n in (("train", 5), ("test", 1)):
    rows = _hf_rows(manual / "mtg-dataset", split)
    records = _records(prepared["mtg"], split)
    assert len(records) == len(rows) == n
    for i, (row, rec) in enumerate(zip(rows, records)):
      assert rec["index"] == i
      assert rec["views"] == [row["image_1_original"]["bytes"],
                                    row["image_2_original"]["bytes"]]
      assert rec["edits"] == [row["image_1_inpainted"]["bytes"],
                                    row["image_2_inpainted"]["bytes"]]
      assert rec["part_masks"] == [row["image_1_part_mask"]["bytes"],
                                         row["image_2_part_mask"]["bytes"]]


def test_parquet_builds_the_same_records(built, tmp_path):
  manual, _, prepared = built
  synthetic.generate(str(tmp_path / "hf"), 12, 32, seed=0, sources=SOURCES,
                     mtg=6, fmt="parquet", num_shards=2)
  assert not os.path.exists(tmp_path / "hf" / "NearID" / "train")
  out = input_pipeline.prepare(_config(tmp_path / "hf", tmp_path / "tfds"))
  for split in ("train", "test"):
    assert _records(out["nearid"], split) == _records(prepared["nearid"],
                                                      split)
    assert _records(out["mtg"], split) == _records(prepared["mtg"], split)


def test_seeded_split_without_split_files(built, tmp_path):
  manual, _, _ = built
  shutil.copytree(manual, tmp_path / "hf")
  shutil.rmtree(tmp_path / "hf" / "splits")
  out = input_pipeline.prepare(_config(tmp_path / "hf", tmp_path / "tfds",
                                       split_seed=4))
  got = {s: [r["index"] for r in _records(out["nearid"], s)]
         for s in ("train", "val", "test")}
  assert got == splits_lib.seeded(12, 4)
  assert sorted(sum(got.values(), [])) == list(range(12))


def test_a_subset_of_prepared_sources_is_found(built):
  _, cfg, prepared = built
  builder = tfds_builders.load_nearid(cfg, ("Qwen",))
  assert os.fspath(builder.data_dir) == prepared["nearid"]
  with pytest.raises(input_pipeline.DataError, match="'SDXL'"):
    tfds_builders.load_nearid(cfg, ("Qwen", "SDXL"))


def test_interrupted_prepare_leftovers_removed_and_second_prepare_refused(
    built):
  """A build TFDS left half written (`incomplete.*` beside its version dir,
  after a kill) is removed by the next prepare; a prepare running elsewhere
  in the data dir refuses this one."""
  _, cfg, prepared = built
  version = prepared["nearid"]
  leftover = os.path.join(os.path.dirname(version),
                          "incomplete.AB12CD_" + os.path.basename(version))
  os.makedirs(os.path.join(leftover, "nearid-train.array_record-00000"))
  lines = []
  assert input_pipeline.prepare(cfg, log=lines.append) == prepared
  assert not os.path.exists(leftover)
  assert lines[0] == (f"removed {leftover}: the temporary build of an "
                      "interrupted prepare")
  assert "reused" in lines[1]
  assert not os.path.exists(os.path.join(cfg.data_dir, locks.NAME))

  lock = plant_lock(cfg.data_dir, what="prepare")
  try:
    with pytest.raises(locks.Locked, match=rf"in use by prepare \(pid "
                       rf"{os.getppid()} .*lock file {lock}"):
      input_pipeline.prepare(cfg)
  finally:
    os.remove(lock)


# --- bad input ---------------------------------------------------------------


def _write(root, pos, neg, rows=12):
  synthetic.write_nearid(str(root), pos, neg, splits_lib.seeded(rows, 0))
  return root


def _rows():
  return synthetic.nearid_rows(12, 32, 0, SOURCES)


def _split_of(row):
  return next(k for k, v in splits_lib.seeded(12, 0).items() if row in v)


def test_missing_source_is_named(built, tmp_path):
  manual, _, _ = built
  with pytest.raises(input_pipeline.DataError,
                     match=r"source 'SDXL'.*NearID-SDXL"):
    input_pipeline.prepare(_config(manual, tmp_path, ("Flux", "SDXL")))


def test_ids_that_do_not_match_stop(tmp_path):
  pos, neg = _rows()
  neg["Qwen"]["id"][1][5] += 1
  manual = _write(tmp_path / "hf", pos, neg)
  with pytest.raises(input_pipeline.DataError,
                     match=rf"NearID-Qwen split '{_split_of(5)}' row 5: id"):
    input_pipeline.prepare(_config(manual, tmp_path / "tfds"))
  with pytest.raises(input_pipeline.DataError, match="row 5: id"):  # always
    input_pipeline.prepare(_config(manual, tmp_path / "t2", skip_corrupt=True))


@pytest.mark.parametrize("field,value,what", [
    ("images2", None, "missing"),
    ("images1", b"not an image", "not a readable image"),
    ("n_images", None, "missing"),
])
def test_bad_row_stops_or_is_skipped_and_counted(tmp_path, field, value,
                                                 what):
  pos, neg = _rows()
  pos[field][1][7] = value
  manual = _write(tmp_path / "hf", pos, neg)
  split = _split_of(7)
  with pytest.raises(input_pipeline.DataError,
                     match=rf"NearID split '{split}' row 7 field '{field}': "
                     f"{what}"):
    input_pipeline.prepare(_config(manual, tmp_path / "tfds"))
  out = input_pipeline.prepare(_config(manual, tmp_path / "t2",
                                       skip_corrupt=True))
  records = _records(out["nearid"], split)
  assert 7 not in [r["index"] for r in records]
  assert len(records) == len(splits_lib.seeded(12, 0)[split]) - 1
  meta = tfds.builder_from_directory(out["nearid"]).info.metadata
  assert meta["skipped_rows"][split] == [7]


def test_corrupt_distractor_is_blanked_and_counted(tmp_path):
  pos, neg = _rows()
  neg["Flux"]["nimg1"][1][2] = b"\x89PNG garbage"
  manual = _write(tmp_path / "hf", pos, neg)
  split = _split_of(2)
  with pytest.raises(input_pipeline.DataError,
                     match=rf"NearID-Flux split '{split}' row 2 field 'nimg1'"):
    input_pipeline.prepare(_config(manual, tmp_path / "tfds"))
  out = input_pipeline.prepare(_config(manual, tmp_path / "t2",
                                       skip_corrupt=True))
  rec = next(r for r in _records(out["nearid"], split) if r["index"] == 2)
  assert rec["distractors"]["Flux"][0] == b""
  assert rec["distractors"]["Qwen"][0] == neg["Qwen"]["nimg1"][1][2]
  meta = tfds.builder_from_directory(out["nearid"]).info.metadata
  assert meta["blanked_images"][split] == 1


def test_bad_split_file_is_named(built, tmp_path):
  manual, _, _ = built
  shutil.copytree(manual, tmp_path / "hf")
  (tmp_path / "hf" / "splits" / "val.json").write_text("[40]")
  with pytest.raises(ValueError, match=r"val.json: row 40 out of range"):
    input_pipeline.prepare(_config(tmp_path / "hf", tmp_path / "tfds"))


def test_missing_mtg_is_named_when_required(built, tmp_path):
  manual, _, _ = built
  shutil.copytree(manual, tmp_path / "hf",
                  ignore=shutil.ignore_patterns("mtg-dataset"))
  with pytest.raises(input_pipeline.DataError, match="MTG: .*mtg-dataset"):
    input_pipeline.prepare(_config(tmp_path / "hf", tmp_path / "tfds",
                                   mtg_repeat=4))


# --- a user's data, written by the `datasets` library ------------------------

LAYOUTS = ("save_to_disk", "parquet")


def _datasets_write(path, cols, layout):
  """Columns as synthetic.nearid_rows gives them, written by `datasets` in
  one of the hub's layouts."""
  datasets = pytest.importorskip("datasets")
  features, data = {}, {}
  for name, (kind, values) in cols.items():
    if kind == "image":
      features[name] = datasets.Image()
      values = [None if v is None else {"bytes": v, "path": None}
                for v in values]
    else:
      features[name] = datasets.Value(kind)
    data[name] = values
  ds = datasets.Dataset.from_dict(data, features=datasets.Features(features))
  if layout == "parquet":
    ds.to_parquet(os.path.join(path, "data", "train-00000-of-00001.parquet"))
  else:
    datasets.DatasetDict({"train": ds}).save_to_disk(str(path))


def _user_data(root, layout, pos=None, neg=None, rename=None):
  """A manual dir of positives, SOURCES and split files; rename maps
  (dataset folder, column) -> the user's column name."""
  if pos is None:
    pos, neg = _rows()
  for folder, cols in [("NearID", pos)] + [(f"NearID-{s}", neg[s])
                                           for s in SOURCES]:
    cols = {(rename or {}).get((folder, c), c): v for c, v in cols.items()}
    shutil.rmtree(root / folder, ignore_errors=True)
    _datasets_write(root / folder, cols, layout)
  os.makedirs(root / "splits", exist_ok=True)
  for name, rows in splits_lib.seeded(12, 0).items():
    (root / "splits" / f"{name}.json").write_text(json.dumps(rows))
  return root


def _img_columns(pos):
  """The positives' views as the dataset card names them (img1..3)."""
  return {(f"img{c[6:]}" if c.startswith("images") else c): v
          for c, v in pos.items()}


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("folder,column,renamed,role", [
    ("NearID", "img3", "image3", "positives"),
    ("NearID-Qwen", "nimg2", "nimage2", "distractor source 'Qwen'"),
])
def test_renamed_column_stops_before_anything_is_written(
    tmp_path, layout, folder, column, renamed, role):
  pos, neg = _rows()
  manual = _user_data(tmp_path / "hf", layout, _img_columns(pos), neg,
                      rename={(folder, column): renamed})
  with pytest.raises(input_pipeline.DataError) as e:
    input_pipeline.prepare(_config(manual, tmp_path / "tfds"))
  msg = str(e.value)
  assert msg.startswith(f"{role} {manual / folder}: missing column(s) "
                        f"['{column}']; columns found: ["), msg
  assert f"'{renamed}'" in msg
  assert not os.path.exists(tmp_path / "tfds")


@pytest.mark.parametrize("layout", LAYOUTS)
def test_user_column_names_build_the_same_records(built, tmp_path, layout):
  """img1..3 (the dataset card's names), written by `datasets`: the same
  records as images1..3."""
  _, _, prepared = built
  pos, neg = _rows()
  manual = _user_data(tmp_path / "hf", layout, _img_columns(pos), neg)
  out = input_pipeline.prepare(_config(manual, tmp_path / "tfds"))
  for split in ("train", "val", "test"):
    assert _records(out["nearid"], split) == _records(prepared["nearid"],
                                                      split)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_bad_image_at_prepare_names_file_split_row_and_user_column(tmp_path,
                                                                  layout):
  pos, neg = _rows()
  pos = _img_columns(pos)
  pos["img2"][1][7] = b"not an image"
  manual = _user_data(tmp_path / "hf", layout, pos, neg)
  with pytest.raises(input_pipeline.DataError,
                     match=rf"^{re.escape(str(manual / 'NearID'))} split "
                     rf"'{_split_of(7)}' row 7 field 'img2': not a readable "
                     "image"):
    input_pipeline.prepare(_config(manual, tmp_path / "tfds"))


def test_distractor_absent_where_the_view_exists_is_counted(tmp_path):
  pos, neg = _rows()
  r = next(i for i, n in enumerate(pos["n_images"][1]) if n == 3)
  neg["Flux"]["nimg3"][1][r] = None
  manual = _write(tmp_path / "hf", pos, neg)
  lines = []
  out = input_pipeline.prepare(_config(manual, tmp_path / "tfds"),
                               log=lines.append)
  assert lines == [f"prepared nearid: {out['nearid']} (built; distractors "
                   "absent where the view exists: Flux 1)"]
  meta = tfds.builder_from_directory(out["nearid"]).info.metadata
  assert meta["absent_distractors"][_split_of(r)] == {"Flux": 1, "Qwen": 0}
  rec = next(x for x in _records(out["nearid"], _split_of(r))
             if x["index"] == r)
  assert rec["distractors"]["Flux"][2] == b""
  assert rec["distractors"]["Qwen"][2] == neg["Qwen"]["nimg3"][1][r]


def _renamed_mtg(manual):
  cols = synthetic.mtg_rows(5, 32, 1)
  cols["image_2_edited"] = cols.pop("image_2_inpainted")
  synthetic.write_mtg(str(manual), cols)


@pytest.mark.parametrize("fault,match", [
    ("mtg_column", r"MTG split 'train' .*mtg-dataset: missing column\(s\) "
                   r"\['image_2_inpainted'\]; columns found: .*image_2_edited"),
    ("mtg_missing", "MTG: .*mtg-dataset not found"),
    ("split_file", r"val.json: row 40 out of range"),
])
def test_every_input_is_checked_before_any_build(built, tmp_path, fault,
                                                 match):
  manual, _, _ = built
  shutil.copytree(manual, tmp_path / "hf",
                  ignore=shutil.ignore_patterns("mtg-dataset"))
  if fault == "mtg_column":
    _renamed_mtg(tmp_path / "hf")
  elif fault == "split_file":
    (tmp_path / "hf" / "splits" / "val.json").write_text("[40]")
  with pytest.raises(ValueError, match=match):
    input_pipeline.prepare(_config(tmp_path / "hf", tmp_path / "tfds",
                                   mtg_repeat=4))
  assert not os.path.exists(tmp_path / "tfds" / "nearid")


def test_eval_sources_follow_sources_unless_set():
  cfg = input_pipeline.default_config()
  cfg.sources = ("Flux",)
  assert cfg.eval_sources == ("Flux",)
  cfg.eval_sources = ("Qwen",)
  assert cfg.sources == ("Flux",) and cfg.eval_sources == ("Qwen",)


def test_a_subset_of_sources_without_mtg_prepares(tmp_path):
  pos, neg = _rows()
  synthetic.write_nearid(str(tmp_path / "hf"), pos, {"Qwen": neg["Qwen"]},
                         splits_lib.seeded(12, 0))
  cfg = input_pipeline.default_config()  # all sources, MTG repeated 4x
  cfg.manual_dir, cfg.data_dir = str(tmp_path / "hf"), str(tmp_path / "tfds")
  cfg.sources, cfg.mtg_repeat = ("Qwen",), 0
  out = input_pipeline.prepare(cfg)
  assert sorted(out) == ["nearid"]
  assert tfds_builders.load_nearid(cfg, ("Qwen",)).info.metadata[
      "sources"] == ["Qwen"]


# --- builds that know their inputs -------------------------------------------


# Slow: prepares each layout twice, read by the training and eval pipelines.
@pytest.mark.slow
@pytest.mark.parametrize("layout", LAYOUTS)
def test_changed_input_stops_until_rebuilt(tmp_path, layout):
  pos, neg = _rows()
  manual = _user_data(tmp_path / "hf", layout, pos, neg)
  cfg = _config(manual, tmp_path / "tfds")
  lines = []
  out = input_pipeline.prepare(cfg, log=lines.append)
  assert lines == [f"prepared nearid: {out['nearid']} (built)"]
  input_pipeline.prepare(cfg, log=lines.append)
  assert lines[1] == (f"prepared nearid: {out['nearid']} (reused: its inputs "
                      "are unchanged)")
  # The user fixes a distractor: another image in its row 3.
  r, new = 3, neg["Qwen"]["nimg1"][1][4]
  neg["Qwen"]["nimg1"][1][r] = new
  _user_data(manual, layout, pos, neg)
  for stale in (lambda: input_pipeline.prepare(cfg),
                lambda: next(input_pipeline.train_iterator(cfg, 0, 1)),
                lambda: next(iter(input_pipeline.eval_batches(cfg, "test")))):
    with pytest.raises(input_pipeline.StaleBuild,
                       match=rf"{out['nearid']} was built from other inputs "
                       r".*NearID-Qwen/.* changed .*"
                       r"--config.input.rebuild=True"):
      stale()
  cfg.rebuild = True
  input_pipeline.prepare(cfg, log=lines.append)
  assert lines[2] == f"prepared nearid: {out['nearid']} (rebuilt)"
  rec = next(x for x in _records(out["nearid"], _split_of(r))
             if x["index"] == r)
  assert rec["distractors"]["Qwen"][0] == new
  cfg.rebuild = False
  next(input_pipeline.train_iterator(cfg, 0, 1))  # current again


def test_changed_split_file_is_named(built, tmp_path):
  manual, _, _ = built
  shutil.copytree(manual, tmp_path / "hf")
  cfg = _config(tmp_path / "hf", tmp_path / "tfds")
  input_pipeline.prepare(cfg)
  val = tmp_path / "hf" / "splits" / "val.json"
  val.write_text(json.dumps(json.loads(val.read_text())[:-1]))
  with pytest.raises(input_pipeline.StaleBuild,
                     match=r"splits/val.json changed \(\d+ -> \d+ bytes\)"):
    input_pipeline.prepare(cfg)


def test_without_split_files_the_split_seed_is_an_input(built, tmp_path):
  manual, _, _ = built
  shutil.copytree(manual, tmp_path / "hf",
                  ignore=shutil.ignore_patterns("splits"))
  input_pipeline.prepare(_config(tmp_path / "hf", tmp_path / "tfds"))
  with pytest.raises(input_pipeline.StaleBuild,
                     match="input.split_seed was 0, now 3"):
    input_pipeline.prepare(_config(tmp_path / "hf", tmp_path / "tfds",
                                   split_seed=3))
