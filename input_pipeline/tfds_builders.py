"""TFDS builders for NearID and MTG: the released HF datasets -> ArrayRecord.

No TensorFlow anywhere: tfds 4.9's GeneratorBasedBuilder serialises with its
own tf.Example protos and writes ArrayRecord (file_format="array_record"), and
`tfds.builder_from_directory(d).as_data_source(split)` reads records back as
numpy. Images stay encoded (the release's PNG/JPEG bytes, b"" = missing).

The manual dir holds what a hub download gives (any layout hf_format reads;
`python -m input_pipeline.synthetic` writes the same):
  NearID/                 positives: id, images1..3 (or img1..3),
                          masks1..3, n_images, category, ...
  NearID-<source>/        distractors, row-aligned: id, nimg1..3, ...
  splits/{train,val,test}.json   row positions; without them a seeded
                          split (splits.seeded, config split_seed)
  mtg-dataset/            MTG, splits train and test
Prepare with `prepare(config.input)` (what `launch.py --mode prepare` runs),
or without a config file:
    python -c "import input_pipeline as ip; c = ip.default_config(); \
        c.manual_dir = 'data/hf'; c.data_dir = 'data/tfds'; ip.prepare(c)"
It builds <data_dir>/nearid/<source-source-...>/1.0.0 and
<data_dir>/mtg/default/1.0.0. Each build records a fingerprint of its inputs
(the files it read: names, sizes, mtimes; the fields that shape it); prepare
reuses a build whose inputs are unchanged and stops on one whose inputs
changed (StaleBuild, naming the changes) unless input.rebuild, and training
and evaluation (load_nearid, load_mtg) refuse such a build.

NearID records (one per row of a split, in split-file order):
  index (row position in the released datasets), id, category,
  views (3,) and masks (3,) bytes, distractors/<source> (3,) bytes.
MTG records: index, views (2,) [image_{1,2}_original], edits (2,)
  [image_{1,2}_inpainted], object_masks (2,), part_masks (2,).

Checks before anything is built: each dataset's columns (a missing or
renamed one stops, naming the folder, the missing columns and the columns
found), that every source folder exists and is row-aligned, the split files.
While building: distractor rows whose `id` differs from the positives' stop
the build; a row without a required field (id, n_images, the n_images views,
MTG's views and edits) or with an image whose header does not parse stops
with dataset, split, row and column named, or, with skip_corrupt, is dropped
(a bad distractor image is blanked) and counted in the dataset's metadata
(`metadata.json`: skipped_rows, blanked_images). A distractor absent where
its view exists is kept blank and counted per split and source
(absent_distractors); prepare's line shows every count.
"""
import bisect
import contextlib
import dataclasses
import glob
import hashlib
import io
import json
import logging
import os
import shutil

from absl import logging as absl_logging
import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

from input_pipeline import hf_format
from input_pipeline import locks
from input_pipeline import splits as splits_lib

SOURCES = ("Flux", "Flux_1024", "FluxC", "FluxC_1024", "PowerPaint", "Qwen",
           "Qwen_1328", "SDXL", "SDXL_1024")
POSITIVES = "NearID"
MTG_FOLDER = "mtg-dataset"
SPLITS = "splits"
VIEWS = 3
DISTRACTORS = tuple(f"nimg{k + 1}" for k in range(VIEWS))
_INCOMPLETE = "incomplete."  # TFDS's prefix of a build in progress
_BYTES = lambda n: tfds.features.Tensor(shape=(n,), dtype=np.object_)


class DataError(ValueError):
  """Bad input data; the message names dataset, split, row and field."""


class _RowError(DataError):
  """A bad row that skip_corrupt may drop."""


def _open(manual_dir, folder, what):
  path = os.path.join(manual_dir, folder)
  if not os.path.isdir(path):
    raise DataError(f"{what}: {path} not found (expected the {folder} "
                    f"dataset in the manual dir {manual_dir})")
  return hf_format.Table(path)


