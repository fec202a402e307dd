"""grain pipelines over the prepared ArrayRecord: training groups and eval rows.

Training (one process's share of each global batch):

    it = input_pipeline.train_iterator(config.input, jax.process_index(),
                                       jax.process_count())
    batch = next(it)
    # views uint8 (b, 3, R, R, 3), view_mask bool (b, 3),
    # distractors uint8 (b, 3, R, R, 3), distractor_mask bool (b, 3),
    # index int32 (b,) row in its dataset, is_mtg bool (b,),
    # n_skipped int32 (b,) corrupt images masked (skip_corrupt);
    # b = batch_size // process_count. Scale on device: x / 127.5 - 1.

The iterator is a grain DatasetIterator: `it.get_state()` (a JSON-able dict)
and `it.set_state(state)`; with orbax, the handler is
`grain.checkpoint.CheckpointHandler` with `grain.checkpoint.CheckpointSave(it)`
/ `CheckpointRestore(it)` (one file per process). Restore into an iterator
built from the same config, process count and num_workers.

Order: the training entries (the split's NearID rows, plus each MTG train
row mtg_repeat times) are shuffled globally per epoch with `seed`
(draws.permutation), and process p takes global positions p, p + P,
p + 2P, ..., so in every epoch the processes' shares are disjoint and
together cover the entries. A group depends only on (seed, epoch, row, copy)
(groups.py), not on sharding or workers. The stream repeats forever; epochs
are counted in entries. Each grain element is a whole batch, made in numpy
(groups.GroupMaker.batch): the order, the draws and the token gathers of a
cached batch cost less than the demo's train step that consumes it.

Config fields (`config.input`, defaults in `default_config()`):
  data_dir      TFDS data dir holding the prepared nearid/ and mtg/
  manual_dir    the HF downloads that prepare reads (tfds_builders)
  sources       distractor sources of training groups (drawn per slot)
  eval_sources  sources of eval rows (prepare builds both sets); follows
                sources unless set itself
  split         training split ("train")
  batch_size    global batch, in groups
  res, resize   squash-resize side and method ("pil" or "tf")
  seed          data order and group randomness
  num_workers   grain worker processes (0 = in the main process)
  num_threads   reader threads per process (or per worker)
  prefetch      batches buffered per reader / worker
  mtg_repeat    MTG train rows repeated per epoch (0 = no MTG)
  skip_corrupt  mask and count corrupt images (and drop bad rows at
                prepare) instead of stopping
  split_seed    the seeded split prepare makes when no split files exist
  rebuild       prepare rebuilds datasets that exist (needed when the
                manual dir or the fields above changed since their build:
                prepare, training and evaluation stop on such a build)
  feature_cache a directory nearid_jax.feature_cache.write built ("" =
                none): train the head on its tokens, same groups in the
                same order as from the images
  feature_cache_overwrite  `--mode cache` replaces a cache at
                feature_cache built for another run (tower, pixels or
                data); without it that stops, naming the differences. An
                intact cache of this run is kept, a damaged one rebuilt.
  feature_cache_dtype  how the cache stores tokens: "bfloat16", or
                "float8_e4m3fn" (half the disk; docs/scaling.md)
"""
import sys

from absl import flags
import grain
import ml_collections
import numpy as np

from input_pipeline import draws
from input_pipeline import groups
from input_pipeline import tfds_builders


def default_config():
  c = ml_collections.ConfigDict()
  c.data_dir = "data/tfds"
  c.manual_dir = "data/hf"
  c.sources = ("Flux", "Flux_1024", "Qwen", "Qwen_1328", "PowerPaint",
               "SDXL", "SDXL_1024")
  # A derived reference: it follows `sources`, and setting it (on the
  # command line too) replaces it without changing `sources`.
  c.eval_sources = c.get_ref("sources") + ()
  c.split = "train"
  c.batch_size = 128
  c.res = 384
  c.resize = "pil"
  c.seed = 0
  c.num_workers = 0
  c.num_threads = 2
  c.prefetch = 2
  c.mtg_repeat = 4
  c.skip_corrupt = False
  c.split_seed = 0
  c.rebuild = False
  c.feature_cache = ""
  c.feature_cache_overwrite = False
  c.feature_cache_dtype = "bfloat16"
  return c


def _process(process_index, process_count):
  if process_index is None or process_count is None:
    import jax  # pylint: disable=g-import-not-at-top
    return jax.process_index(), jax.process_count()
  return process_index, process_count


def _local_batch(batch_size, process_count):
  if batch_size % process_count:
    raise ValueError(f"input.batch_size {batch_size} is not divisible by the "
                     f"process count {process_count}")
  return batch_size // process_count


