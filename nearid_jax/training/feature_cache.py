"""Feature cache: the frozen tower's tokens, computed once, for many epochs.

The tower never changes during a run, so the tokens of every image the
training stream can use are computed once and the MAP head is trained on
them for as many epochs as the run has:

    feature_cache.write(config, "/data/cache/r7")       # once, sharded
    it = feature_cache.train_iterator(config, jax.process_index(),
                                      jax.process_count(),
                                      cache_dir="/data/cache/r7")
    batch = next(it)
    # tokens bfloat16 (b, 6, N, D): slots 0..2 views, 3..5 distractors;
    # view_mask, distractor_mask, index, is_mtg, n_skipped as the image
    # pipeline gives them (input_pipeline/grain_pipeline.py).

`train.make_train_step` takes such a batch as it is (`train.group_tokens`).
The groups are made by the image pipeline's own groups.GroupMaker with its
decoder replaced by a token lookup (TokenLookup), on the same per-epoch
order, so a cached run sees the same groups in the same order as an
uncached one with the same config; the iterator is a grain DatasetIterator
(get_state / set_state), saved with the train state like the image
iterator.

A cache directory (visible to every process: the reader's global shuffle
may ask any process for any row):
  metadata.json      the fingerprint (tower variant, res, dtype, resize, a
                     sha256 of the tower params; split, sources, MTG; the
                     prepared data: data_fingerprint), row counts and each
                     row's `index`, token shape, shard files and their
                     record counts. Written last: without it the directory
                     is no cache.
  tokens-PPPPP-of-QQQQQ.array_record   process P's share of the records.
Records, read as one sequence over the shards in process order:
  NearID position i, slot j: record i * 3 * (1 + S) + j, slots views 0..2
    then each cached source's distractors 0..2 (S sources);
  MTG train position i, after all NearID rows, 4 slots: views 0, 1, edits
    0, 1;
  the last record: the tokens of an all-black image.
A record is the tokens (N, D), row-major, raw in input.feature_cache_dtype:
bfloat16, or float8_e4m3fn for half the disk (values beyond its +-448
saturate; metadata counts them as `clipped`); read back as bfloat16 (e4m3
values are exact in bfloat16). b"" marks a slot
with no image, b"corrupt" one that did not decode (with input.skip_corrupt).
One record per image, not per row: a group reads 6 of a row's up to 3 + 3S
images (a source drawn per slot), so with the paper's 7 sources a per-row
record would read 4x the bytes a group needs. Slots without an image get the
black image's tokens, as the image pipeline's zero-filled images give them:
the loss masks them, but a cached batch is then the uncached one to bf16
rounding, and finite (all-zero tokens can make a zero embedding, whose
normalisation has a NaN gradient that masking does not stop).

Opening a cache checks every shard's record count against the metadata
(a truncated shard is named). Training refuses a cache of another
fingerprint, its data included when input.data_dir holds a prepared
NearID (without one the cache's own rows are used, with a warning).
`write` (`launch.py --mode cache`) keeps an existing cache of the config's
fingerprint when its shards check out, rebuilds it when damaged, and
replaces one of another fingerprint only with input.feature_cache_overwrite.

A cache up to IN_MEMORY_BYTES (1 GiB; the demo's is 59 MB) is read into
one token array by each reading process at its first lookup and a batch is
one fancy-index of it, made without reader threads; a bigger one (the
paper's So400m cache: hundreds of GB) is read from disk, a batch's records
in one batched ArrayRecord read.
"""
import glob
import hashlib
import json
import logging
import os

from array_record.python import array_record_module
import grain
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from input_pipeline import grain_pipeline
from input_pipeline import groups
from input_pipeline import tfds_builders
from nearid_jax import sharding
from nearid_jax import vit
from nearid_jax import workdir as workdir_lib
from nearid_jax.model import HEAD_KEYS
from nearid_jax.model import NearID
from nearid_jax.model import tower_tokens