def _image(value, table, split, row, field, required):
  """An image cell -> bytes (b"" if missing); checks the header parses."""
  where = f"{table.path} split {split!r} row {row} field {field!r}"
  try:
    data = hf_format.image_bytes(value, table)
  except OSError as e:
    raise _RowError(f"{where}: {e}") from e
  if data is None:
    if required:
      raise _RowError(f"{where}: missing")
    return b""
  try:
    Image.open(io.BytesIO(data))  # reads the header only: cheap
  except Exception as e:  # pylint: disable=broad-except
    raise _RowError(f"{where}: not a readable image ({e})") from e
  return data


def _need_columns(table, names, role):
  missing = [n for n in names if n not in table.column_names]
  if missing:
    raise DataError(f"{role} {table.path}: missing column(s) {missing}; "
                    f"columns found: {table.column_names}")


def _view_prefix(table):
  """The release's loader reads images1..3; its dataset card says img1..3."""
  for prefix in ("images", "img"):
    if f"{prefix}1" in table.column_names:
      return prefix
  raise DataError(f"positives {table.path}: missing view columns images1..3 "
                  f"(or img1..3); columns found: {table.column_names}")


def _positives(manual):
  """The positives' table and its view columns' prefix, schema checked."""
  pos = _open(manual, POSITIVES, "positives")
  prefix = _view_prefix(pos)
  _need_columns(pos, ["id", "n_images"] + [f"{prefix}{k + 1}"
                                           for k in range(VIEWS)], "positives")
  # Masks are optional, but a partial set is a renamed column, not a choice.
  masks = [f"masks{k + 1}" for k in range(VIEWS)]
  if any(m in pos.column_names for m in masks):
    _need_columns(pos, masks, "positives")
  return pos, prefix


def _nearid_inputs(manual, sources, split_seed):
  """Opens and checks what a NearID build reads, before it reads a row.

  Returns (positives, view prefix, {source: table}, {split: row positions}).
  """
  pos, prefix = _positives(manual)
  srcs = {}
  for s in sources:
    role = f"distractor source {s!r}"
    srcs[s] = _open(manual, f"{POSITIVES}-{s}", role)
    _need_columns(srcs[s], ["id"] + list(DISTRACTORS), role)
    if len(srcs[s]) != len(pos):
      raise DataError(f"{srcs[s].path} has {len(srcs[s])} rows, the "
                      f"positives {pos.path} {len(pos)}: the datasets must "
                      "be row-aligned")
  split_dir = os.path.join(manual, SPLITS)
  if os.path.isdir(split_dir):
    parts = splits_lib.read(split_dir, len(pos))
  else:
    parts = splits_lib.seeded(len(pos), split_seed)
    logging.info("no %s: seeded split %s", split_dir,
                 {k: len(v) for k, v in parts.items()})
  return pos, prefix, srcs, parts


def _mtg_inputs(manual):
  """{split: table} of MTG's train and test splits, schema checked."""
  path = os.path.join(manual, MTG_FOLDER)
  if not os.path.isdir(path):
    raise DataError(f"MTG: {path} not found")
  out = {}
  for split in ("train", "test"):
    try:
      out[split] = hf_format.Table(path, split)
    except hf_format.FormatError:
      continue
    _need_columns(out[split], [f for fields in MTG.FIELDS.values()
                               for f in fields], f"MTG split {split!r}")
  if not out:
    raise DataError(f"MTG: {path} has neither a train nor a test split")
  return out


def config_name(sources):
  return "-".join(sources) if sources else "positives"


@dataclasses.dataclass(eq=False)
class NearIDConfig(tfds.core.BuilderConfig):
  sources: tuple = ()
  skip_corrupt: bool = False
  split_seed: int = 0


