"""Training groups (SPEC.md §4) and eval rows, made from prepared records.

A training group has 6 slots: 3 view slots and 3 distractor slots. The valid
views are permuted (invalid slots stay at the end) and slot 0 is the anchor;
distractor slot k is the distractor drawn on view slot k's background, from
a source drawn uniformly per slot. The draws are a hash of (seed, epoch,
dataset, row, copy) (draws.py), so a group does not depend on sharding,
worker count or batch position. An MTG row is a group with views
[image_1_original, image_2_original, missing] and distractors
[image_1_inpainted, image_2_inpainted, missing], permuted the same way.

Groups are made a batch at a time (GroupMaker.batch), in numpy: from a
feature cache in memory a batch is a few gathers, where Python per group
would keep a small head's train step waiting. What a slot holds comes from a reader: Decoder here (images decoded
and squash-resized to res x res, preprocess.py semantics, kept
uint8; scaling to [-1, 1] happens on device) or the feature cache's token
lookup, both with the same `load` / `gather` contract.

A corrupt image raises CorruptImage naming dataset, split, row and field (the
column the build read it from, e.g. img2) and, given `locate`, the ArrayRecord
shard, record and row id; or, with skip_corrupt, leaves its slot masked and
counts it in `n_skipped` (a skipped view also masks its distractor; the
permutation runs over the views that decoded).
"""
import io

import numpy as np
from PIL import Image

from input_pipeline import draws
from input_pipeline import oracle as oracle_lib
from input_pipeline import preprocess

VIEWS = 3
NEARID, MTG = 0, 1  # dataset ids in the draws' key and the training entries
_DATASET = {NEARID: "NearID", MTG: "MTG"}


class CorruptImage(ValueError):
  """An image that does not decode; the message says where it is."""


def decode_mask(data):
  """Encoded mask -> uint8 (H, W), or None when missing."""
  if not len(data):
    return None
  return np.asarray(Image.open(io.BytesIO(data)).convert("L"))


class Place:
  """Where an image is, for error messages; formatted only when shown (a
  batch names every slot, and `locate` reads the record again)."""

  def __init__(self, maker, dataset, name, row, field, position=None):
    self.maker, self.dataset, self.name = maker, dataset, name
    self.row, self.field, self.position = row, field, position

  def __str__(self):
    m = self.maker
    out = (f"{self.name} split {m.split!r} row {self.row} field "
           f"{m.columns.get(self.field, self.field)!r}")
    if m.locate is not None and self.position is not None:
      out += f" ({m.locate(self.dataset, self.position)})"
    return out


class Decoder:
  """Encoded bytes -> uint8 (res, res, 3); counts what skip_corrupt skipped."""
  NONE = b""  # the ref of a slot without an image

  def __init__(self, res, resize="pil", skip_corrupt=False):
    if resize not in preprocess.RESIZE_METHODS:
      raise ValueError(f"unknown resize {resize!r}: one of "
                       f"{preprocess.RESIZE_METHODS}")
    self.res, self.resize, self.skip_corrupt = res, resize, skip_corrupt

  def __call__(self, data, where, skipped):
    """None for a missing image, or a corrupt one when skipping (counted)."""
    if not len(data):
      return None
    try:
      image = preprocess.read_image(io.BytesIO(data))
    except Exception as e:  # pylint: disable=broad-except
      if not self.skip_corrupt:
        raise CorruptImage(f"{where}: corrupt image ({e})") from e
      skipped.append(where)
      return None
    return preprocess.resize_uint8(image, self.res, self.resize)

  def stack(self, images):
    """3 images or None -> uint8 (3, res, res, 3) with zeros, bool (3,)."""
    out = np.zeros((VIEWS, self.res, self.res, 3), np.uint8)
    for k, im in enumerate(images):
      if im is not None:
        out[k] = im
    return out, np.array([im is not None for im in images])

  # GroupMaker.batch's reader contract (feature_cache.TokenLookup's too):
  # NONE, load and gather.

  def load(self, refs, where):
    """refs (b, n) encoded images -> (loaded, ok, skipped).

    loaded: uint8 (b, n, res, res, 3), zeros where there is no image; ok:
    bool (b, n) the slots with one; skipped: int32 (b,) corrupt images
    skipped. where(g, k) names slot (g, k) in errors.
    """
    out = np.zeros(refs.shape + (self.res, self.res, 3), np.uint8)
    ok = np.zeros(refs.shape, bool)
    skipped = np.zeros(refs.shape[0], np.int32)
    for (g, k), data in np.ndenumerate(refs):
      if not len(data):
        continue
      lost = []
      image = self(data, where(g, k), lost)
      skipped[g] += len(lost)
      if image is not None:
        out[g, k], ok[g, k] = image, True
    return out, ok, skipped

  def gather(self, loaded):
    """`load`'s output (permuted, concatenated) -> the batch's pixels."""
    return loaded