METADATA = "metadata.json"
EMPTY, CORRUPT = b"", b"corrupt"
DTYPE = ml_dtypes.bfloat16  # the tokens a reader returns
# input.feature_cache_dtype -> the dtype records store.
TOKEN_DTYPES = {"bfloat16": ml_dtypes.bfloat16,
                "float8_e4m3fn": ml_dtypes.float8_e4m3fn}
MTG_SLOTS = 4  # views 0, 1, edits 0, 1
# Random access to single records; bf16 tokens barely compress.
_WRITER_OPTIONS = "group_size:1,uncompressed"
# A cache up to this size is read into memory once per reading process: for
# small towers' records a random ArrayRecord read is most of a group's input
# time (docs/benchmarks.md).
IN_MEMORY_BYTES = 1 << 30


class CacheMismatch(ValueError):
  """A cache built for another tower, resolution, split, sources or data."""


def _shard_name(p, count):
  return f"tokens-{p:05d}-of-{count:05d}.array_record"


def _rows_name(p, count):  # a process's row indices until the cache is sealed
  return f"rows-{p:05d}-of-{count:05d}.json"


def _write_json(path, obj):
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f)
  os.replace(tmp, path)  # atomic: readers see all of it or nothing


def _variant(arch):
  """The tower's variant name ("So400m/14"), from its shape."""
  shape = (arch.width, arch.depth, arch.mlp_dim, arch.num_heads)
  name = next((n for n, v in vit.VARIANTS.items() if v == shape),
              "x".join(map(str, shape)))
  return f"{name}/{arch.patch_size}"


def tower_sha256(model):
  """sha256 of the tower's weights, canonical layout (scan or not alike)."""
  h = hashlib.sha256()
  for key, v in sorted(model.flat_params().items()):
    if key.startswith(HEAD_KEYS):
      continue  # the head does not change the tokens
    h.update(f"{key}:{v.shape}".encode())
    h.update(np.ascontiguousarray(v).tobytes())
  return h.hexdigest()


def fingerprint(config, model, data=True):
  """What decides the tokens: tower, weights, pixels; and the data cached
  (with `data`, the prepared data too: data_fingerprint)."""
  out = {"variant": _variant(model.arch), "res": model.arch.image_size,
         "dtype": config.model.dtype, "resize": config.input.resize,
         "tower_sha256": tower_sha256(model), "split": config.input.split,
         "sources": list(config.input.sources),
         "mtg": config.input.mtg_repeat > 0,
         "token_dtype": config.input.feature_cache_dtype}
  if data:
    out["data"] = data_fingerprint(config.input)
  return out


def _build(builder, folders):
  """A prepared dataset: where, its splits' row counts, its inputs' sha256."""
  return {"build": os.fspath(builder.data_dir),
          "rows": {name: split.num_examples
                   for name, split in builder.info.splits.items()},
          "inputs": tfds_builders.input_digest(builder, folders)}


def data_fingerprint(cfg):
  """The prepared data (config.input) the cached rows come from: NearID's
  build (its splits' row counts, a digest of the positives and split files
  it read), a digest of each source's distractors, MTG's build."""
  nearid = tfds_builders.load_nearid(cfg, cfg.sources)
  out = {"nearid": _build(nearid, [tfds_builders.POSITIVES,
                                   tfds_builders.SPLITS]),
         "source_inputs": {s: tfds_builders.input_digest(
             nearid, [f"{tfds_builders.POSITIVES}-{s}"])
                           for s in cfg.sources}}
  if cfg.mtg_repeat > 0:
    out["mtg"] = _build(tfds_builders.load_mtg(cfg),
                        [tfds_builders.MTG_FOLDER])
  return out


def _describe(build):
  rows = ", ".join(f"{k} {v}" for k, v in sorted(build["rows"].items()))
  return (f"{build['build']} (rows: {rows}; inputs sha256 "
          f"{str(build['inputs'])[:12]}...)")