class NearID(tfds.core.GeneratorBasedBuilder):
  """NearID positives and distractor sources, row-aligned, per split."""
  name = "nearid"
  # We download nothing, so no checksums file; finding one would import
  # importlib_resources, which tfds 4.9.10 only requires below python 3.9.
  code_path = None
  VERSION = tfds.core.Version("1.0.0")
  MANUAL_DOWNLOAD_INSTRUCTIONS = __doc__

  def _info(self):
    sources = self.builder_config.sources
    return tfds.core.DatasetInfo(
        builder=self,
        features=tfds.features.FeaturesDict({
            "index": tfds.features.Scalar(dtype=np.int64),
            "id": tfds.features.Text(),
            "category": tfds.features.Text(),
            "views": _BYTES(VIEWS),
            "masks": _BYTES(VIEWS),
            "distractors": tfds.features.FeaturesDict(
                {s: _BYTES(VIEWS) for s in sources}),
        }),
        disable_shuffling=True,  # records in split-file order
        metadata=tfds.core.MetadataDict(sources=list(sources)))

  def _split_generators(self, dl_manager):
    manual = os.fspath(dl_manager.manual_dir)
    config = self.builder_config
    pos, prefix, srcs, parts = _nearid_inputs(manual, config.sources,
                                              config.split_seed)
    # view_columns: the user's names, for errors found reading records.
    self.info.metadata.update(skipped_rows={}, blanked_images={},
                              absent_distractors={},
                              fingerprint=self.fingerprint(manual),
                              view_columns=[f"{prefix}{k + 1}"
                                            for k in range(VIEWS)])
    return {name: self._generate_examples(pos, prefix, srcs, name, rows)
            for name, rows in parts.items()}

  def fingerprint(self, manual):
    c = self.builder_config
    return _nearid_fingerprint(manual, c.sources, c.split_seed)

  def _generate_examples(self, pos, prefix, srcs, split, rows):
    skip = self.builder_config.skip_corrupt
    skipped, blanked, absent = [], 0, dict.fromkeys(srcs, 0)
    for key, r in enumerate(rows):
      try:
        example, n_blanked, absent_k = self._example(pos, prefix, srcs, split,
                                                     r)
      except _RowError as e:
        if not skip:
          raise
        logging.warning("skipped: %s", e)
        skipped.append(r)
        continue
      blanked += n_blanked
      for source in absent_k:
        absent[source] += 1
      yield key, example
    self.info.metadata["skipped_rows"][split] = skipped
    self.info.metadata["blanked_images"][split] = blanked
    self.info.metadata["absent_distractors"][split] = absent

  def _example(self, pos, prefix, srcs, split, r):
    row = pos.row(r)
    where = f"{pos.path} split {split!r} row {r}"
    for field in ("id", "n_images"):
      if row[field] is None:
        raise _RowError(f"{where} field {field!r}: missing")
    n = row["n_images"]
    if not 1 <= n <= VIEWS:
      raise _RowError(f"{where} field 'n_images': {n}, expected 1..{VIEWS}")
    views = [_image(row[f"{prefix}{k + 1}"], pos, split, r, f"{prefix}{k + 1}",
                    required=True) if k < n else b"" for k in range(VIEWS)]
    masks = [_image(row.get(f"masks{k + 1}"), pos, split, r, f"masks{k + 1}",
                    required=False) if k < n else b"" for k in range(VIEWS)]
    distractors, blanked, absent = {}, 0, []
    for s, table in srcs.items():
      srow = table.row(r)
      if srow["id"] != row["id"]:
        raise DataError(
            f"{table.path} split {split!r} row {r}: id {srow['id']!r} does "
            f"not match the positives' id {row['id']!r} ({pos.path}); the "
            "datasets must be row-aligned")
      distractors[s] = []
      for k, field in enumerate(DISTRACTORS):
        try:
          data = (_image(srow[field], table, split, r, field, False)
                  if k < n else b"")
        except _RowError as e:
          if not self.builder_config.skip_corrupt:
            raise
          logging.warning("blanked: %s", e)
          data, blanked = b"", blanked + 1
        distractors[s].append(data)
        # A source need not edit every view (an edit that changes nothing
        # visible is left out), but a blank where the view exists is
        # counted: a source that is mostly blank shows in prepare's line.
        if k < n and srow[field] is None:
          absent.append(s)
    return {"index": r, "id": str(row["id"]),
            "category": str(row.get("category") or ""), "views": views,
            "masks": masks, "distractors": distractors}, blanked, absent


