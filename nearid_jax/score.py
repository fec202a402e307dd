"""Scores image pairs with any checkpoint: the cosine of their embeddings.

  python -m nearid_jax.score --model PATH --pairs pairs.csv --out scores.csv
  python -m nearid_jax.score --model PATH --a refs/ --b generated/ --out s.csv

--pairs: a CSV with header columns `a` and `b` (image paths, absolute or
relative to the CSV's folder); other columns are copied to the output.
--a/--b: the files of two folders paired by their relative path.
The output holds the input columns plus `score` (cosine of the L2-normalised
embeddings), written beside --out and renamed into place when complete.
Every distinct image is embedded once, in batches split over the local
devices. A missing or unreadable image stops the command before anything is
written, naming the file and the CSV line; --skip_bad writes such rows with
an empty score and the reason in an `error` column instead.

--dreambench HUMAN_DIR (with --pairs holding `key` and `method` columns, a =
reference, b = generated image) also writes DreamBench++ score files
{key: 100 * cos} in the human files' key order, one per method, and prints
the metric-human correlation M-H of each category.
"""
import concurrent.futures
import csv
import os
import sys
import tempfile
import time

from absl import app
from absl import flags
import jax
import numpy as np
from PIL import Image

from input_pipeline import preprocess
from nearid_jax import metrics
from nearid_jax import sharding
from nearid_jax.cpu import xla_flags
from nearid_jax.evaluators import dreambench as dreambench_lib
from nearid_jax.evaluators import embed as embed_lib
from nearid_jax.model import NearID

_MODEL = flags.DEFINE_string(
    "model", None, "A checkpoint NearID.load reads: HF or NearID release "
    "directory, big_vision .npz, training workdir.")
_PAIRS = flags.DEFINE_string("pairs", None, "CSV with columns a,b.")
_A = flags.DEFINE_string("a", None, "Folder of first images (with --b).")
_B = flags.DEFINE_string("b", None, "Folder of second images (with --a).")
_OUT = flags.DEFINE_string("out", None, "Output CSV.")
_BATCH = flags.DEFINE_integer("batch_size", 64, "Images per batch (all "
                              "local devices together).")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"],
                           "The tower's matmul dtype.")
_SKIP_BAD = flags.DEFINE_bool("skip_bad", False, "Write rows whose images "
                              "cannot be read with an empty score.")
_DREAMBENCH = flags.DEFINE_string(
    "dreambench", None, "DreamBench++ human ratings folder (group1/, "
    "group2/): also write score files and print M-H.")
_DREAMBENCH_OUT = flags.DEFINE_string(
    "dreambench_out", None, "Where the DreamBench++ score files go (default: "
    "the folder 'dreambench' beside --out).")


class Table:
  """Rows to score: the input columns and each row's two image paths."""

  def __init__(self, columns, rows, a, b, where):
    self.columns = columns  # output columns before `score`
    self.rows = rows        # dicts of the input cells
    self.a, self.b = a, b   # resolved paths, one per row
    self.where = where      # row -> "FILE line N", for messages


def read_pairs(path):
  """A CSV with columns a, b (paths relative to its folder or absolute)."""
  folder = os.path.dirname(os.path.abspath(path))
  with open(path, newline="") as f:
    reader = csv.DictReader(f)
    columns = list(reader.fieldnames or [])
    missing = [c for c in ("a", "b") if c not in columns]
    if missing:
      raise ValueError(f"{path}: no column {missing} in the header "
                       f"{columns}; the image columns are named a and b")
    rows, a, b, where = [], [], [], []
    for row in reader:
      line = f"{path} line {reader.line_num}"
      for c in ("a", "b"):
        if not row.get(c):
          raise ValueError(f"{line}: empty column {c!r}")
      rows.append(row)
      a.append(os.path.join(folder, row["a"]))
      b.append(os.path.join(folder, row["b"]))
      where.append(line)
  return Table(columns, rows, a, b, where)


def _image_files(folder):
  exts = {e for e, fmt in Image.registered_extensions().items()
          if fmt in Image.OPEN}
  out = set()
  for d, _, files in os.walk(folder):
    for f in files:
      if not f.startswith(".") and os.path.splitext(f)[1].lower() in exts:
        out.add(os.path.relpath(os.path.join(d, f), folder))
  return out