def _data_mismatches(cached, wanted):
  """Why the cache's data is not the config's (data_fingerprint) -> [str]."""
  if "data" not in cached:
    return ["data: the cache records no fingerprint of the prepared data it "
            "was built from"]
  cached, bad = cached["data"], []
  for name in ("nearid", "mtg"):
    have, want = cached.get(name), wanted.get(name)
    if have and want and (have["rows"], have["inputs"]) != (want["rows"],
                                                          want["inputs"]):
      bad.append(f"data: the cache was built from {_describe(have)}, this "
                 f"config reads {_describe(want)} (input.data_dir)")
  changed = [s for s, digest in wanted["source_inputs"].items()
             if cached["source_inputs"].get(s, digest) != digest]
  if changed:
    bad.append(f"data: the distractors of {changed} are not those the cache "
               f"was built from ({cached['nearid']['build']}; this config "
               f"reads {wanted['nearid']['build']})")
  return bad


def _mismatches(cached, wanted):
  """Why a cache (its metadata) cannot serve a run (fingerprint) -> [str]."""
  bad = [f"{key}: the cache has {cached[key]!r}, this config {wanted[key]!r}"
         f" ({where})" for key, where in (
             ("variant", "model.variant / model.init"),
             ("res", "model.res"), ("dtype", "model.dtype"),
             ("resize", "input.resize"), ("split", "input.split"))
         if cached[key] != wanted[key]]
  if cached["tower_sha256"] != wanted["tower_sha256"]:
    bad.append(f"tower weights: sha256 {cached['tower_sha256'][:12]}... in "
               f"the cache, {wanted['tower_sha256'][:12]}... here "
               "(model.init / seed)")
  missing = [s for s in wanted["sources"] if s not in cached["sources"]]
  if missing:
    bad.append(f"sources: no tokens for {missing}, the cache holds "
               f"{cached['sources']} (input.sources)")
  if wanted["mtg"] and not cached["mtg"]:
    bad.append("MTG: input.mtg_repeat > 0 but the cache holds no MTG rows")
  stored = cached.get("token_dtype", "bfloat16")  # caches before float8
  if stored != wanted["token_dtype"]:
    bad.append(f"token dtype: the cache stores {stored!r}, this config "
               f"{wanted['token_dtype']!r} (input.feature_cache_dtype)")
  if "data" in wanted:
    bad += _data_mismatches(cached, wanted["data"])
  return bad


def _load_model(config, model):
  return NearID.from_config(config) if model is None else model


def _barrier(name):
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(f"feature_cache:{name}")


# --- writing


class _DecodeRow:
  """(dataset, position) -> (row index, [uint8 image | EMPTY | CORRUPT]).

  The slots in record order; picklable for grain workers. A corrupt image
  is named as the image pipeline names it (groups.Place, this object in the
  role of its GroupMaker: split, the user's columns, locate).
  """

  def __init__(self, nearid, mtg, sources, decoder, split, columns):
    self.nearid, self.mtg, self.sources = nearid, mtg, sources
    self.decoder, self.split, self.columns = decoder, split, columns

  def locate(self, dataset, position):
    source = self.nearid if dataset == groups.NEARID else self.mtg
    return source.locate(int(position))

  def __call__(self, item):
    dataset, position = item
    if dataset == groups.NEARID:
      record = self.nearid[int(position)]
      row = int(record["index"])
      slots = [(b, "NearID", f"images{k + 1}")
               for k, b in enumerate(record["views"])]
      slots += [(b, f"NearID-{s}", f"nimg{k + 1}") for s in self.sources
                for k, b in enumerate(record["distractors"][s])]
    else:
      record = self.mtg[int(position)]
      row = int(record["index"])
      slots = [(b, "MTG", f"image_{k + 1}_original")
               for k, b in enumerate(record["views"])]
      slots += [(b, "MTG", f"image_{k + 1}_inpainted")
                for k, b in enumerate(record["edits"])]
    out = []
    for data, name, field in slots:
      skipped = []
      where = groups.Place(self, dataset, name, row, field, position)
      image = self.decoder(data, where, skipped)
      out.append(image if image is not None else
                 CORRUPT if skipped else EMPTY)
    return row, out