@dataclasses.dataclass(eq=False)
class MTGConfig(tfds.core.BuilderConfig):
  skip_corrupt: bool = False


class MTG(tfds.core.GeneratorBasedBuilder):
  """Mind-the-Glitch: two views and a part-edited copy of each."""
  name = "mtg"
  code_path = None  # as NearID's
  VERSION = tfds.core.Version("1.0.0")
  MANUAL_DOWNLOAD_INSTRUCTIONS = __doc__
  FIELDS = {"views": ("image_1_original", "image_2_original"),
            "edits": ("image_1_inpainted", "image_2_inpainted"),
            "object_masks": ("image_1_object_mask", "image_2_object_mask"),
            "part_masks": ("image_1_part_mask", "image_2_part_mask")}

  def _info(self):
    features = {"index": tfds.features.Scalar(dtype=np.int64)}
    features.update({k: _BYTES(2) for k in self.FIELDS})
    return tfds.core.DatasetInfo(
        builder=self, features=tfds.features.FeaturesDict(features),
        disable_shuffling=True, metadata=tfds.core.MetadataDict())

  def _split_generators(self, dl_manager):
    manual = os.fspath(dl_manager.manual_dir)
    tables = _mtg_inputs(manual)
    self.info.metadata.update(skipped_rows={},
                              fingerprint=self.fingerprint(manual))
    return {split: self._generate_examples(table, split)
            for split, table in tables.items()}

  def fingerprint(self, manual):
    return _mtg_fingerprint(manual)

  def _generate_examples(self, table, split):
    skipped = []
    for r in range(len(table)):
      row = table.row(r)
      try:
        ex = {"index": r}
        for key, fields in self.FIELDS.items():
          ex[key] = [_image(row[f], table, split, r, f,
                            key in ("views", "edits")) for f in fields]
      except _RowError as e:
        if not self.builder_config.skip_corrupt:
          raise
        logging.warning("skipped: %s", e)
        skipped.append(r)
        continue
      yield r, ex
    self.info.metadata["skipped_rows"][split] = skipped


class StaleBuild(ValueError):
  """A prepared dataset built from other inputs than the config names."""


def _files(manual, folders):
  """{path under manual: [size, mtime_ns]} of the files in `folders`.

  Hidden files are left out: a hub download's `.cache/` bookkeeping and
  lock files change without the data changing.
  """
  out = {}
  for folder in folders:
    for dirpath, dirs, names in os.walk(os.path.join(manual, folder)):
      dirs[:] = sorted(d for d in dirs if not d.startswith("."))
      for name in sorted(names):
        if name.startswith("."):
          continue
        path = os.path.join(dirpath, name)
        st = os.stat(path)
        out[os.path.relpath(path, manual)] = [st.st_size, st.st_mtime_ns]
  return out


def _nearid_fingerprint(manual, sources, split_seed):
  """What a NearID build reads: its manual dir files and the fields that
  shape it (a build records it; prepare, training and evaluation compare).

  skip_corrupt is left out: a build that skipped nothing is the same either
  way, and one that did counts what it dropped in its metadata.
  """
  folders = [POSITIVES] + [f"{POSITIVES}-{s}" for s in sources] + [SPLITS]
  config = {"sources": list(sources)}
  if not os.path.isdir(os.path.join(manual, SPLITS)):
    config["split_seed"] = split_seed  # only a seeded split depends on it
  return {"files": _files(manual, folders), "config": config}