def folder_pairs(dir_a, dir_b, log):
  """The image files of two folders, paired by relative path; the unpaired
  ones are listed (the first 20) and counted on `log`."""
  for d in (dir_a, dir_b):
    if not os.path.isdir(d):
      raise FileNotFoundError(f"{d}: no such folder")
  files_a, files_b = _image_files(dir_a), _image_files(dir_b)
  for d, only in ((dir_a, files_a - files_b), (dir_b, files_b - files_a)):
    if only:
      only = sorted(only)
      log(f"{len(only)} images only in {d}, not scored: "
          f"{', '.join(only[:20])}{' ...' if len(only) > 20 else ''}")
  both = sorted(files_a & files_b)
  a = [os.path.join(dir_a, f) for f in both]
  b = [os.path.join(dir_b, f) for f in both]
  return Table(["a", "b"], [{"a": x, "b": y} for x, y in zip(a, b)], a, b,
               [f"the pair {f}" for f in both])


def _read(path):
  """-> (uint8 image, None) or (None, the reason it cannot be read)."""
  if not os.path.isfile(path):
    return None, "not found"
  try:
    return preprocess.read_image(path), None
  except Exception as e:  # pylint: disable=broad-except
    return None, f"cannot read image ({e})"


class Progress:
  """images/s and ETA on one stderr line."""

  def __init__(self, total):
    self.total, self.start = total, time.monotonic()

  def __call__(self, done):
    rate = done / max(time.monotonic() - self.start, 1e-9)
    eta = (self.total - done) / rate if rate else 0.0
    sys.stderr.write(f"\r{done}/{self.total} images, {rate:.1f} images/s, "
                     f"ETA {eta:.0f} s ")
    if done == self.total:
      sys.stderr.write("\n")
    sys.stderr.flush()


def embed_files(model, paths, batch_size=64, show=None, skip_bad=False):
  """Distinct image paths -> ({path: unit embedding}, {path: error}).

  Images are decoded in threads (PIL releases the GIL) and resized as
  NearID.embed does (preprocess.resize_uint8: "tf" rounds to uint8); each
  batch is padded to one shape and split over the local devices. Without
  skip_bad it stops after the first batch with an unreadable image.
  """
  mesh = sharding.make_mesh(((sharding.DATA, -1),), jax.local_devices())
  n_dev = sharding.batch_shards(mesh)
  # One compiled shape: every batch padded to the same size, which the
  # devices split evenly.
  batch_size = -(-min(batch_size, max(len(paths), 1)) // n_dev) * n_dev
  embedder = embed_lib.Embedder(model, {"head": model.params["head"]}, mesh)
  res = model.arch.image_size
  emb, errors = {}, {}

  def load(path):
    image, error = _read(path)
    if image is None:
      return None, error
    return preprocess.resize_uint8(image, res, model.resize), None

  with concurrent.futures.ThreadPoolExecutor(os.cpu_count()) as pool:
    batches = [paths[i:i + batch_size]
               for i in range(0, len(paths), batch_size)]
    # The next batch decodes while the devices embed this one.
    loading = pool.map(load, batches[0]) if batches else None
    for i, part in enumerate(batches):
      loaded = list(loading)
      if i + 1 < len(batches):
        loading = pool.map(load, batches[i + 1])
      ok = [(p, im) for p, (im, err) in zip(part, loaded) if im is not None]
      errors.update({p: err for p, (im, err) in zip(part, loaded)
                     if im is None})
      if ok:
        x = np.zeros((batch_size, res, res, 3), np.uint8)
        x[:len(ok)] = [im for _, im in ok]
        out = np.asarray(embedder(x)["head"], np.float32)
        emb.update({p: out[j] for j, (p, _) in enumerate(ok)})
      if errors and not skip_bad:
        break
      if show:
        show(min((i + 1) * batch_size, len(paths)))
  return emb, errors


def score_table(model, table, batch_size=64, skip_bad=False, show=None):
  """-> (columns, rows): the table's rows with `score` (and `error`)."""
  first = {}  # path -> where it first appears; errors name that
  for i, (a, b) in enumerate(zip(table.a, table.b)):
    first.setdefault(a, (i, "a"))
    first.setdefault(b, (i, "b"))
  paths = list(first)

  def problem(path, why):
    i, col = first[path]
    return f"{table.where[i]}, column {col}: image {path}: {why}"

  if not skip_bad:  # missing files stop before any compute
    for p in paths:
      if not os.path.isfile(p):
        raise FileNotFoundError(problem(p, "not found"))
  emb, errors = embed_files(model, paths, batch_size, show, skip_bad)
  if errors and not skip_bad:
    p, why = next(iter(errors.items()))
    raise ValueError(problem(p, why))
  good = [i for i, (a, b) in enumerate(zip(table.a, table.b))
          if a in emb and b in emb]
  cos = np.zeros(0)
  if good:
    cos = np.asarray(metrics.cosine_rows(
        np.stack([emb[table.a[i]] for i in good]),
        np.stack([emb[table.b[i]] for i in good])), np.float64)
  scores = dict(zip(good, cos))
  columns = table.columns + ["score"] + (["error"] if skip_bad else [])
  rows = []
  for i, row in enumerate(table.rows):
    row = {**row, "score": repr(float(scores[i])) if i in scores else ""}
    if skip_bad:
      row["error"] = "; ".join(f"{c}: {errors[p]}" for c, p in
                               (("a", table.a[i]), ("b", table.b[i]))
                               if p in errors)
    rows.append(row)
  return columns, rows


def write_csv(path, columns, rows):
  """Written beside `path` and renamed into place: whole or not at all."""
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=".score-", suffix=".csv", dir=folder)
  try:
    with os.fdopen(fd, "w", newline="") as f:
      writer = csv.DictWriter(f, columns, extrasaction="ignore")
      writer.writeheader()
      writer.writerows(rows)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def dreambench_rows(table, human_dir):
  """{method: {key: row}} with each method's keys in the human files' order,
  checked before any compute: the table needs columns key and method (a the
  reference, b the generated image), every key of a method's human files
  once."""
  for c in ("key", "method"):
    if c not in table.columns:
      raise ValueError(f"--dreambench needs a column {c!r} in the pairs CSV "
                       f"(it has {table.columns})")
  by_method = {}
  for i, row in enumerate(table.rows):
    keys = by_method.setdefault(row["method"], {})
    if row["key"] in keys:
      raise ValueError(f"{table.where[i]}: key {row['key']!r} of method "
                       f"{row['method']!r} again (first at "
                       f"{table.where[keys[row['key']]]})")
    keys[row["key"]] = i
  return {m: {k: keys[k] for k in dreambench_lib.check_keys(list(keys),
                                                            human_dir, m)}
          for m, keys in by_method.items()}