def _sources(cfg):
  """-> (NearID split, MTG train or None, {views field: the user's column})."""
  builder = tfds_builders.load_nearid(cfg, cfg.sources)
  if cfg.split not in builder.info.splits:
    raise ValueError(f"input.split={cfg.split!r}: NearID has splits "
                     f"{list(builder.info.splits)}")
  nearid = tfds_builders.data_source(builder, cfg.split)
  mtg = None
  if cfg.mtg_repeat > 0:
    mtg = tfds_builders.data_source(tfds_builders.load_mtg(cfg),
                                    "train")
  return nearid, mtg, tfds_builders.view_columns(builder)


def _share(n, p, count):
  """Process p's contiguous share [lo, hi) of n items."""
  return n * p // count, n * (p + 1) // count


def _clear(out_dir):
  for pattern in (METADATA, "tokens-*.array_record", "rows-*.json"):
    for f in glob.glob(os.path.join(out_dir, pattern)):
      os.remove(f)


def write(config, out_dir, *, model=None, mesh=None, batch_size=None,
          overwrite=None, log=print):
  """Writes the tokens of every image the training stream can use.

  That is each `input.split` NearID row's views and its distractors from
  every `input.sources` source, and each MTG train row's views and edits
  when input.mtg_repeat > 0 (once, whatever the repeat). Every process calls
  this (multi-host): process p decodes and writes its contiguous share of
  the rows; each forward is one jit over the mesh, images split over the
  batch axes, the tower placed as training places it. A second writer of
  out_dir is refused at once, naming the first (workdir_lib.writer_lock).

  Args:
    config: a training config (model.*, input.*, mesh).
    out_dir: the cache directory, visible to every process.
    model: the NearID to take the tower from; default NearID.from_config.
    mesh: default sharding.make_mesh(config.mesh).
    batch_size: images per forward (global); default input.batch_size * 6,
      what one training step runs through the tower.
    overwrite: replace a cache of another fingerprint at out_dir; default
      input.feature_cache_overwrite. A cache that matches the config is
      verified (every shard's record count, as Cache does) and kept, or
      rebuilt when damaged.
    log: where process 0 says what it did with a cache already at out_dir.
  Returns:
    The cache's metadata (a dict, as metadata.json).
  """
  with workdir_lib.writer_lock(out_dir, "feature cache writing"):
    return _write(config, out_dir, model, mesh, batch_size, overwrite, log)


