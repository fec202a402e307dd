"""A synthetic dataset in the NearID release's own on-disk format.

    python -m input_pipeline.synthetic --out data/synthetic \
        --identities 300 --res 64 --sources Flux,Qwen,SDXL --mtg 60

writes what a user downloads from the hub, so the real builders read it:
  <out>/NearID/              positives, `save_to_disk` DatasetDict (split
                             `train`) or hub Parquet (--format parquet):
                             id, category, category_description,
                             images1..3, masks1..3, n_images, objaverse_id,
                             prompts1..3, split
  <out>/NearID-<source>/     distractors, one dataset per source, row-aligned:
                             id, nimg1..3, n_images, prompts1..3
  <out>/splits/{train,val,test}.json
                             0-based row positions, as the release's files
  <out>/mtg-dataset/         with --mtg N: Mind-the-Glitch fields, splits
                             train/test

Identity: an object of a body and limbs, each a shape, a palette colour and
a texture, in a fixed arrangement. A view draws it on its own background
(gradient, stripes, checks or blobs in grey) with its own position,
scale, rotation, aspect and lighting. A distractor draws a near-identity
variant (one part edited) in the same view: the same background array, pose
and light, so every pixel outside the object mask equals the view's. The
edit stays inside the original part's footprint, which keeps that true.
Sources differ in what they edit (SOURCE_EDITS). Backgrounds cover most of
each image, so raw pixel similarity prefers the distractor; identity lives in
the parts' colours, shapes and textures, which are saturated and invariant
to the view (part areas scale with the object), so a trained head can learn
it. The knobs below set how hard that is.

Images and masks are PNG (lossless), so pixel equalities hold exactly.
numpy and PIL only; the default size builds in seconds on one core.
"""
import colorsys
import dataclasses
import io
import json
import os

from absl import app
from absl import flags
import numpy as np
from PIL import Image

from input_pipeline import hf_format
from input_pipeline import splits as splits_lib

SHAPES = ("ellipse", "box", "diamond", "triangle")
TEXTURES = ("solid", "stripes", "dots", "checks")
# Saturated, evenly spaced hues: identity colours (backgrounds are duller).
PALETTE = np.array([colorsys.hsv_to_rgb(h / 10, 0.85, 0.92)
                    for h in range(10)], np.float32)
# What each released source's synthetic stand-in edits in one part.
SOURCE_EDITS = {
    "Flux": ("colour",), "Flux_1024": ("colour",),
    "FluxC": ("shape",), "FluxC_1024": ("shape",),
    "PowerPaint": ("shape", "colour"),
    "Qwen": ("texture",), "Qwen_1328": ("texture",),
    "SDXL": ("colour", "texture"), "SDXL_1024": ("colour", "texture"),
}
CATEGORY = {"ellipse": "blob", "box": "crate", "diamond": "kite",
            "triangle": "tent"}
SHRINK = 0.75  # an edited shape is drawn this much smaller, clipped to the old
# Difficulty knobs. Backgrounds are grey (luminance patterns only), so
# colour is an object cue a head on a random frozen tower can isolate;
# the object's size (pixels per object unit, as a fraction of the image
# side) and chunky parts keep it visible at 32 px.
BACKGROUND_KINDS = ("gradient", "stripes", "checks", "blobs")
BACKGROUND_SATURATION = (0.0, 0.0)
BACKGROUND_NOISE = 0.03       # grey pixel noise, std
OBJECT_SCALE = (0.3, 0.38)
NUM_PARTS = (3, 3)            # body + limbs, inclusive
BODY_SIZE = (0.5, 0.65)       # half-extents, object units
LIMB_SIZE = (0.32, 0.45)
LIMB_DISTANCE = (0.45, 0.6)   # from the body's centre
HUE_STEP = 3                  # a colour edit moves at least this far round
                              # the 10-hue wheel


@dataclasses.dataclass(frozen=True)
class Part:
  shape: str
  colour: int       # PALETTE index
  texture: str
  x: float          # centre in object units (the object spans about [-1, 1])
  y: float
  a: float          # half-extents
  b: float
  rot: float        # radians
  clip: str = ""    # after a shape edit: the old shape, drawn at full size


@dataclasses.dataclass(frozen=True)
class View:
  background: np.ndarray  # float32 (res, res, 3) in [0, 1]
  cx: float               # object centre, pixels
  cy: float
  radius: float           # pixels per object unit
  rot: float
  aspect: float
  gain: float             # lighting: gain + slope . (u, v)
  slope: tuple