def _mtg_fingerprint(manual):
  return {"files": _files(manual, [MTG_FOLDER]), "config": {}}


def input_digest(builder, folders):
  """sha256 of the inputs `builder` recorded (its fingerprint) from
  `folders` of the manual dir, and of the fields that shaped them; None for
  a build that records none.

  Per folder, so that what a feature cache read from one source is compared
  whichever build holds that source.
  """
  built = builder.info.metadata.get("fingerprint")
  if not built:
    return None
  files = {name: list(stat) for name, stat in built["files"].items()
           if name.split(os.sep)[0] in folders}
  config = {k: v for k, v in built["config"].items() if k != "sources"}
  return hashlib.sha256(json.dumps([files, config], sort_keys=True)
                        .encode()).hexdigest()


def _changes(built, now):
  """What differs between a build's fingerprint and its inputs now, in words
  ([]: nothing)."""
  if not built:
    return ["the build records no fingerprint of its inputs"]
  keys = sorted(set(built["config"]) | set(now["config"]))
  out = [f"input.{k} was {built['config'].get(k)!r}, now "
         f"{now['config'].get(k)!r}" for k in keys
         if built["config"].get(k) != now["config"].get(k)]
  old, new = built["files"], now["files"]
  for name in sorted(set(old) | set(new)):
    if name not in new:
      out.append(f"{name} removed")
    elif name not in old:
      out.append(f"{name} added")
    elif list(old[name]) != list(new[name]):
      size = (f"{old[name][0]} -> {new[name][0]} bytes"
              if old[name][0] != new[name][0] else "same size, new mtime")
      out.append(f"{name} changed ({size})")
  return out


def _stale(path, manual, changes):
  shown = changes[:5] + ([f"and {len(changes) - 5} more"]
                         if len(changes) > 5 else [])
  return StaleBuild(
      f"{path} was built from other inputs than the config names now "
      f"(manual dir {manual}): {'; '.join(shown)}. Rebuild it with "
      "`launch.py --mode prepare --config.input.rebuild=True`")


def _plan(builder, manual, rebuild):
  """-> None to reuse `builder`'s existing build, else the TFDS mode that
  builds it; stops on a build whose inputs changed unless rebuild."""
  if not builder.is_prepared():
    return tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS
  if not rebuild:
    changes = _changes(builder.info.metadata.get("fingerprint"),
                       builder.fingerprint(manual))
    if changes:
      raise _stale(os.fspath(builder.data_dir), manual, changes)
    return None
  return tfds.download.GenerateMode.REUSE_CACHE_IF_EXISTS  # overwrites


def _build(builder, manual, mode):
  # TFDS announces every build on stdout ("Downloading and preparing dataset
  # Unknown size ..."), though nothing is downloaded and the caller says
  # where the build went: shown from absl's INFO verbosity only.
  quiet = absl_logging.get_verbosity() < absl_logging.INFO
  with (contextlib.redirect_stdout(io.StringIO()) if quiet
        else contextlib.nullcontext()):
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
        manual_dir=manual, download_mode=mode))