def _write(config, out_dir, model, mesh, batch_size, overwrite, log):
  """write, holding out_dir's lock."""
  cfg = config.input
  model = _load_model(config, model)
  mesh = sharding.make_mesh(config.mesh) if mesh is None else mesh
  p, count = jax.process_index(), jax.process_count()
  batch_size = batch_size or cfg.batch_size * 6
  n_split = sharding.batch_shards(mesh)
  if batch_size % n_split or batch_size % count:
    raise ValueError(f"feature cache batch_size={batch_size} is not divisible"
                     f" by the {n_split}-way batch split (mesh axes "
                     f"{sharding.batch_axes(mesh)}) and the {count} "
                     "processes")
  local = batch_size // count
  if cfg.feature_cache_dtype not in TOKEN_DTYPES:
    raise ValueError(f"input.feature_cache_dtype={cfg.feature_cache_dtype!r}"
                     f": one of {sorted(TOKEN_DTYPES)}")
  stored = jnp.dtype(TOKEN_DTYPES[cfg.feature_cache_dtype])

  if overwrite is None:
    overwrite = cfg.get("feature_cache_overwrite", False)
  say = log if p == 0 else lambda _: None
  wanted = fingerprint(config, model)
  meta_path = os.path.join(out_dir, METADATA)
  if os.path.exists(meta_path):
    meta = read_metadata(out_dir)
    bad = _mismatches(meta, wanted)
    if bad and not overwrite:
      raise CacheMismatch(f"{out_dir} holds a feature cache for another run ("
                          + "; ".join(bad) + "); replace it with "
                          "--config.input.feature_cache_overwrite=True")
    if bad:
      say(f"feature cache {out_dir}: built for another run ("
          + "; ".join(bad) + "): replacing it (input.feature_cache_overwrite)")
    else:
      try:
        Cache(out_dir)
        say(f"feature cache {out_dir}: verified (the record counts of its "
            f"{len(meta['shards'])} shard(s)), kept")
        return meta
      except (FileNotFoundError, tfds_builders.DataError) as e:
        say(f"feature cache {out_dir}: damaged ({e}): rebuilding it")
  _barrier("checked")  # every process decided before anything is removed
  if p == 0:
    os.makedirs(out_dir, exist_ok=True)
    _clear(out_dir)
  _barrier("cleared")

  # --- this process's rows, decoded by grain threads (or workers)
  nearid, mtg, columns = _sources(cfg)
  items = [(groups.NEARID, i) for i in range(len(nearid))]
  items += [(groups.MTG, i) for i in range(len(mtg) if mtg else 0)]
  lo, hi = _share(len(items), p, count)
  mine = np.array(items[lo:hi], np.int64).reshape(-1, 2)
  decode = _DecodeRow(nearid, mtg, tuple(cfg.sources), groups.Decoder(
      cfg.res, cfg.resize, cfg.skip_corrupt), cfg.split, columns)
  rows = grain.MapDataset.source(mine).map(decode).to_iter_dataset(
      grain_pipeline.read_options(cfg))
  rows = grain_pipeline.in_workers(rows, cfg)
  row_index = {groups.NEARID: [], groups.MTG: []}

  def slots():
    for (dataset, _), (row, out) in zip(mine, rows):
      row_index[int(dataset)].append(row)
      yield from out

  # --- the forward: one jit over the mesh, the tower placed as in training.
  # `more` tells every process whether any still has images, so that all
  # make the same number of calls (each is a collective).
  batch_spec = sharding.batch_sharding(mesh)
  tower_spec = sharding.weight_shardings(mesh, model.params["img"])
  frozen = jax.device_put(model.params["img"], tower_spec)
  tower = sharding.fsdp_tower(model.tower, mesh)

  def forward(frozen, images, more):
    tokens = tower_tokens(tower, frozen, images)
    top = float(jnp.finfo(stored).max)  # float8 has no inf: saturate
    clipped = jnp.sum(jnp.abs(tokens) > top, axis=(1, 2))
    return (jnp.clip(tokens, -top, top).astype(stored), jnp.any(more),
            clipped)

  forward = jax.jit(forward, in_shardings=(tower_spec, batch_spec, batch_spec),
                    out_shardings=(batch_spec, sharding.replicated(mesh),
                                   batch_spec),
                    compiler_options=model.compiler_options)
  spec = sharding.batch_spec(mesh)
  to_global = lambda x: multihost_utils.host_local_array_to_global_array(
      x, mesh, spec)

  writer = array_record_module.ArrayRecordWriter(
      os.path.join(out_dir, _shard_name(p, count)), _WRITER_OPTIONS)
  counts = {"images": 0, "empty": 0, "corrupt": 0, "clipped": 0}
  records = 0  # written to this process's shard
  stream, exhausted, more, blank = slots(), False, True, None
  while more:
    pending, images = [], []  # records in order; ints index into images
    while not exhausted and len(images) < local:
      slot = next(stream, None)
      if slot is None:
        exhausted = True
      elif isinstance(slot, bytes):
        pending.append(slot)
        counts["empty" if slot == EMPTY else "corrupt"] += 1
      else:
        pending.append(len(images))
        images.append(slot)
    x = np.zeros((local, cfg.res, cfg.res, 3), np.uint8)
    if images:
      x[:len(images)] = np.stack(images)
    tokens, more, clipped = forward(frozen, to_global(x),
                                    to_global(np.full(local, not exhausted)))
    tokens, clipped = (
        np.asarray(multihost_utils.global_array_to_host_local_array(
            a, mesh, spec)) for a in (tokens, clipped))
    for r in pending:
      writer.write(r if isinstance(r, bytes) else tokens[r].tobytes())
    records += len(pending)
    if blank is None and len(images) < local:  # every process meets one
      blank = tokens[len(images)].tobytes()
    counts["images"] += len(images)
    counts["clipped"] += int(clipped[:len(images)].sum())
    more = bool(more)
  if p == count - 1:
    writer.write(blank)  # the last record, after every process's share
    records += 1
  writer.close()
  _write_json(os.path.join(out_dir, _rows_name(p, count)),
              {"nearid": row_index[groups.NEARID],
               "mtg": row_index[groups.MTG], "records": records, **counts})

  # --- process 0 seals the cache once every share is on disk
  _barrier("written")
  if p == 0:
    meta = {**wanted, "token_shape": [model.arch.num_patches,
                                      model.arch.width],
            "shards": [_shard_name(q, count) for q in range(count)],
            "shard_records": [], "nearid_rows": [], "mtg_rows": [],
            **dict.fromkeys(counts, 0),
            "data_dir": cfg.data_dir}
    for q in range(count):
      part_path = os.path.join(out_dir, _rows_name(q, count))
      with open(part_path) as f:
        part = json.load(f)
      meta["shard_records"].append(part["records"])
      meta["nearid_rows"] += part["nearid"]
      meta["mtg_rows"] += part["mtg"]
      for k in counts:
        meta[k] += part[k]
      os.remove(part_path)
    _write_json(meta_path, meta)  # last, atomic: the cache appears whole
  _barrier("sealed")
  return read_metadata(out_dir)