def sample_identity(rng):
  n = int(rng.integers(NUM_PARTS[0], NUM_PARTS[1] + 1))
  colours = rng.choice(len(PALETTE), n, replace=False)
  textures = rng.choice(TEXTURES, n, p=[0.4, 0.2, 0.2, 0.2])
  parts = []
  for k in range(n):
    if k == 0:  # the body
      x = y = 0.0
      a, b = rng.uniform(*BODY_SIZE, 2)
    else:
      angle = 2 * np.pi * k / (n - 1) + rng.uniform(-0.4, 0.4)
      dist = rng.uniform(*LIMB_DISTANCE)
      x, y = dist * np.cos(angle), dist * np.sin(angle)
      a, b = rng.uniform(*LIMB_SIZE, 2)
    parts.append(Part(str(rng.choice(SHAPES)), int(colours[k]),
                      str(textures[k]), float(x), float(y), float(a),
                      float(b), float(rng.uniform(-0.5, 0.5))))
  return tuple(parts)


def edit(parts, edits, rng):
  """A near-identity variant, part k edited in each of `edits`: (parts, k)."""
  k = int(rng.integers(len(parts)))
  p = parts[k]
  if "colour" in edits:  # a distinct hue the object does not use yet
    n = len(PALETTE)
    far = [c for c in range(n) if min((c - p.colour) % n,
                                      (p.colour - c) % n) >= HUE_STEP]
    unused = [c for c in far if c not in {q.colour for q in parts}]
    p = dataclasses.replace(p, colour=int(rng.choice(unused or far)))
  if "shape" in edits:
    shape = str(rng.choice([s for s in SHAPES if s != p.shape]))
    p = dataclasses.replace(p, shape=shape, clip=p.shape)
  if "texture" in edits:
    texture = str(rng.choice([t for t in TEXTURES if t != p.texture]))
    p = dataclasses.replace(p, texture=texture)
  return parts[:k] + (p,) + parts[k + 1:], k


def _hsv(h, s, v):
  return np.array(colorsys.hsv_to_rgb(h, s, v), np.float32)


def _muted(rng):
  return _hsv(rng.uniform(), rng.uniform(*BACKGROUND_SATURATION),
              rng.uniform(0.3, 1.0))


def background(rng, res):
  """A muted, structured background: most of the image's pixel energy."""
  y, x = np.mgrid[0:res, 0:res].astype(np.float32) / res
  c0, c1 = _muted(rng), _muted(rng)
  kind = BACKGROUND_KINDS[rng.integers(len(BACKGROUND_KINDS))]
  angle = rng.uniform(0, np.pi)
  t = np.cos(angle) * x + np.sin(angle) * y
  if kind == "gradient":
    w = (t - t.min()) / (t.max() - t.min())
  elif kind == "stripes":
    w = (np.floor(t * rng.uniform(3, 8)) % 2).astype(np.float32)
  elif kind == "checks":
    cells = rng.uniform(3, 7)
    w = (np.floor(x * cells) + np.floor(y * cells)) % 2
  else:  # soft blobs
    w = np.zeros_like(x)
    for _ in range(4):
      mx, my, s = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.1, 0.3)
      w = np.maximum(w, np.exp(-((x - mx) ** 2 + (y - my) ** 2) / s ** 2))
  img = c0 + w[..., None] * (c1 - c0)
  img = img + rng.normal(0, BACKGROUND_NOISE, (res, res, 1))
  return np.clip(img, 0, 1).astype(np.float32)


def sample_view(rng, res):
  radius = res * rng.uniform(*OBJECT_SCALE)
  margin = radius * 0.95
  return View(background(rng, res),
              cx=float(rng.uniform(margin, res - margin)),
              cy=float(rng.uniform(margin, res - margin)),
              radius=float(radius), rot=float(rng.uniform(-0.6, 0.6)),
              aspect=float(rng.uniform(0.85, 1.15)),
              gain=float(rng.uniform(0.7, 1.1)),
              slope=tuple(float(s) for s in rng.uniform(-0.15, 0.15, 2)))


def _rotate(u, v, angle):
  c, s = np.cos(angle), np.sin(angle)
  return c * u + s * v, -s * u + c * v


def _inside(shape, nu, nv):
  if shape == "ellipse":
    return nu ** 2 + nv ** 2 <= 1
  if shape == "box":
    return (np.abs(nu) <= 1) & (np.abs(nv) <= 1)
  if shape == "diamond":
    return np.abs(nu) + np.abs(nv) <= 1
  return (np.abs(nv) <= 1) & (np.abs(nu) <= (nv + 1) / 2)  # triangle