def prepare(cfg, log=print):
  """Builds NearID (cfg.sources and cfg.eval_sources) and MTG when present.

  MTG is built when `<manual_dir>/mtg-dataset` exists, and required when
  cfg.mtg_repeat > 0. Every input is checked (schemas, row alignment, split
  files, earlier builds' fingerprints) before anything is built. An earlier
  build from the same inputs is reused; one from other inputs stops the
  prepare naming what changed, unless cfg.rebuild. Holds cfg.data_dir's
  lock (a second prepare there is refused) and removes the temporary builds
  an interrupted one left. Logs one line per dataset; returns {name:
  prepared directory}.
  """
  manual = cfg.manual_dir
  wanted = tuple(cfg.sources) + tuple(cfg.eval_sources)
  # The release's order first, then any other source, once each.
  sources = tuple(dict.fromkeys(
      [s for s in SOURCES if s in wanted] + list(wanted)))
  # A fault in any input stops before the first build, not after it.
  _nearid_inputs(manual, sources, cfg.split_seed)
  builders = [NearID(data_dir=cfg.data_dir, file_format="array_record",
                     config=NearIDConfig(name=config_name(sources),
                                         sources=sources,
                                         skip_corrupt=cfg.skip_corrupt,
                                         split_seed=cfg.split_seed))]
  if cfg.mtg_repeat > 0 or os.path.isdir(os.path.join(manual, MTG_FOLDER)):
    _mtg_inputs(manual)
    builders.append(MTG(data_dir=cfg.data_dir, file_format="array_record",
                        config=MTGConfig(name="default",
                                         skip_corrupt=cfg.skip_corrupt)))
  out = {}
  with locks.hold(cfg.data_dir, "prepare", log):
    _remove_incomplete(cfg.data_dir, log)
    plans = [_plan(b, manual, cfg.rebuild) for b in builders]
    for builder, mode in zip(builders, plans):
      path = out[builder.name] = os.fspath(builder.data_dir)
      if mode is None:
        how = "reused: its inputs are unchanged"
      else:
        _build(builder, manual, mode)
        how = "rebuilt" if mode.overwrite_dataset else "built"
      log(f"prepared {builder.name}: {path} ({how}{_counts(builder)})")
  return out


def _remove_incomplete(data_dir, log):
  """Removes the builds an interrupted prepare left (TFDS writes each into
  `incomplete.<random>_<version>` beside its version dir, never reused): the
  lock says no prepare is running."""
  for path in sorted(glob.glob(os.path.join(data_dir, "*", "*",
                                            _INCOMPLETE + "*"))):
    if os.path.isdir(path):
      shutil.rmtree(path)
      log(f"removed {path}: the temporary build of an interrupted prepare")


def _counts(builder):
  """What a build dropped, blanked or found absent, for prepare's line."""
  meta, out = builder.info.metadata, []
  skipped = sum(len(v) for v in meta.get("skipped_rows", {}).values())
  if skipped:
    out.append(f"{skipped} rows skipped")
  blanked = sum(meta.get("blanked_images", {}).values())
  if blanked:
    out.append(f"{blanked} corrupt distractors blanked")
  absent = {}
  for per_source in meta.get("absent_distractors", {}).values():
    for source, n in per_source.items():
      absent[source] = absent.get(source, 0) + n
  if any(absent.values()):
    out.append("distractors absent where the view exists: " + ", ".join(
        f"{s} {n}" for s, n in absent.items() if n))
  return "".join(f"; {x}" for x in out)


def _prepared(data_dir, name):
  """Prepared versions of one dataset: [(directory, builder)]."""
  root = os.path.join(data_dir, name)
  found = []
  for dirpath, _, files in sorted(os.walk(root)):
    if "dataset_info.json" in files and _INCOMPLETE not in dirpath:
      found.append((dirpath, tfds.builder_from_directory(dirpath)))
  return found


def _current(found, cfg, fingerprint):
  """The first of `found` built from the inputs cfg names; stops on a stale
  one. Without the manual dir (deleted after prepare, or not on this host)
  there is nothing to compare."""
  if not found or not os.path.isdir(cfg.manual_dir):
    return found[0][1] if found else None
  stale = []
  for path, builder in found:
    changes = _changes(builder.info.metadata.get("fingerprint"),
                       fingerprint(builder))
    if not changes:
      return builder
    stale.append((path, changes))
  raise _stale(stale[0][0], cfg.manual_dir, stale[0][1])