# --- reading

_REDO = "`launch.py --mode cache` rebuilds it"


def read_metadata(path):
  meta_path = os.path.join(path, METADATA)
  if not os.path.exists(meta_path):
    raise FileNotFoundError(
        f"{path} is not a feature cache (no {METADATA}; an interrupted write "
        "leaves none): build it with feature_cache.write(config, out_dir)")
  with open(meta_path) as f:
    return json.load(f)


class Cache:
  """An opened cache directory: its metadata, row records and token lookup."""

  def __init__(self, path):
    self.path = os.fspath(path)
    self.meta = read_metadata(self.path)
    shards = [os.path.join(self.path, s) for s in self.meta["shards"]]
    missing = [s for s in shards if not os.path.exists(s)]
    if missing:
      raise FileNotFoundError(f"feature cache {self.path}: shard(s) {missing}"
                              f" listed in its metadata are missing; {_REDO}")
    if "shard_records" not in self.meta:
      raise tfds_builders.DataError(
          f"feature cache {self.path}: its {METADATA} lists no shard record "
          f"counts (an older cache); {_REDO}")
    tfds_builders.check_shards(shards, self.meta["shard_records"], METADATA,
                               _REDO)
    self.shards = shards
    self.num_nearid = len(self.meta["nearid_rows"])
    self.num_mtg = len(self.meta["mtg_rows"])
    self.nearid_slots = groups.VIEWS * (1 + len(self.meta["sources"]))
    # Image slots; record num_records holds the black image's tokens.
    self.num_records = (self.num_nearid * self.nearid_slots
                        + self.num_mtg * MTG_SLOTS)

  def check(self, config, model=None):
    """Refuses (CacheMismatch) a config whose tokens or data would differ."""
    bad = _mismatches(self.meta, fingerprint(
        config, _load_model(config, model), data=False))
    if not bad:  # the data is compared once the cache holds the sources
      try:
        data = data_fingerprint(config.input)
      except tfds_builders.DataError as e:
        # The cache alone serves training: a host without the data (or a
        # run without evaluation) trains on the rows the cache holds.
        logging.warning("feature cache %s: not compared with the data (%s);"
                        " training on its rows, from %s", self.path, e,
                        self.meta.get("data_dir"))
      else:
        bad = _data_mismatches(self.meta, data)
    if bad:
      raise CacheMismatch(f"feature cache {self.path} does not match this "
                          "config: " + "; ".join(bad) + ". Build one for it "
                          "with `launch.py --mode cache` (and "
                          "--config.input.feature_cache_overwrite=True to "
                          "replace this one).")

  def refs(self, sources):
    """GroupMaker's refs for training groups drawing from `sources`."""
    return _Refs(self, sources)


