"""Feature cache: tokens as the tower's, groups as the image pipeline's.

Run as a script, this file is one process of a multi-process write.
"""
import io
import os
import pickle
import re
import shutil
import sys

import grain
import jax
import ml_dtypes
import numpy as np
from PIL import Image
import pytest

from configs.common import training_config
from fake_data import plant_lock
import input_pipeline
from input_pipeline import hf_format
from input_pipeline import locks
from input_pipeline import splits as splits_lib
from input_pipeline import synthetic
from nearid_jax.training import feature_cache
from input_pipeline import preprocess
from nearid_jax import sharding
from nearid_jax.training import train
from nearid_jax.model import tower_tokens
from nearid_jax.model import NearID
import workers

SOURCES = ("Flux", "Qwen")
N = 12
TRAIN = splits_lib.seeded(N, 0)["train"]
# bfloat16 keeps 8 significant bits: rounding moves a value by at most
# 2^-9 of it; 2^-8 leaves room for the float32 noise of another batch shape.
BF16_RTOL = 2.0 ** -8


def _config(data_dir, manual_dir, **kw):
  c = training_config()
  c.model.variant, c.model.res, c.model.scan = "pico/8", 16, False
  c.total_steps, c.warmup_steps, c.lr = 3, 1, 1e-2
  c.input.update(data_dir=str(data_dir), manual_dir=str(manual_dir),
                 sources=SOURCES, eval_sources=SOURCES, batch_size=8,
                 mtg_repeat=1, num_threads=1, num_workers=0,
                 skip_corrupt=True)
  c.update_from_flattened_dict(kw)
  return c