def load_nearid(cfg, sources):
  """The prepared NearID holding `sources` -> tfds builder (read-only).

  cfg: config.input (data_dir, manual_dir and the fields that shape a build).
  """
  found = _prepared(cfg.data_dir, NearID.name)
  holding = [(p, b) for p, b in found
             if set(sources) <= set(b.info.metadata["sources"])]
  if holding:
    return _current(holding, cfg, lambda b: _nearid_fingerprint(
        cfg.manual_dir, b.info.metadata["sources"], cfg.split_seed))
  have = [b.info.metadata["sources"] for _, b in found]
  missing = sorted(set(sources) - set().union(*map(set, have or [[]])))
  raise DataError(
      f"NearID with sources {list(sources)} is not prepared under "
      f"{os.path.join(cfg.data_dir, NearID.name)} (prepared: "
      f"{have or 'nothing'}"
      f"{'; never prepared: ' + str(missing) if missing else ''}); run "
      "prepare (launch.py --mode prepare) with these sources")


def load_mtg(cfg):
  """The prepared MTG -> tfds builder; cfg as load_nearid's."""
  found = _prepared(cfg.data_dir, MTG.name)
  if not found:
    raise DataError(f"MTG is not prepared under "
                    f"{os.path.join(cfg.data_dir, MTG.name)}; put it in "
                    f"<manual_dir>/{MTG_FOLDER} and run prepare")
  return _current(found, cfg, lambda b: _mtg_fingerprint(cfg.manual_dir))


def view_columns(builder):
  """{views field: the positives' column a NearID build read it from}."""
  names = builder.info.metadata.get("view_columns",
                                    [f"images{k + 1}" for k in range(VIEWS)])
  return {f"images{k + 1}": name for k, name in enumerate(names)}


def data_source(builder, split):
  """`builder`'s split as a random-access source whose faults name the file.

  Each shard's record count is checked first (check_shards), so a truncated
  or replaced shard stops here, before training, instead of as an anonymous
  Riegeli error mid-epoch.
  """
  info = builder.info.splits[split]
  paths = [os.path.join(builder.data_dir, f) for f in info.filenames]
  check_shards(paths, info.shard_lengths, "dataset_info.json",
               "run prepare again to rebuild it")
  return _NamedSource(builder.as_data_source(split=split), paths,
                      info.shard_lengths)


def check_shards(paths, lengths, listed_in, remedy):
  """Opens each ArrayRecord shard and checks its record count against
  `lengths` (what the file `listed_in` says); a shard that does not open or
  holds another count stops (DataError) naming it, and `remedy`."""
  from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
  for path, want in zip(paths, lengths):
    try:
      reader = array_record_module.ArrayRecordReader(path)
      have = reader.num_records()
      reader.close()
    except Exception as e:  # pylint: disable=broad-except
      raise DataError(f"{path}: unreadable ArrayRecord shard "
                      f"({e or type(e).__name__}); {remedy}") from e
    if have != want:
      raise DataError(f"{path}: {have} records, {listed_in} says {want}: a "
                      f"truncated shard; {remedy}")


class _NamedSource:
  """A tfds data source whose read errors name the shard files and record."""

  def __init__(self, source, paths, shard_lengths):
    self.source, self.paths = source, paths
    self.starts = [0]
    for n in shard_lengths:
      self.starts.append(self.starts[-1] + n)

  def locate(self, index):
    """Record `index`'s shard file, its record there, and its row id."""
    shard = bisect.bisect_right(self.starts, index) - 1
    out = f"record {index - self.starts[shard]} of {self.paths[shard]}"
    row_id = self.source[index].get("id")
    if row_id is not None:
      out += f", id {row_id.decode() if isinstance(row_id, bytes) else row_id}"
    return out

  def __len__(self):
    return len(self.source)

  def __getitem__(self, index):
    try:
      return self.source[index]
    except (RuntimeError, OSError) as e:
      raise DataError(f"record {index} of {self.paths}: {e}") from e