class _Refs:
  """(dataset, positions) -> rows and record ids (groups.GroupMaker's refs).

  Arithmetic on the record layout (module doc): no record is read.
  """

  def __init__(self, cache, sources):
    cached = cache.meta["sources"]
    self.source_slots = groups.VIEWS * (1 + np.array(
        [cached.index(s) for s in sources], np.int64))
    self.nearid_slots = cache.nearid_slots
    self.mtg_base = cache.num_nearid * cache.nearid_slots
    self.nearid_rows = np.array(cache.meta["nearid_rows"], np.int64)
    self.mtg_rows = np.array(cache.meta["mtg_rows"], np.int64)

  def __call__(self, dataset, positions):
    k = np.arange(groups.VIEWS)
    if dataset == groups.NEARID:
      base = positions * self.nearid_slots
      views = base[:, None] + k
      dists = base[:, None, None] + self.source_slots[:, None] + k
      return self.nearid_rows[positions], views, dists
    base = (self.mtg_base + positions * MTG_SLOTS)[:, None]
    none = np.full_like(base, TokenLookup.NONE)  # MTG has 2 views
    views = np.concatenate([base, base + 1, none], axis=1)
    edits = np.concatenate([base + 2, base + 3, none], axis=1)
    return self.mtg_rows[positions], views, edits[:, None]


_OK, _EMPTY, _CORRUPT = 0, 1, 2  # a record's status
_CHUNK = 4096  # records read at a time into memory


def _status(data):
  # A token record is N * D * 2 bytes, never CORRUPT's 7.
  return _EMPTY if data == EMPTY else _CORRUPT if data == CORRUPT else _OK


class TokenLookup:
  """groups.Decoder's stand-in for GroupMaker: record ids -> tokens (N, D).

  The same load / gather contract, refs being record ids (NONE: no image):
  CorruptImage for a record that did not decode at write time, unless
  skip_corrupt (then masked and counted); a slot without tokens gets the
  black image's, as the image pipeline's zero-filled slot gives them.
  In memory, `load` passes record ids on and `gather` is one fancy-index
  of the token array; from disk, `load` reads the records (one batched
  ArrayRecord read) and `gather` joins their bytes.
  """
  NONE = -1

  def __init__(self, cache, skip_corrupt=False, in_memory_bytes=None):
    self.path, self.skip_corrupt = cache.path, skip_corrupt
    self.shape = tuple(cache.meta["token_shape"])
    self.stored = TOKEN_DTYPES[cache.meta.get("token_dtype", "bfloat16")]
    self.records = grain.sources.ArrayRecordDataSource(cache.shards)
    if len(self.records) != cache.num_records + 1:
      raise ValueError(f"feature cache {self.path} holds "
                       f"{len(self.records)} records, its metadata says "
                       f"{cache.num_records + 1}: rebuild it")
    self.blank_id = cache.num_records
    self._blank_record = self.records[self.blank_id]  # read once
    self.blank = self._tokens(self._blank_record)
    limit = IN_MEMORY_BYTES if in_memory_bytes is None else in_memory_bytes
    self.in_memory = sum(os.path.getsize(s) for s in cache.shards) <= limit
    self._loaded = None

  def __getstate__(self):  # grain workers read their own copy into memory
    return {**self.__dict__, "_loaded": None}

  def _tokens(self, data):
    return np.frombuffer(data, self.stored).reshape(self.shape)

  def _memory(self):
    """(tokens (R + 1, N, D), status (R + 1,)) of every record, read once;
    tokens as stored (float8 stays half the memory)."""
    if self._loaded is None:  # a racing reader thread only reads it twice
      n = len(self.records)
      tokens = np.empty((n,) + self.shape, self.stored)
      status = np.empty(n, np.uint8)
      for lo in range(0, n, _CHUNK):
        chunk = self.records.__getitems__(range(lo, min(n, lo + _CHUNK)))
        for i, data in enumerate(chunk, lo):
          status[i] = _status(data)
          tokens[i] = self._tokens(data) if status[i] == _OK else self.blank
      self._loaded = tokens, status
    return self._loaded

  def load(self, refs, where):
    """refs (b, n) record ids -> (loaded, ok, skipped), as Decoder.load."""
    ids = np.asarray(refs, np.int64)
    none = ids < 0
    if self.in_memory:
      status = self._memory()[1][np.where(none, self.blank_id, ids)]
      status[none] = _EMPTY
    else:
      want = ids[~none].tolist()
      data = dict(zip(want, self.records.__getitems__(want) if want else []))
      loaded = np.full(ids.shape, None, object)
      status = np.full(ids.shape, _EMPTY, np.uint8)
      for (g, k), i in np.ndenumerate(ids):
        if i >= 0:
          loaded[g, k], status[g, k] = data[i], _status(data[i])
    ok, corrupt = status == _OK, status == _CORRUPT
    if corrupt.any() and not self.skip_corrupt:
      g, k = np.argwhere(corrupt)[0]
      raise groups.CorruptImage(f"{where(g, k)}: corrupt image (feature "
                                f"cache {self.path})")
    if self.in_memory:
      loaded = np.where(ok, ids, self.blank_id)
    else:
      loaded[~ok] = self._blank_record
    return loaded, ok, corrupt.sum(axis=1).astype(np.int32)

  def gather(self, loaded):
    """`load`'s output (permuted, concatenated) -> bfloat16 (b, n, N, D)."""
    if self.in_memory:
      tokens = self._memory()[0][loaded]
    else:
      tokens = np.frombuffer(b"".join(loaded.ravel()), self.stored).reshape(
          loaded.shape + self.shape)
    return tokens.astype(DTYPE, copy=False)