def _truncated(png):
  return png[:len(png) // 2]  # the header parses; decoding fails


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  """A NearID-format dataset with one corrupt distractor and one corrupt view,
  prepared, and its feature cache."""
  manual = tmp_path_factory.mktemp("hf")
  pos, neg = synthetic.nearid_rows(N, 32, 0, SOURCES)
  neg["Qwen"]["nimg2"][1][TRAIN[0]] = _truncated(
      neg["Qwen"]["nimg2"][1][TRAIN[0]])
  pos["images1"][1][TRAIN[1]] = _truncated(pos["images1"][1][TRAIN[1]])
  synthetic.write_nearid(str(manual), pos, neg, splits_lib.seeded(N, 0))
  synthetic.write_mtg(str(manual), synthetic.mtg_rows(6, 32, 1))
  config = _config(tmp_path_factory.mktemp("tfds"), manual)
  input_pipeline.prepare(config.input)
  cache = str(tmp_path_factory.mktemp("cache"))
  model = NearID.from_config(config)
  meta = feature_cache.write(config, cache, model=model)
  return config, manual, cache, model, meta


def _decode(data):
  return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def _tower(model):
  fn = jax.jit(lambda p, x: tower_tokens(model.tower, p, x))
  return lambda x: np.asarray(fn(model.params["img"], x))


def _assert_bf16_close(cached, want):
  cached = np.asarray(cached, np.float32)
  err = np.abs(cached - want)
  assert np.all(err <= BF16_RTOL * np.abs(want) + 1e-6), err.max()
  # and most values are exactly the float32 tokens rounded to bfloat16
  exact = cached == want.astype(feature_cache.DTYPE).astype(np.float32)
  assert exact.mean() > 0.99


@pytest.mark.parametrize("in_memory_bytes", [None, 0])
def test_cached_tokens_are_the_towers(data, in_memory_bytes):
  config, manual, cache_dir, model, meta = data
  cache = feature_cache.Cache(cache_dir)
  lookup = feature_cache.TokenLookup(cache, skip_corrupt=True,
                                     in_memory_bytes=in_memory_bytes)
  # This small cache is read into memory unless the limit says otherwise.
  assert lookup.in_memory == (in_memory_bytes is None)
  if in_memory_bytes is None:  # a pickled copy (a grain worker's) reads anew
    lookup = pickle.loads(pickle.dumps(lookup))
    assert lookup._loaded is None  # pylint: disable=protected-access
  tower = _tower(model)
  pos = hf_format.Table(str(manual / "NearID"))
  neg = {s: hf_format.Table(str(manual / f"NearID-{s}")) for s in SOURCES}
  assert meta["token_shape"] == [4, 64]  # (16 / 8)^2 patches, pico width
  assert cache.num_nearid == len(TRAIN) and cache.num_mtg == 5
  refs = cache.refs(SOURCES)
  # Every image of every train row, straight from the HF files: its slot's
  # record id -> (image, or None for no image / one that does not decode).
  want, corrupt, where = {}, [], lambda g, k: f"slot {g}, {k}"
  rows, views, dists = refs(0, np.arange(cache.num_nearid))
  np.testing.assert_array_equal(rows, TRAIN)
  for r, v, d in zip(rows, views, dists):
    for k in range(3):
      cells = [(v[k], pos.row(r)[f"images{k + 1}"])]
      cells += [(d[s, k], neg[name].row(r)[f"nimg{k + 1}"])
                for s, name in enumerate(SOURCES)]
      for ref, cell in cells:
        try:
          want[ref] = None if cell is None else preprocess.resize_uint8(
              _decode(cell["bytes"]), 16)
        except OSError:  # the two truncated images
          want[ref] = None
          corrupt.append(ref)
  mtg = hf_format.Table(str(manual / "mtg-dataset"), "train")
  rows, views, edits = refs(1, np.arange(cache.num_mtg))
  for r, v, e in zip(rows, views, edits[:, 0]):
    assert v[2] == e[2] == lookup.NONE  # MTG has two views
    for k in range(2):
      for ref, field in ((v[k], f"image_{k + 1}_original"),
                         (e[k], f"image_{k + 1}_inpainted")):
        want[ref] = preprocess.resize_uint8(
            _decode(mtg.row(int(r))[field]["bytes"]), 16)
  assert sorted(want) == list(range(cache.num_records))  # each record once
  ids = np.array(sorted(want)).reshape(-1, 1)
  loaded, ok, skipped = lookup.load(ids, where)
  np.testing.assert_array_equal(ok[:, 0], [want[i] is not None for i in
                                           sorted(want)])
  assert skipped.sum() == len(corrupt) == meta["corrupt"] == 2
  assert meta["images"] == ok.sum()
  got = lookup.gather(loaded)[:, 0]
  assert got.dtype == feature_cache.DTYPE
  # Slots without an image get the black image's tokens.
  black = np.zeros((16, 16, 3), np.uint8)
  images = np.stack([black if want[i] is None else want[i]
                     for i in sorted(want)])
  want = tower(images)
  _assert_bf16_close(got, want)
  # Different images give tokens far apart: the comparisons above (and the
  # group comparisons below) tell one image, or source, from another.
  real = want[ok[:, 0]]
  gaps = np.abs(real[1:] - real[:-1]).max(axis=(1, 2))
  assert gaps.min() > 10 * BF16_RTOL * np.abs(real).max()
  # A missing slot is no image; a corrupt one stops unless skipped.
  assert not lookup.load(np.array([[lookup.NONE]]), where)[1].any()
  strict = feature_cache.TokenLookup(cache, in_memory_bytes=in_memory_bytes)
  with pytest.raises(input_pipeline.CorruptImage,
                     match=r"slot 0, 1: corrupt image \(feature cache "):
    strict.load(np.array([[ids[0, 0], corrupt[0]]]), where)


def _take(it, n):
  return [next(it) for _ in range(n)]


def test_batches_from_memory_are_those_from_disk(data):
  config, _, cache_dir, model, _ = data
  make = lambda limit: _take(feature_cache.train_iterator(
      config, 0, 1, cache_dir=cache_dir, model=model,
      in_memory_bytes=limit), 4)
  from_memory, from_disk = make(None), make(0)
  for x, y in zip(from_memory, from_disk):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


@pytest.mark.parametrize("process_index,process_count", [(0, 1), (1, 2)])
def test_cached_groups_are_the_image_pipelines(data, process_index,
                                               process_count):
  config, _, cache_dir, model, _ = data
  tower = _tower(model)
  n = 4  # batches of 8 global groups: over two epochs of 9 NearID + 5 MTG
  want = _take(input_pipeline.train_iterator(config.input, process_index,
                                             process_count), n)
  got = _take(feature_cache.train_iterator(
      config, process_index, process_count, cache_dir=cache_dir,
      model=model), n)
  for w, g in zip(want, got):
    assert set(g) == set(w) - {"views", "distractors"} | {"tokens"}
    for k in ("index", "is_mtg", "view_mask", "distractor_mask",
              "n_skipped"):
      np.testing.assert_array_equal(g[k], w[k], err_msg=k)
    b = len(w["index"])
    assert g["tokens"].shape == (b, 6, 4, 64)
    assert g["tokens"].dtype == feature_cache.DTYPE
    # Slot by slot, the tokens of the very image the pipeline put there:
    # the same permutation, the same source drawn.
    images = np.concatenate([w["views"], w["distractors"]], axis=1)
    ref = tower(images.reshape((-1, 16, 16, 3))).reshape(b, 6, 4, 64)
    # Masked slots too: the black image's tokens, as the zero-filled images.
    _assert_bf16_close(g["tokens"], ref)
  groups = np.concatenate([b["index"] for b in got])
  assert len(groups) == n * 8 // process_count
  assert any(b["is_mtg"].any() for b in got)
  if process_count == 1:  # both corrupt images were met and counted
    assert sum(int(b["n_skipped"].sum()) for b in got) >= 2


@pytest.mark.slow  # compiles two train steps
def test_head_steps_on_cache_match_steps_on_images(data):
  config, _, cache_dir, model, _ = data
  # train.setup's pieces on the fixture's model (no second tower init): one
  # jitted step, traced once per batch kind.
  mesh = sharding.make_mesh(config.mesh)
  frozen = jax.device_put(model.params["img"], sharding.weight_shardings(
      mesh, model.params["img"]))
  state, tx = train.create_train_state(config, model.params["head"])
  step = train.jit_train_step(train.make_train_step(model, tx, config), mesh,
                              frozen, model)

  def run(batches):
    state, _ = train.create_train_state(config, model.params["head"])
    state = jax.device_put(state, sharding.replicated(mesh))
    losses = []
    for batch in batches:
      state, metrics = step(frozen, state, sharding.global_batch(batch, mesh))
      losses.append(float(metrics["train/loss"]))
    return jax.device_get(state.params), losses

  want, want_losses = run(_take(
      input_pipeline.train_iterator(config.input, 0, 1), 3))
  got, got_losses = run(_take(feature_cache.train_iterator(
      config, 0, 1, cache_dir=cache_dir, model=model), 3))
  # bf16 tokens are off by <= 2^-9 relative; the loss follows to ~1e-4.
  np.testing.assert_allclose(got_losses, want_losses, rtol=1e-3)
  # The gradients inherit that ~0.2% error. Adam divides it out of most
  # weights (their steps agree to it), but a weight whose gradient is within
  # that noise of zero may step differently, by up to ~lr. So: each leaf's
  # update (3 steps of ~lr, lr = 1e-2) agrees to 2% in L2 norm (we see
  # <= 0.8%), and every weight to lr / 2. The attention key bias is left
  # out: its gradient is exactly zero in theory, so Adam turns float32 noise
  # into lr-sized steps whatever the tokens (as in test_train).
  flat = lambda t: jax.tree_util.tree_flatten_with_path(t)[0]
  for (path, a), (_, b), (_, c) in zip(flat(got), flat(want),
                                       flat(model.params["head"])):
    name = "/".join(p.key for p in path)
    if name.endswith("MultiHeadDotProductAttention_0/key/bias"):
      continue
    update = b - np.asarray(c)
    assert np.linalg.norm(a - b) <= 0.02 * np.linalg.norm(update), name
    np.testing.assert_allclose(a, b, atol=config.lr / 2, rtol=0,
                               err_msg=name)
    assert np.abs(update).max() > config.lr, name  # the head did move


def _refused(config, cache_dir, model, kw, messages):
  other = _config(config.input.data_dir, config.input.manual_dir, **kw)
  with pytest.raises(feature_cache.CacheMismatch) as e:
    feature_cache.train_iterator(other, 0, 1, cache_dir=cache_dir,
                                 model=model)
  assert str(e.value).startswith(f"feature cache {cache_dir} does not "
                                 "match this config: ")
  for m in messages:
    assert m in str(e.value)
  assert str(e.value).count(";") == len(messages) - 1  # nothing else


def test_cache_of_another_tower_is_refused(data):
  config, _, cache_dir, model, _ = data
  # One other tower (its own load): another shape, res and weights.
  _refused(config, cache_dir, None,
           {"model.variant": "mu/8", "model.res": 32, "seed": 1},
           ["variant: the cache has 'pico/8', this config 'mu/8' "
            "(model.variant / model.init)",
            "res: the cache has 16, this config 32 (model.res)",
            "tower weights: sha256 "])
  # Same shape, one weight changed.
  params = jax.tree.map(np.array, model.params)
  params["img"]["Transformer"]["encoder_norm"]["bias"][0] += 1e-3
  _refused(config, cache_dir, NearID(model.arch, params, scan=False), {},
           ["tower weights: sha256 "])


def test_cache_of_other_pixels_or_data_is_refused(data):
  config, _, cache_dir, model, _ = data
  _refused(config, cache_dir, model,
           {"model.dtype": "bfloat16", "model.resize": "tf",
            "input.split": "val", "input.sources": ("Flux", "SDXL")},
           ["dtype: the cache has 'float32', this config 'bfloat16'",
            "resize: the cache has 'pil', this config 'tf' (input.resize)",
            "split: the cache has 'train', this config 'val' (input.split)",
            "sources: no tokens for ['SDXL'], the cache holds ['Flux', "
            "'Qwen'] (input.sources)"])
  # Fewer sources than cached, or no MTG, are served.
  fewer = _config(config.input.data_dir, config.input.manual_dir,
                  **{"input.sources": ("Qwen",), "input.mtg_repeat": 0})
  batch = next(feature_cache.train_iterator(fewer, 0, 1, cache_dir=cache_dir,
                                            model=model))
  assert not batch["is_mtg"].any()


def test_write_keeps_a_matching_cache_and_refuses_another(data):
  config, _, cache_dir, model, meta = data
  said = []
  assert feature_cache.write(config, cache_dir, model=model,
                             log=said.append) == meta
  assert said == [f"feature cache {cache_dir}: verified (the record counts "
                  "of its 1 shard(s)), kept"]
  other = _config(config.input.data_dir, config.input.manual_dir,
                  **{"model.dtype": "bfloat16"})
  with pytest.raises(feature_cache.CacheMismatch,
                     match=r"holds a feature cache for another run \(dtype: "
                     r"the cache has 'float32', this config 'bfloat16'.*\); "
                     r"replace it with --config.input.feature_cache_overwrite"
                     r"=True$"):
    feature_cache.write(other, cache_dir, model=model)


@pytest.fixture(scope="module")
def other_data(tmp_path_factory):
  """Another NearID-format dataset (fewer rows, no MTG), prepared."""
  manual = tmp_path_factory.mktemp("hf_other")
  pos, neg = synthetic.nearid_rows(6, 32, 1, SOURCES)
  synthetic.write_nearid(str(manual), pos, neg, splits_lib.seeded(6, 0))
  config = _config(tmp_path_factory.mktemp("tfds_other"), manual,
                   **{"input.mtg_repeat": 0})
  input_pipeline.prepare(config.input)
  return config


def test_cache_of_another_dataset_is_refused_then_overwritten(
    data, other_data, tmp_path):
  config, _, cache_dir, model, _ = data
  # The same tower, pixels, split and sources: only the data differs.
  with pytest.raises(feature_cache.CacheMismatch) as e:
    feature_cache.train_iterator(other_data, 0, 1, cache_dir=cache_dir,
                                 model=model)
  ours = os.path.join(config.input.data_dir, "nearid", "Flux-Qwen", "1.0.0")
  theirs = os.path.join(other_data.input.data_dir, "nearid", "Flux-Qwen",
                        "1.0.0")
  n_ours, n_theirs = (len(splits_lib.seeded(n, 0)["train"]) for n in (N, 6))
  # Both builds named, with their row counts.
  assert re.search(
      rf"data: the cache was built from {re.escape(ours)} \(rows: test \d+, "
      rf"train {n_ours}, val \d+; inputs sha256 \w{{12}}\.\.\.\), this "
      rf"config reads {re.escape(theirs)} \(rows: test \d+, train "
      rf"{n_theirs}, val \d+; inputs sha256 \w{{12}}\.\.\.\) "
      r"\(input.data_dir\)", str(e.value)), str(e.value)
  assert "feature_cache_overwrite=True" in str(e.value)
  # `--mode cache` refuses it too, unless input.feature_cache_overwrite.
  shutil.copytree(cache_dir, tmp_path / "cache")
  out = str(tmp_path / "cache")
  with pytest.raises(feature_cache.CacheMismatch, match="data: the cache "
                     "was built from .*feature_cache_overwrite=True"):
    feature_cache.write(other_data, out, model=model)
  other = _config(other_data.input.data_dir, other_data.input.manual_dir,
                  **{"input.mtg_repeat": 0,
                     "input.feature_cache_overwrite": True})
  said = []
  meta = feature_cache.write(other, out, model=model, log=said.append)
  assert said[0].startswith(f"feature cache {out}: built for another run "
                            "(data: the cache was built from ")
  assert said[0].endswith("replacing it (input.feature_cache_overwrite)")
  assert len(meta["nearid_rows"]) == n_theirs and not meta["mtg_rows"]
  assert meta["data"] == feature_cache.data_fingerprint(other.input)
  batch = next(feature_cache.train_iterator(other_data, 0, 1, cache_dir=out,
                                            model=model))
  assert set(batch["index"]) <= set(splits_lib.seeded(6, 0)["train"])


def test_cache_without_prepared_data_trains_on_its_rows(data, tmp_path,
                                                       caplog):
  config, _, cache_dir, model, meta = data
  bare = _config(tmp_path / "nothing", tmp_path / "nothing")
  with caplog.at_level("WARNING"):
    batch = next(feature_cache.train_iterator(bare, 0, 1, cache_dir=cache_dir,
                                              model=model))
  assert set(batch["index"][~batch["is_mtg"]]) <= set(TRAIN)
  assert (f"feature cache {cache_dir}: not compared with the data (NearID "
          "with sources ['Flux', 'Qwen'] is not prepared under "
          f"{tmp_path / 'nothing' / 'nearid'}") in caplog.text
  assert f"training on its rows, from {meta['data_dir']}" in caplog.text


def test_truncated_shard_is_named_and_rebuilt(data, tmp_path):
  config, _, cache_dir, model, meta = data
  out = tmp_path / "cache"
  shutil.copytree(cache_dir, out)
  (shard,) = out.glob("tokens-*.array_record")
  whole = shard.read_bytes()
  shard.write_bytes(whole[:len(whole) // 2])
  # Named at open: the shard, not an anonymous Riegeli error.
  named = (re.escape(str(shard)) + r": (unreadable ArrayRecord shard "
           r"\(.*\)|\d+ records, metadata.json says \d+: a truncated "
           r"shard); `launch.py --mode cache` rebuilds it")
  with pytest.raises(input_pipeline.DataError, match=named):
    feature_cache.train_iterator(config, 0, 1, cache_dir=str(out),
                                 model=model)
  # `--mode cache` says so and rebuilds it: the same records as before.
  said = []
  assert feature_cache.write(config, str(out), model=model,
                             log=said.append) == meta
  assert len(said) == 1 and re.match(
      rf"feature cache {re.escape(str(out))}: damaged \({named}\): "
      r"rebuilding it$", said[0]), said
  assert shard.read_bytes() == whole


def test_second_cache_writer_is_refused(data, tmp_path):
  config, _, _, model, _ = data
  lock = plant_lock(tmp_path, what="feature cache writing")
  with pytest.raises(locks.Locked, match=rf"in use by feature cache writing "
                     rf"\(pid {os.getppid()} .*lock file {lock}"):
    feature_cache.write(config, str(tmp_path), model=model)
  assert os.listdir(tmp_path) == [locks.NAME]


def _all_tokens(cache_dir, in_memory_bytes=None):
  cache = feature_cache.Cache(cache_dir)
  lookup = feature_cache.TokenLookup(cache, skip_corrupt=True,
                                     in_memory_bytes=in_memory_bytes)
  ids = np.arange(cache.num_records).reshape(-1, 1)
  return lookup.gather(lookup.load(ids, None)[0])[:, 0]


def _record_sizes(cache_dir):
  records = grain.sources.ArrayRecordDataSource(
      feature_cache.Cache(cache_dir).shards)
  return np.array([len(records[i]) for i in range(len(records))])


def test_float8_cache_halves_the_disk_and_reads_back_bfloat16(data, tmp_path):
  config, _, bf16_dir, model, bf16_meta = data
  f8 = _config(config.input.data_dir, config.input.manual_dir,
               **{"input.feature_cache_dtype": "float8_e4m3fn"})
  meta = feature_cache.write(f8, str(tmp_path), model=model)
  assert meta["token_dtype"] == "float8_e4m3fn"
  assert bf16_meta["token_dtype"] == "bfloat16"
  assert meta["images"] == bf16_meta["images"]
  assert meta["clipped"] == bf16_meta["clipped"] == 0  # pico's are small
  # One byte a value instead of two (4 x 64 values); markers as they were.
  bf16_sizes, f8_sizes = _record_sizes(bf16_dir), _record_sizes(str(tmp_path))
  tokens = bf16_sizes == 2 * 4 * 64
  assert tokens.sum() == meta["images"] + 1  # + the black image's
  np.testing.assert_array_equal(f8_sizes, np.where(tokens, 4 * 64,
                                                   bf16_sizes))
  want = _all_tokens(bf16_dir).astype(np.float32)
  for in_memory_bytes in (None, 0):
    got = _all_tokens(str(tmp_path), in_memory_bytes)
    assert got.dtype == feature_cache.DTYPE
    got = got.astype(np.float32)
    # e4m3 keeps 4 significant bits: rounding moves a value by at most 2^-4
    # of it (2^-10 below its smallest normal, 2^-6); one e4m3 step more
    # where bfloat16 and float32 rounding of the tower's values disagree.
    err = np.abs(got - want)
    assert np.all(err <= 2.0 ** -3 * np.abs(want) + 2.0 ** -9), err.max()
    # Most are the bfloat16 tokens rounded to e4m3; not all: a bfloat16 value
    # on an e4m3 midpoint (1 in 16) was rounded from float32 either way.
    rounded = want.astype(ml_dtypes.float8_e4m3fn).astype(np.float32)
    assert (got == rounded).mean() > 0.95


def test_float8_cache_saturates_and_counts_tokens_beyond_its_range(
    data, tmp_path):
  config, _, _, model, _ = data
  f8 = _config(config.input.data_dir, config.input.manual_dir,
               **{"input.feature_cache_dtype": "float8_e4m3fn"})
  params = jax.tree.map(np.array, model.params)
  params["img"]["Transformer"]["encoder_norm"]["scale"] *= 1e4
  meta = feature_cache.write(f8, str(tmp_path),
                             model=NearID(model.arch, params, scan=False))
  assert meta["clipped"] > 0
  got = np.abs(_all_tokens(str(tmp_path)).astype(np.float32))
  assert got.max() == 448 and np.isfinite(got).all()


def test_cache_of_another_token_dtype_is_refused(data):
  config, _, cache_dir, model, _ = data
  _refused(config, cache_dir, model,
           {"input.feature_cache_dtype": "float8_e4m3fn"},
           ["token dtype: the cache stores 'bfloat16', this config "
            "'float8_e4m3fn' (input.feature_cache_dtype)"])
  f8 = _config(config.input.data_dir, config.input.manual_dir,
               **{"input.feature_cache_dtype": "float8_e4m3fn"})
  with pytest.raises(feature_cache.CacheMismatch, match="token dtype"):
    feature_cache.write(f8, cache_dir, model=model)
  bad = _config(config.input.data_dir, config.input.manual_dir,
                **{"input.feature_cache_dtype": "float16"})
  with pytest.raises(ValueError, match=r"input.feature_cache_dtype='float16'"
                     r": one of \['bfloat16', 'float8_e4m3fn'\]"):
    feature_cache.write(bad, cache_dir, model=model)


def test_not_a_cache_is_named(tmp_path, data):
  config = data[0]
  with pytest.raises(FileNotFoundError, match=rf"{tmp_path} is not a feature"
                     " cache"):
    feature_cache.train_iterator(config, 0, 1, cache_dir=str(tmp_path))


def test_corrupt_image_stops_with_its_place_unless_skipped(data):
  config, _, cache_dir, model, _ = data
  strict = _config(config.input.data_dir, config.input.manual_dir,
                   **{"input.skip_corrupt": False, "input.batch_size": 16})
  # The reader, as the image pipeline, names the image it met.
  with pytest.raises(input_pipeline.CorruptImage,
                     match=rf"(NearID-Qwen split 'train' row {TRAIN[0]} "
                     rf"field 'nimg2'|NearID split 'train' row {TRAIN[1]} "
                     r"field 'images1'): corrupt image \(feature cache"):
    _take(feature_cache.train_iterator(strict, 0, 1, cache_dir=cache_dir,
                                       model=model), 4)


def test_corrupt_image_at_write_names_its_shard_and_record(data, tmp_path):
  config, _, _, model, _ = data
  strict = _config(config.input.data_dir, config.input.manual_dir,
                   **{"input.skip_corrupt": False})
  # Named as the image pipeline names it: the dataset, split, row, the
  # user's column, and the prepared record that holds it.
  with pytest.raises(input_pipeline.CorruptImage,
                     match=r"(NearID-Qwen split 'train' row \d+ field 'nimg2'"
                     r"|NearID split 'train' row \d+ field 'images1') "
                     r"\(record \d+ of \S+array_record\S*, id \S+\): "
                     r"corrupt image"):
    feature_cache.write(strict, str(tmp_path / "cache"), model=model)


def test_reader_state_round_trips(data, tmp_path):
  ocp = pytest.importorskip("orbax.checkpoint")
  config, _, cache_dir, model, _ = data
  make = lambda: feature_cache.train_iterator(config, 1, 2,
                                              cache_dir=cache_dir,
                                              model=model)
  it = make()
  _take(it, 3)
  state = it.get_state()
  expected = _take(it, 2)
  restored = make()
  restored.set_state(state)
  # and through orbax, as train_and_evaluate saves it
  with ocp.CheckpointManager(tmp_path) as mngr:
    mngr.save(3, args=ocp.args.Composite(
        data=grain.checkpoint.CheckpointSave(restored)))
    mngr.wait_until_finished()
    again = make()
    mngr.restore(3, args=ocp.args.Composite(
        data=grain.checkpoint.CheckpointRestore(again)))
  for it_ in (restored, again):
    for x, y in zip(_take(it_, 2), expected):
      assert x.keys() == y.keys()
      for k in x:
        np.testing.assert_array_equal(x[k], y[k])


def _worker(pid, nproc, port, data_dir, manual_dir, out):
  """One process of a 2-process write (test_two_processes_write_one_cache)."""
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(f"localhost:{port}", nproc, pid)
  feature_cache.write(_config(data_dir, manual_dir), out)
  print(f"process {jax.process_index()}/{jax.process_count()}: "
        f"{len(jax.devices())} devices, done", flush=True)


@pytest.mark.slow
def test_two_processes_write_one_cache(data, tmp_path):
  config, manual, cache_dir, _, meta = data
  out = str(tmp_path / "cache")
  outs = workers.run(__file__, 2, config.input.data_dir, manual, out)
  assert "process 1/2: 4 devices, done" in outs[1]
  # Each process wrote its share; together they are the one-process cache.
  two = feature_cache.Cache(out)
  assert two.meta["shards"] == [f"tokens-0000{i}-of-00002.array_record"
                                for i in range(2)]
  assert sum(two.meta["shard_records"]) == sum(meta["shard_records"])
  per_shard = ("shards", "shard_records")
  assert {k: v for k, v in two.meta.items() if k not in per_shard} == {
      k: v for k, v in meta.items() if k not in per_shard}
  assert sorted(os.listdir(out)) == ["metadata.json"] + two.meta["shards"]
  one = feature_cache.Cache(cache_dir)
  a = feature_cache.TokenLookup(two).records
  b = feature_cache.TokenLookup(one).records
  for i in range(one.num_records + 1):
    x, y = a[i], b[i]
    if x in (feature_cache.EMPTY, feature_cache.CORRUPT):
      assert x == y, i
    else:  # other device count, other float32 noise: bf16 rounding apart
      x, y = (np.frombuffer(v, feature_cache.DTYPE).astype(np.float32)
              for v in (x, y))
      assert np.all(np.abs(x - y) <= BF16_RTOL * np.abs(y) + 1e-6), i


if __name__ == "__main__":
  _worker(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]),
          *sys.argv[4:7])