def _take(a, index):
  """a[g, index[g, j], ...] for every g, j: (b, n, ...) -> (b, m, ...)."""
  return np.take_along_axis(
      a, index.reshape(index.shape + (1,) * (a.ndim - 2)), axis=1)


class GroupMaker:
  """Record refs -> batches of training groups; records -> eval rows.

  Picklable, for grain workers.

  Args:
    sources: distractor sources a training group draws from, or an eval row
      holds, in order.
    reader: what a slot holds: a Decoder (images; eval rows need one), or
      feature_cache.TokenLookup (tokens).
    seed: the data seed.
    split: the split's name, for error messages.
    refs: (dataset, positions) -> (rows (n,), views (n, 3), distractors
      (n, S, 3)): the dataset's row index and the reader's refs of the
      images of training entries; distractor k of source s is
      distractors[:, s, k], S = len(sources) for NEARID and 1 for MTG (the
      edits). Only `batch` needs it.
    columns: {field: the column the build read it from} where they differ
      (a positives' `img2` for images2), for error messages.
    locate: (dataset, position) -> where that record is stored, for error
      messages (None: not named).
  """

  def __init__(self, sources, reader, seed, split, refs=None, columns=None,
               locate=None):
    self.sources, self.reader = tuple(sources), reader
    self.seed, self.split, self.refs = seed, split, refs
    self.columns, self.locate = dict(columns or {}), locate

  def batch(self, epoch, entries):
    """Training groups of (dataset, position, copy) entries in `epoch`.

    epoch: int (b,); entries: int (b, 3). Returns slots (b, 6, ...) (views
    0..2 then distractors, as reader.gather gives them), view_mask and
    distractor_mask bool (b, 3), index int32 (b,) (row in its dataset),
    is_mtg bool (b,), n_skipped int32 (b,).
    """
    dataset, position, copy = np.asarray(entries, np.int64).T
    b = len(dataset)
    rows = np.zeros(b, np.int64)
    choice = np.zeros((b, VIEWS), np.int64)
    keys = np.zeros((b, VIEWS), np.uint64)
    views = dists = None
    for d in (NEARID, MTG):
      sel = np.flatnonzero(dataset == d)
      if not len(sel):
        continue
      r, v, n = self.refs(d, position[sel])
      if views is None:
        views = np.empty((b, VIEWS), v.dtype)
        dists = np.empty((b, VIEWS), v.dtype)
      u = draws.bits(draws.key(draws.GROUP, self.seed, epoch[sel], d, r,
                               copy[sel]), 2 * VIEWS)
      rows[sel], views[sel], keys[sel] = r, v, u[:, VIEWS:]
      c = draws.below(u[:, :VIEWS], n.shape[1])
      choice[sel] = c
      dists[sel] = n[np.arange(len(sel))[:, None], c, np.arange(VIEWS)]

    def view_at(g, k):
      field = (f"images{k + 1}" if dataset[g] == NEARID
               else f"image_{k + 1}_original")
      return Place(self, dataset[g], _DATASET[dataset[g]], rows[g], field,
                   position[g])

    loaded, ok, skipped = self.reader.load(views, view_at)
    # Valid views in their drawn order, then the others in slot order.
    last = np.uint64(1 << 63) + np.arange(VIEWS, dtype=np.uint64)
    perm = np.argsort(np.where(ok, keys >> np.uint64(2), last), axis=1,
                      kind="stable")
    view_mask = _take(ok, perm)
    dists = _take(dists, perm)
    dists[~view_mask] = self.reader.NONE  # no view, no distractor

    def distractor_at(g, j):
      k = perm[g, j]
      if dataset[g] == MTG:
        return Place(self, MTG, "MTG", rows[g], f"image_{k + 1}_inpainted",
                     position[g])
      return Place(self, NEARID, f"NearID-{self.sources[choice[g, k]]}",
                   rows[g], f"nimg{k + 1}", position[g])

    loaded_d, dist_mask, skipped_d = self.reader.load(dists, distractor_at)
    slots = self.reader.gather(np.concatenate([_take(loaded, perm), loaded_d],
                                              axis=1))
    return {"slots": slots, "view_mask": view_mask,
            "distractor_mask": dist_mask, "index": rows.astype(np.int32),
            "is_mtg": dataset == MTG,
            "n_skipped": (skipped + skipped_d).astype(np.int32)}

  def nearid_row(self, record, position=None):
    """Eval: views in stored order, each source's distractors, no randomness.

    position: the record's, for error messages."""
    row, skipped = int(record["index"]), []
    ims = [self.reader(b, Place(self, NEARID, "NearID", row,
                                f"images{k + 1}", position), skipped)
           for k, b in enumerate(record["views"])]
    views, view_mask = self.reader.stack(ims)
    dists, dist_masks = [], []
    for s in self.sources:
      d = [self.reader(b, Place(self, NEARID, f"NearID-{s}", row,
                                f"nimg{k + 1}", position), skipped)
           if ims[k] is not None else None
           for k, b in enumerate(record["distractors"][s])]
      d, m = self.reader.stack(d)
      dists.append(d)
      dist_masks.append(m)
    return {"views": views, "view_mask": view_mask,
            "distractors": np.stack(dists),
            "distractor_mask": np.stack(dist_masks),
            "index": np.int32(row), "valid": np.bool_(True),
            "n_skipped": np.int32(len(skipped))}

  def mtg_row(self, record, position=None):
    """Eval: [I1, I2, -], distractors [[I1', I2', -]], oracle [o1, o2, 0]."""
    row, skipped = int(record["index"]), []
    ims = [self.reader(b, Place(self, MTG, "MTG", row,
                                f"image_{k + 1}_original", position),
                       skipped) for k, b in enumerate(record["views"])]
    eds = [self.reader(b, Place(self, MTG, "MTG", row,
                                f"image_{k + 1}_inpainted", position),
                       skipped) if ims[k] is not None else None
           for k, b in enumerate(record["edits"])]
    views, view_mask = self.reader.stack(ims + [None])
    dists, dist_mask = self.reader.stack(eds + [None])
    oracle = [oracle_lib.mtg_oracle(decode_mask(p), decode_mask(o))
              for o, p in zip(record["object_masks"], record["part_masks"])]
    return {"views": views, "view_mask": view_mask,
            "distractors": dists[None], "distractor_mask": dist_mask[None],
            "oracle": np.array(oracle + [0.0], np.float32),
            "index": np.int32(row), "valid": np.bool_(True),
            "n_skipped": np.int32(len(skipped))}

  def blank_row(self, mtg=False):
    """Eval padding: the shape of a row, all masks False, index -1."""
    r, n = self.reader.res, 1 if mtg else len(self.sources)
    out = {"views": np.zeros((VIEWS, r, r, 3), np.uint8),
           "view_mask": np.zeros(VIEWS, bool),
           "distractors": np.zeros((n, VIEWS, r, r, 3), np.uint8),
           "distractor_mask": np.zeros((n, VIEWS), bool),
           "index": np.int32(-1), "valid": np.bool_(False),
           "n_skipped": np.int32(0)}
    if mtg:
      out["oracle"] = np.zeros(VIEWS, np.float32)
    return out