def _texture(texture, qu, qv):
  """Where the light second colour shows, in part coordinates."""
  if texture == "stripes":
    return np.floor(qu / 0.18) % 2 == 0
  if texture == "checks":
    return (np.floor(qu / 0.2) + np.floor(qv / 0.2)) % 2 == 0
  if texture == "dots":
    return ((qu % 0.3) - 0.15) ** 2 + ((qv % 0.3) - 0.15) ** 2 <= 0.1 ** 2
  return np.zeros(qu.shape, bool)


def render(parts, view):
  """-> (uint8 image (res, res, 3), int8 labels: part index or -1)."""
  res = view.background.shape[0]
  py, px = np.mgrid[0:res, 0:res].astype(np.float32) + 0.5
  u, v = _rotate((px - view.cx) / view.radius, (py - view.cy) / view.radius,
                 view.rot)
  u, v = u / view.aspect, v * view.aspect
  light = view.gain + view.slope[0] * u + view.slope[1] * v
  img = view.background.copy()
  labels = np.full((res, res), -1, np.int8)
  for k, p in enumerate(parts):
    qu, qv = _rotate(u - p.x, v - p.y, p.rot)
    if p.clip:
      inside = (_inside(p.shape, qu / (p.a * SHRINK), qv / (p.b * SHRINK)) &
                _inside(p.clip, qu / p.a, qv / p.b))
    else:
      inside = _inside(p.shape, qu / p.a, qv / p.b)
    colour = np.broadcast_to(PALETTE[p.colour], img.shape).copy()
    light_part = 0.25 * PALETTE[p.colour] + 0.75
    colour[_texture(p.texture, qu, qv)] = light_part
    colour = colour * light[..., None]
    img[inside] = colour[inside]
    labels[inside] = k
  img = np.clip(np.round(img * 255), 0, 255).astype(np.uint8)
  return img, labels


def png(array):
  buf = io.BytesIO()
  Image.fromarray(array).save(buf, format="PNG", compress_level=1)
  return buf.getvalue()


def _describe(parts):
  names = ["red", "orange", "yellow", "lime", "green", "teal", "cyan", "blue",
           "purple", "pink"]
  return "a toy of " + ", ".join(
      f"a {'' if p.texture == 'solid' else p.texture + ' '}"
      f"{names[p.colour]} {p.shape}" for p in parts)


def nearid_rows(num_identities, res, seed, sources):
  """The positives' and each source's columns: ({col: (kind, values)}, ...)."""
  unknown = sorted(set(sources) - set(SOURCE_EDITS))
  if unknown:
    raise ValueError(f"unknown sources {unknown}: one of {list(SOURCE_EDITS)}")
  rng = np.random.default_rng(seed)
  ids = 100 + np.cumsum(rng.integers(1, 5, num_identities))  # sparse, as real
  pos = {c: [] for c in ("category", "category_description", "n_images",
                         "objaverse_id", "images1", "images2", "images3",
                         "masks1", "masks2", "masks3", "prompts1", "prompts2",
                         "prompts3")}
  neg = {s: {c: [] for c in ("nimg1", "nimg2", "nimg3", "prompts1",
                             "prompts2", "prompts3")} for s in sources}
  for _ in range(num_identities):
    parts = sample_identity(rng)
    n_views = 3 if rng.uniform() < 0.7 else 2
    views = [sample_view(rng, res) for _ in range(n_views)]
    variants = {s: edit(parts, SOURCE_EDITS[s], rng)[0] for s in sources}
    pos["category"].append("toy_" + CATEGORY[parts[0].shape])
    pos["category_description"].append(_describe(parts))
    pos["n_images"].append(n_views)
    pos["objaverse_id"].append(rng.bytes(16).hex())
    for k in range(3):
      prompt = f"{_describe(parts)}, view {k + 1}" if k < n_views else None
      img = mask = None
      if k < n_views:
        img, labels = render(parts, views[k])
        mask = png(np.where(labels >= 0, 255, 0).astype(np.uint8))
        img = png(img)
      pos[f"images{k + 1}"].append(img)
      pos[f"masks{k + 1}"].append(mask)
      pos[f"prompts{k + 1}"].append(prompt)
      for s in sources:
        nimg = png(render(variants[s], views[k])[0]) if k < n_views else None
        neg[s][f"nimg{k + 1}"].append(nimg)
        neg[s][f"prompts{k + 1}"].append(
            None if prompt is None else f"{_describe(variants[s])} ({s})")
  ids = [int(i) for i in ids]
  pos_cols = {"id": ("int64", ids)}
  pos_cols.update({c: (_kind(c), v) for c, v in pos.items()})
  neg_cols = {}
  for s in sources:
    neg_cols[s] = {"id": ("int64", list(ids)),  # own lists: editable apart
                   "n_images": ("int64", list(pos["n_images"]))}
    neg_cols[s].update({c: (_kind(c), v) for c, v in neg[s].items()})
  return pos_cols, neg_cols