class _Plan:
  """Local batch j -> its groups' (epoch (b,), entries (b, 3)); picklable.

  The global stream is the entries in a new order every epoch
  (draws.permutation), repeated forever; process p takes global positions
  p, p + P, p + 2P, ... and its batch j is its elements j*b .. j*b + b - 1.
  """

  def __init__(self, entries, seed, batch, process_index, process_count):
    self.entries, self.seed, self.batch = entries, seed, batch
    self.process_index, self.process_count = process_index, process_count
    self._orders = {}

  def _order(self, epoch):
    order = self._orders.get(epoch)
    if order is None:
      order = draws.permutation(len(self.entries), self.seed, epoch)
      # A batch spans at most two epochs; prefetching threads run a little
      # ahead. Replaced whole, so a racing thread sees one dict or the other.
      self._orders = {**dict(list(self._orders.items())[-2:]), epoch: order}
    return order

  def __call__(self, j):
    local = j * self.batch + np.arange(self.batch)
    epoch, i = np.divmod(self.process_index + local * self.process_count,
                         len(self.entries))
    position = np.empty_like(i)
    for e in np.unique(epoch):
      sel = epoch == e
      position[sel] = self._order(int(e))[i[sel]]
    return epoch, self.entries[position]


class _Batches:
  """j -> this process's j-th batch of training groups; picklable."""

  def __init__(self, plan, maker, finish):
    self.plan, self.maker, self.finish = plan, maker, finish

  def __call__(self, j):
    return self.finish(self.maker.batch(*self.plan(j)))


def _as_images(batch):
  """GroupMaker.batch's slots -> the views and distractors of the batch."""
  batch = dict(batch)
  slots = batch.pop("slots")
  batch["views"] = np.ascontiguousarray(slots[:, :groups.VIEWS])
  batch["distractors"] = np.ascontiguousarray(slots[:, groups.VIEWS:])
  return batch


def _cells(values, n=groups.VIEWS):
  """Encoded images -> an object array of n, b"" filling the missing ones.

  Cell by cell: numpy would make a list of bytes a fixed-width bytes array
  first, which drops trailing NUL bytes.
  """
  out = np.full(n, b"", object)
  for k, v in enumerate(values):
    out[k] = v
  return out


class _RecordRefs:
  """(dataset, positions) -> rows and encoded images (GroupMaker's refs)."""

  def __init__(self, nearid, mtg, sources):
    self.nearid, self.mtg, self.sources = nearid, mtg, tuple(sources)

  def _source(self, dataset):
    return self.nearid if dataset == groups.NEARID else self.mtg

  def locate(self, dataset, position):
    """GroupMaker's `locate`: the record's shard, record and row id."""
    return self._source(dataset).locate(int(position))

  def __call__(self, dataset, positions):
    source = self._source(dataset)
    records = [source[int(p)] for p in positions]
    rows = np.array([int(r["index"]) for r in records], np.int64)
    views = np.stack([_cells(r["views"]) for r in records])
    if dataset == groups.NEARID:
      dists = np.stack([np.stack([_cells(r["distractors"][s])
                                  for s in self.sources]) for r in records])
    else:
      dists = np.stack([_cells(r["edits"])[None] for r in records])
    return rows, views, dists


def read_options(cfg, num_threads=None):
  """cfg's grain.ReadOptions; num_threads overrides cfg.num_threads."""
  threads = cfg.num_threads if num_threads is None else num_threads
  return grain.ReadOptions(num_threads=threads,
                           prefetch_buffer_size=cfg.prefetch)


def in_workers(ds, cfg):
  """`ds` prefetched by cfg.num_workers grain worker processes (0: as is)."""
  if cfg.num_workers <= 0:
    return ds
  if not flags.FLAGS.is_parsed():
    # grain reads its absl flags when it starts workers; outside an absl
    # app (a notebook, pytest) take their defaults.
    flags.FLAGS.mark_as_parsed()
  return ds.mp_prefetch(grain.MultiprocessingOptions(
      num_workers=cfg.num_workers, per_worker_buffer_size=cfg.prefetch))