def _as_tokens(batch):
  """GroupMaker.batch's slots -> the batch entry train.group_tokens reads."""
  batch = dict(batch)
  batch["tokens"] = batch.pop("slots")
  return batch


def _cache_dir(config, cache_dir):
  cache_dir = cache_dir or config.input.get("feature_cache", "")
  if not cache_dir:
    raise ValueError("no feature cache: set config.input.feature_cache (a "
                     "directory feature_cache.write built)")
  return cache_dir


def train_dataset(config, process_index=None, process_count=None, *,
                  cache_dir=None, model=None, in_memory_bytes=None):
  """This process's training groups from the cache, a grain IterDataset.

  The image pipeline's stream (grain_pipeline.train_dataset) with tokens
  looked up instead of images decoded: the same entries, per-epoch order,
  process slicing and GroupMaker draws, hence the same groups in the same
  order. cache_dir: default config.input.feature_cache. model: the NearID
  the run trains (its tower is checked against the cache's sha256); default
  NearID.from_config(config). in_memory_bytes: read the cache into memory up
  to this size, default IN_MEMORY_BYTES.
  """
  cfg = config.input
  cache = Cache(_cache_dir(config, cache_dir))
  cache.check(config, model)
  lookup = TokenLookup(cache, cfg.skip_corrupt, in_memory_bytes)
  maker = groups.GroupMaker(cfg.sources, lookup, cfg.seed, cfg.split,
                            cache.refs(cfg.sources))
  # From memory a batch is a few numpy gathers: reader threads would only
  # contend for the GIL with the loop (docs/benchmarks.md).
  return grain_pipeline.group_stream(
      cfg, cache.num_nearid, cache.num_mtg if cfg.mtg_repeat > 0 else None,
      maker, _as_tokens, process_index, process_count,
      num_threads=0 if lookup.in_memory else None)


def train_iterator(config, process_index=None, process_count=None, *,
                   cache_dir=None, model=None, in_memory_bytes=None):
  """A checkpointable iterator of this process's cached training batches."""
  return iter(train_dataset(config, process_index, process_count,
                            cache_dir=cache_dir, model=model,
                            in_memory_bytes=in_memory_bytes))