def mtg_rows(num_rows, res, seed):
  """Mind-the-Glitch columns: two views and a part edit of each."""
  rng = np.random.default_rng(seed)
  cols = {f"image_{i}_{f}": ("image", []) for f in (
      "original", "inpainted", "object_mask", "part_mask") for i in (1, 2)}
  for _ in range(num_rows):
    parts = sample_identity(rng)
    edited, k = edit(parts, SOURCE_EDITS[str(rng.choice(list(SOURCE_EDITS)))],
                     rng)
    for i in (1, 2):
      view = sample_view(rng, res)
      img, labels = render(parts, view)
      img2, labels2 = render(edited, view)
      cols[f"image_{i}_original"][1].append(png(img))
      cols[f"image_{i}_inpainted"][1].append(png(img2))
      obj = np.where(labels >= 0, 255, 0).astype(np.uint8)
      part = np.where((labels == k) | (labels2 == k), 255, 0).astype(np.uint8)
      cols[f"image_{i}_object_mask"][1].append(png(obj))
      cols[f"image_{i}_part_mask"][1].append(png(part))
  return cols


def _kind(column):
  if column.startswith(("images", "masks", "nimg")):
    return "image"
  return "int64" if column == "n_images" else "string"


def _take(cols, rows):
  return {c: (kind, [v[i] for i in rows]) for c, (kind, v) in cols.items()}


def write_nearid(out, pos, neg, splits, fmt="arrow", num_shards=1):
  """Writes positives, sources and split files (columns as nearid_rows's)."""
  n = len(pos["id"][1])
  split_col = [""] * n  # the release's positives carry the split too
  os.makedirs(os.path.join(out, "splits"), exist_ok=True)
  for name, rows in splits.items():
    with open(os.path.join(out, "splits", f"{name}.json"), "w") as f:
      json.dump(rows, f)
    for r in rows:
      split_col[r] = name
  hf_format.write(os.path.join(out, "NearID"),
                  {"train": {**pos, "split": ("string", split_col)}}, fmt,
                  num_shards)
  for s, cols in neg.items():
    hf_format.write(os.path.join(out, f"NearID-{s}"), {"train": cols}, fmt,
                    num_shards)


def write_mtg(out, cols, fmt="arrow", num_shards=1):
  """Writes mtg_rows' columns, the first fifth as split test."""
  n = len(next(iter(cols.values()))[1])
  n_test = max(1, n // 5)
  hf_format.write(os.path.join(out, "mtg-dataset"),
                  {"train": _take(cols, range(n_test, n)),
                   "test": _take(cols, range(n_test))}, fmt, num_shards)


def generate(out, num_identities=300, res=64, seed=0,
             sources=("Flux", "Qwen", "SDXL"), mtg=0, fmt="arrow",
             num_shards=1):
  """Writes the dataset (layout in the module docstring); returns `out`."""
  pos, neg = nearid_rows(num_identities, res, seed, sources)
  write_nearid(out, pos, neg, splits_lib.seeded(num_identities, seed), fmt,
               num_shards)
  if mtg:
    write_mtg(out, mtg_rows(mtg, res, seed + 1), fmt, num_shards)
  return out


def main(argv):
  del argv
  f = flags.FLAGS
  generate(f.out, f.identities, f.res, f.seed, tuple(f.sources), f.mtg,
           f.format)
  print(f"wrote {f.identities} identities to {f.out}")


if __name__ == "__main__":
  # Flags only when run as a script: importing must not claim flag names.
  flags.DEFINE_string("out", None, "Output folder.", required=True)
  flags.DEFINE_integer("identities", 300, "Number of identities.")
  flags.DEFINE_integer("res", 64, "Image side in pixels.")
  flags.DEFINE_integer("seed", 0, "Random seed.")
  flags.DEFINE_list("sources", ["Flux", "Qwen", "SDXL"],
                    f"Distractor sources, of {list(SOURCE_EDITS)}.")
  flags.DEFINE_integer("mtg", 0, "MTG rows (0: none).")
  flags.DEFINE_enum("format", "arrow", ["arrow", "parquet"],
                    "save_to_disk Arrow or hub Parquet.")
  app.run(main)
