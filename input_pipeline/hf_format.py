"""Hugging Face `datasets` on-disk formats, read and written with pyarrow alone.

One split of a dataset is a table; it sits on disk in one of three layouts:
- a `save_to_disk` Dataset folder: `data-XXXXX-of-YYYYY.arrow` shards (Arrow
  IPC streams), `dataset_info.json` (the features), `state.json` (shard list);
- a `save_to_disk` DatasetDict folder: `dataset_dict.json` and one such
  folder per split (`train/`, `test/`);
- the hub's Parquet: `data/<split>-XXXXX-of-YYYYY.parquet`.
Image columns are structs `{bytes, path}`; a missing image is null.

`Table` reads rows by position (shards are memory-mapped, Parquet row groups
loaded on demand), so a builder walks a split file without loading all
images. `write` produces the second layout or Parquet, with the schema,
metadata and JSON files `datasets` 5.x writes (`datasets.load_from_disk`
reads them back: tests/test_input_synthetic.py).
"""
import bisect
import glob
import hashlib
import json
import os

import pyarrow as pa
import pyarrow.parquet as pq

IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
# Our column kinds -> (arrow type, `datasets` feature JSON).
KINDS = {
    "int64": (pa.int64(), {"dtype": "int64", "_type": "Value"}),
    "string": (pa.string(), {"dtype": "string", "_type": "Value"}),
    "image": (IMAGE, {"_type": "Image"}),
}


class FormatError(ValueError):
  """A dataset folder that is not in any HF on-disk layout we read."""


def _parquet_files(path, split):
  return sorted(glob.glob(os.path.join(path, "data", f"{split}-*.parquet")))


class Table:
  """Rows of one split by position: `len(t)`, `t.column_names`, `t.row(i)`."""

  def __init__(self, path, split="train"):
    self.path, self.split = path, split
    self._loaded = (None, None)  # (chunk number, pyarrow table): one cached
    if os.path.exists(os.path.join(path, split, "state.json")):
      path = os.path.join(path, split)  # a DatasetDict
    if os.path.exists(os.path.join(path, "state.json")):
      self._init_arrow(path)
    elif _parquet_files(path, split):
      self._init_parquet(_parquet_files(path, split))
    else:
      raise FormatError(
          f"{self.path}: no split {split!r} in a Hugging Face on-disk layout "
          f"(looked for {split}/state.json, state.json and "
          f"data/{split}-*.parquet)")
    self.starts = [0]
    for n in self._sizes:
      self.starts.append(self.starts[-1] + n)

  def _init_arrow(self, folder):
    with open(os.path.join(folder, "state.json")) as f:
      files = [d["filename"] for d in json.load(f)["_data_files"]]
    tables = []
    for name in files:
      with pa.memory_map(os.path.join(folder, name)) as source:
        tables.append(pa.ipc.open_stream(source).read_all())  # zero-copy
    self.schema = tables[0].schema
    self._sizes = [t.num_rows for t in tables]
    self._load = tables.__getitem__

  def _init_parquet(self, files):
    chunks = []  # (file, row group)
    for name in files:
      meta = pq.ParquetFile(name).metadata
      chunks += [(name, g, meta.row_group(g).num_rows)
                 for g in range(meta.num_row_groups)]
    self.schema = pq.read_schema(files[0])
    self._sizes = [n for _, _, n in chunks]
    self._load = lambda c: pq.ParquetFile(chunks[c][0]).read_row_group(
        chunks[c][1])

  def __len__(self):
    return self.starts[-1]

  @property
  def column_names(self):
    return list(self.schema.names)

  def row(self, i):
    """Row `i` as a dict of Python values (images as {bytes, path} dicts)."""
    if not 0 <= i < len(self):
      raise IndexError(f"{self.path}: row {i} out of range (0..{len(self)})")
    chunk = bisect.bisect_right(self.starts, i) - 1
    if self._loaded[0] != chunk:
      self._loaded = (chunk, self._load(chunk))
    return self._loaded[1].slice(i - self.starts[chunk], 1).to_pylist()[0]


def image_bytes(value, table):
  """An image cell -> encoded bytes, or None when the image is missing."""
  if value is None:
    return None
  if value.get("bytes"):
    return value["bytes"]
  path = value.get("path")
  if not path:
    return None
  if not os.path.isabs(path):  # `datasets` stores paths next to the data
    path = os.path.join(table.path, path)
  with open(path, "rb") as f:
    return f.read()


def _schema(columns):
  features = {name: KINDS[kind][1] for name, (kind, _) in columns.items()}
  meta = {"huggingface": json.dumps({"info": {"features": features}})}
  fields = [(name, KINDS[kind][0]) for name, (kind, _) in columns.items()]
  return pa.schema(fields, metadata=meta), features


def _shards(table, num_shards):
  n = table.num_rows
  bounds = [n * s // num_shards for s in range(num_shards + 1)]
  return [table.slice(a, b - a) for a, b in zip(bounds[:-1], bounds[1:])]


def _write_dataset_folder(folder, table, features, num_shards):
  os.makedirs(folder, exist_ok=True)
  names = []
  for s, shard in enumerate(_shards(table, num_shards)):
    names.append(f"data-{s:05d}-of-{num_shards:05d}.arrow")
    with pa.OSFile(os.path.join(folder, names[-1]), "wb") as sink:
      with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(shard)
  info = {"citation": "", "description": "", "features": features,
          "homepage": "", "license": ""}
  with open(os.path.join(folder, "dataset_info.json"), "w") as f:
    json.dump(info, f, indent=2)
  digest = hashlib.sha256(repr((names, table.num_rows)).encode()).hexdigest()
  state = {"_data_files": [{"filename": n} for n in names],
           "_fingerprint": digest[:16], "_format_columns": None,
           "_format_kwargs": {}, "_format_type": None,
           "_output_all_columns": False, "_split": None}
  with open(os.path.join(folder, "state.json"), "w") as f:
    json.dump(state, f, indent=2)


def write(path, splits, fmt="arrow", num_shards=1):
  """Writes a dataset in an HF on-disk layout.

  Args:
    path: the dataset folder (created).
    splits: {split: {column: (kind, values)}}, kind one of KINDS; image
      values are encoded bytes or None.
    fmt: "arrow" (`save_to_disk` DatasetDict: `dataset_dict.json` and one
      folder per split) or "parquet" (`data/<split>-*.parquet`, as the hub).
    num_shards: files per split.
  """
  if fmt not in ("arrow", "parquet"):
    raise ValueError(f"unknown format {fmt!r}: 'arrow' or 'parquet'")
  for split, columns in splits.items():
    schema, features = _schema(columns)
    arrays = {}
    for name, (kind, values) in columns.items():
      if kind == "image":
        values = [None if v is None else {"bytes": v, "path": None}
                  for v in values]
      arrays[name] = values
    table = pa.table(arrays, schema=schema)
    if fmt == "arrow":
      _write_dataset_folder(os.path.join(path, split), table, features,
                            num_shards)
    else:
      os.makedirs(os.path.join(path, "data"), exist_ok=True)
      for s, shard in enumerate(_shards(table, num_shards)):
        name = f"{split}-{s:05d}-of-{num_shards:05d}.parquet"
        # Small row groups: readers load one group at a time.
        pq.write_table(shard, os.path.join(path, "data", name),
                       row_group_size=64)
  if fmt == "arrow":
    with open(os.path.join(path, "dataset_dict.json"), "w") as f:
      json.dump({"splits": list(splits)}, f)