def group_stream(cfg, num_nearid, num_mtg, maker, finish, process_index=None,
                 process_count=None, num_threads=None):
  """This process's batches of training groups, a grain IterDataset.

  num_nearid, num_mtg: the NearID rows and MTG train rows (num_mtg None: no
  MTG entries); maker: a groups.GroupMaker with its refs; finish: applied to
  each GroupMaker.batch; num_threads: reader threads, default
  cfg.num_threads, each making whole batches. The order and draws are those
  of the module doc, whatever the reader (decoded images here, cached tokens
  in feature_cache).
  """
  process_index, process_count = _process(process_index, process_count)
  batch = _local_batch(cfg.batch_size, process_count)
  if not cfg.sources:
    raise ValueError("input.sources is empty: training groups need at least "
                     "one distractor source")
  entries = [(groups.NEARID, i, 0) for i in range(num_nearid)]
  if num_mtg is not None:
    entries += [(groups.MTG, i, c) for c in range(cfg.mtg_repeat)
                for i in range(num_mtg)]
  plan = _Plan(np.array(entries, np.int64).reshape(-1, 3), cfg.seed, batch,
               process_index, process_count)
  ds = grain.MapDataset.range(sys.maxsize).map(_Batches(plan, maker, finish))
  ds = ds.to_iter_dataset(read_options(cfg, num_threads))
  return in_workers(ds, cfg)


def train_dataset(cfg, process_index=None, process_count=None):
  """The training stream of this process, a grain IterDataset of batches."""
  builder = tfds_builders.load_nearid(cfg, cfg.sources)
  nearid = tfds_builders.data_source(builder, cfg.split)
  mtg = None
  if cfg.mtg_repeat > 0:
    mtg = tfds_builders.data_source(tfds_builders.load_mtg(cfg),
                                    "train")
  refs = _RecordRefs(nearid, mtg, cfg.sources)
  maker = groups.GroupMaker(
      cfg.sources, groups.Decoder(cfg.res, cfg.resize, cfg.skip_corrupt),
      cfg.seed, cfg.split, refs, tfds_builders.view_columns(builder),
      refs.locate)
  return group_stream(cfg, len(nearid), None if mtg is None else len(mtg),
                      maker, _as_images, process_index, process_count)


def train_iterator(cfg, process_index=None, process_count=None):
  """A checkpointable iterator of this process's training batches."""
  return iter(train_dataset(cfg, process_index, process_count))


class _ReadRow:
  """Eval position (-1 = padding) -> eval row; picklable."""

  def __init__(self, source, maker, mtg):
    self.source, self.maker, self.mtg = source, maker, mtg

  def __call__(self, position):
    if position < 0:
      return self.maker.blank_row(self.mtg)
    record = self.source[int(position)]
    if self.mtg:
      return self.maker.mtg_row(record, position)
    return self.maker.nearid_row(record, position)


def eval_batches(cfg, split, sources=None, batch_size=None, dataset="nearid",
                 process_index=None, process_count=None):
  """A split's rows in stored order, in fixed-shape batches (iterable).

  Each batch (this process's share, b = batch_size // process_count):
    views uint8 (b, 3, R, R, 3) in the dataset's view order, view_mask;
    distractors uint8 (b, S, 3, R, R, 3) with S the sources in the order
    given (distractor k on view k's background), distractor_mask (b, S, 3);
    index int32 (b,) row (-1 for padding), valid bool (b,) real rows,
    n_skipped int32 (b,).
  dataset="mtg" (split "test" or "train"): S = 1 ([I1', I2', -]) and an extra
  oracle float32 (b, 3) [o1, o2, 0] (SPEC.md §5).
  Global batch j holds rows j*B .. (j+1)*B - 1 (B = batch_size), process p
  the p-th slice of it; every process yields the same number of batches; the
  last ones are padded. Read with num_threads threads, no worker processes.
  """
  process_index, process_count = _process(process_index, process_count)
  batch_size = batch_size or cfg.batch_size
  batch = _local_batch(batch_size, process_count)
  columns = {}
  if dataset == "nearid":
    sources = tuple(cfg.eval_sources if sources is None else sources)
    builder = tfds_builders.load_nearid(cfg, sources)
    columns = tfds_builders.view_columns(builder)
  elif dataset == "mtg":
    sources = ("mtg",)
    builder = tfds_builders.load_mtg(cfg)
  else:
    raise ValueError(f"unknown eval dataset {dataset!r}: 'nearid' or 'mtg'")
  if split not in builder.info.splits:
    raise ValueError(f"{dataset} has no split {split!r} (splits: "
                     f"{list(builder.info.splits)})")
  source = tfds_builders.data_source(builder, split)
  refs = (_RecordRefs(source, None, sources) if dataset == "nearid"
          else _RecordRefs(None, source, ()))
  n = len(source)
  steps = -(-n // batch_size)
  positions = [j * batch_size + process_index * batch + t
               for j in range(steps) for t in range(batch)]
  positions = [p if p < n else -1 for p in positions]
  maker = groups.GroupMaker(
      sources, groups.Decoder(cfg.res, cfg.resize, cfg.skip_corrupt), 0,
      split, columns=columns, locate=refs.locate)
  ds = grain.MapDataset.source(positions).map(
      _ReadRow(source, maker, dataset == "mtg"))
  return ds.batch(batch).to_iter_dataset(read_options(cfg))
