"""Training groups (SPEC.md §4) and eval rows, made from prepared records.

A training group has 6 slots: 3 view slots and 3 distractor slots. The valid
views are permuted (invalid slots stay at the end) and slot 0 is the anchor;
distractor slot k is the distractor drawn on view slot k's background, from
a source drawn uniformly per slot. Randomness comes from one generator per
(seed, epoch, dataset, row, copy), so a group does not depend on sharding,
worker count or batch position. An MTG row is a group with views
[image_1_original, image_2_original, missing] and distractors
[image_1_inpainted, image_2_inpainted, missing], permuted the same way.

Images are decoded and squash-resized to res x res (nearid_jax.preprocess
semantics) and stay uint8; scaling to [-1, 1] happens on device.

A corrupt image raises CorruptImage naming dataset, split, row and field, or,
with skip_corrupt, leaves its slot masked and counts it in `n_skipped` (a
skipped view also masks its distractor; the permutation runs over the views
that decoded).
"""
import io

import numpy as np
from PIL import Image

from nearid_jax import metrics
from nearid_jax import preprocess

VIEWS = 3
NEARID, MTG = 0, 1  # dataset ids in the RNG key and the training entries


class CorruptImage(ValueError):
  """An image that does not decode; the message says where it is."""


def rng_for(seed, epoch, dataset, row, copy):
  return np.random.default_rng([seed, epoch, dataset, row, copy])


def permutation(valid, rng):
  """Valid slots in random order, then the invalid ones in order."""
  valid = np.asarray(valid, bool)
  return np.concatenate([rng.permutation(np.flatnonzero(valid)),
                         np.flatnonzero(~valid)])


def decode_mask(data):
  """Encoded mask -> uint8 (H, W), or None when missing."""
  if not len(data):
    return None
  return np.asarray(Image.open(io.BytesIO(data)).convert("L"))


class Decoder:
  """Encoded bytes -> uint8 (res, res, 3); counts what skip_corrupt skipped."""

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
      image = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
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


class GroupMaker:
  """Records -> training groups and eval rows (picklable, for grain workers).

  Args:
    sources: distractor sources a training group draws from, or an eval row
      holds, in order.
    decoder: a Decoder.
    seed: the data seed.
    split: the split's name, for error messages.
  """

  def __init__(self, sources, decoder, seed, split):
    self.sources, self.decoder = tuple(sources), decoder
    self.seed, self.split = seed, split

  def _where(self, dataset, row, field):
    return f"{dataset} split {self.split!r} row {row} field {field!r}"

  def _group(self, views, distractor_of, rng, row, dataset, view_field):
    """views: 3 byte strings; distractor_of(k) -> (bytes, dataset, field)."""
    skipped = []
    ims = [self.decoder(b, self._where(dataset, row, view_field(k)), skipped)
           for k, b in enumerate(views)]
    perm = permutation([im is not None for im in ims], rng)
    dists = [None] * VIEWS
    for k in range(VIEWS):
      if ims[k] is not None:
        data, dset, field = distractor_of(k)
        dists[k] = self.decoder(data, self._where(dset, row, field), skipped)
    views, view_mask = self.decoder.stack([ims[k] for k in perm])
    dists, dist_mask = self.decoder.stack([dists[k] for k in perm])
    return {"views": views, "view_mask": view_mask, "distractors": dists,
            "distractor_mask": dist_mask, "index": np.int32(row),
            "is_mtg": np.bool_(dataset == "MTG"),
            "n_skipped": np.int32(len(skipped))}

  def nearid_group(self, record, epoch, copy=0):
    row = int(record["index"])
    rng = rng_for(self.seed, epoch, NEARID, row, copy)
    # The source of each view slot's distractor, drawn before decoding so a
    # skipped image does not shift the other slots' draws.
    choice = rng.integers(len(self.sources), size=VIEWS)
    def distractor_of(k):
      s = self.sources[choice[k]]
      return record["distractors"][s][k], f"NearID-{s}", f"nimg{k + 1}"
    return self._group(record["views"], distractor_of, rng, row, "NearID",
                       lambda k: f"images{k + 1}")

  def mtg_group(self, record, epoch, copy=0):
    row = int(record["index"])
    rng = rng_for(self.seed, epoch, MTG, row, copy)
    views = list(record["views"]) + [b""]
    edits = list(record["edits"]) + [b""]
    return self._group(
        views, lambda k: (edits[k], "MTG", f"image_{k + 1}_inpainted"), rng,
        row, "MTG", lambda k: f"image_{k + 1}_original")

  def nearid_row(self, record):
    """Eval: views in stored order, each source's distractors, no randomness."""
    row, skipped = int(record["index"]), []
    ims = [self.decoder(b, self._where("NearID", row, f"images{k + 1}"),
                        skipped) for k, b in enumerate(record["views"])]
    views, view_mask = self.decoder.stack(ims)
    dists, dist_masks = [], []
    for s in self.sources:
      d = [self.decoder(b, self._where(f"NearID-{s}", row, f"nimg{k + 1}"),
                        skipped) if ims[k] is not None else None
           for k, b in enumerate(record["distractors"][s])]
      d, m = self.decoder.stack(d)
      dists.append(d)
      dist_masks.append(m)
    return {"views": views, "view_mask": view_mask,
            "distractors": np.stack(dists),
            "distractor_mask": np.stack(dist_masks),
            "index": np.int32(row), "valid": np.bool_(True),
            "n_skipped": np.int32(len(skipped))}

  def mtg_row(self, record):
    """Eval: [I1, I2, -], distractors [[I1', I2', -]], oracle [o1, o2, 0]."""
    row, skipped = int(record["index"]), []
    ims = [self.decoder(b, self._where("MTG", row, f"image_{k + 1}_original"),
                        skipped) for k, b in enumerate(record["views"])]
    eds = [self.decoder(b, self._where("MTG", row, f"image_{k + 1}_inpainted"),
                        skipped) if ims[k] is not None else None
           for k, b in enumerate(record["edits"])]
    views, view_mask = self.decoder.stack(ims + [None])
    dists, dist_mask = self.decoder.stack(eds + [None])
    oracle = [metrics.mtg_oracle(decode_mask(p), decode_mask(o))
              for o, p in zip(record["object_masks"], record["part_masks"])]
    return {"views": views, "view_mask": view_mask,
            "distractors": dists[None], "distractor_mask": dist_mask[None],
            "oracle": np.array(oracle + [0.0], np.float32),
            "index": np.int32(row), "valid": np.bool_(True),
            "n_skipped": np.int32(len(skipped))}

  def blank_row(self, mtg=False):
    """Eval padding: the shape of a row, all masks False, index -1."""
    r, n = self.decoder.res, 1 if mtg else len(self.sources)
    out = {"views": np.zeros((VIEWS, r, r, 3), np.uint8),
           "view_mask": np.zeros(VIEWS, bool),
           "distractors": np.zeros((n, VIEWS, r, r, 3), np.uint8),
           "distractor_mask": np.zeros((n, VIEWS), bool),
           "index": np.int32(-1), "valid": np.bool_(False),
           "n_skipped": np.int32(0)}
    if mtg:
      out["oracle"] = np.zeros(VIEWS, np.float32)
    return out