def dreambench(plan, rows, human_dir, out_dir):
  """Writes out_dir/{method}.json = {key: 100 * cos} -> {category: M-H}."""
  for method, keys in plan.items():
    scores = {k: 100.0 * float(rows[i]["score"]) for k, i in keys.items()}
    metrics.write_dreambench_scores(scores, out_dir, method)
  return metrics.dreambench_mh(human_dir, out_dir, methods=tuple(plan),
                               categories=metrics.DB_CATEGORIES +
                               (metrics.DB_ALL,))


def run(model, out, pairs=None, a=None, b=None, batch_size=64, dtype="float32",
        skip_bad=False, dreambench_dir=None, dreambench_out=None,
        log=print):
  """The command: returns the rows written (and prints M-H with
  --dreambench)."""
  if bool(pairs) == bool(a or b) or bool(a) != bool(b):
    raise ValueError("give --pairs FILE.csv, or --a DIR and --b DIR")
  if dreambench_dir and not pairs:
    raise ValueError("--dreambench needs --pairs (with key and method "
                     "columns)")
  if dreambench_dir and skip_bad:
    raise ValueError("--dreambench needs every image: drop --skip_bad")
  table = read_pairs(pairs) if pairs else folder_pairs(a, b, log)
  plan = dreambench_rows(table, dreambench_dir) if dreambench_dir else None
  model = NearID.load(model, dtype=dtype)
  n = len(set(table.a + table.b))
  log(f"{len(table.rows)} pairs, {n} distinct images")
  columns, rows = score_table(model, table, batch_size, skip_bad,
                              show=Progress(n) if n else None)
  mh = None
  if dreambench_dir:
    db_out = dreambench_out or os.path.join(
        os.path.dirname(os.path.abspath(out)), "dreambench")
    mh = dreambench(plan, rows, dreambench_dir, db_out)
  write_csv(out, columns, rows)
  if skip_bad:
    bad = sum(1 for r in rows if r["error"])
    log(f"{bad} of {len(rows)} rows not scored (images that cannot be read; "
        "see the error column)")
  log(f"wrote {out}")
  if mh is not None:
    log(f"DreamBench++ M-H ({db_out}):")
    for c, v in mh.items():
      log(f"  {c}: {v:.4f}")
  return rows, mh


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  # Before JAX starts its backend: XLA reads XLA_FLAGS once.
  xla_flags.add_defaults(os.environ)
  try:
    run(_MODEL.value, _OUT.value, _PAIRS.value, _A.value, _B.value,
        _BATCH.value, _DTYPE.value, _SKIP_BAD.value, _DREAMBENCH.value,
        _DREAMBENCH_OUT.value)
  except (OSError, ValueError) as e:
    sys.exit(f"error: {e}")


if __name__ == "__main__":
  flags.mark_flags_as_required(["model", "out"])
  app.run(main)
