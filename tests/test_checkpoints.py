"""Checkpoint formats both ways, resampling, and the errors users meet."""
import json
import os
import shutil

import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy

from configs.common import training_config
from conftest import pil_images
from conftest import random_images
from conftest import transformers_embed
from nearid_jax import CheckpointError
from nearid_jax import NearID
from nearid_jax.demo import export_check
from nearid_jax.formats import common
from nearid_jax.formats import hf
from nearid_jax.training import train


@pytest.fixture(scope="module")
def loaded(hf_model_dir):
  name, path, tmodel = hf_model_dir
  return name, path, tmodel, NearID.load(path)


def _images(model, n=5, seed=0):
  # Not the model's resolution: the squash-resize is part of what is compared.
  return random_images(n, model.arch.image_size + 13, model.arch.image_size - 7,
                       seed)


@pytest.mark.parametrize("fmt", ["hf-siglip", "nearid"])
def test_export_float32_loads_in_transformers(loaded, tmp_path, fmt):
  _, _, _, model = loaded
  out = model.export(tmp_path / fmt, format=fmt)
  _, info = export_check.load(out, fmt)
  assert not info["missing_keys"] and not info["unexpected_keys"], info
  images = _images(model)
  np.testing.assert_allclose(export_check.embed(out, fmt, images),
                             model.embed(images), atol=1e-4, rtol=0)


@pytest.mark.parametrize("fmt", ["hf-siglip", "nearid"])
def test_export_float16(loaded, tmp_path, fmt):
  _, _, _, model = loaded
  out = model.export(tmp_path / fmt, format=fmt, dtype="float16")
  with open(os.path.join(out, "config.json")) as f:
    assert json.load(f)["torch_dtype"] == "float16"
  tensors = safetensors.numpy.load_file(os.path.join(out, "model.safetensors"))
  assert {v.dtype for v in tensors.values()} == {np.dtype(np.float16)}
  images = _images(model, seed=1)
  cos = np.sum(export_check.embed(out, fmt, images) * model.embed(images), 1)
  assert cos.min() >= 0.999, cos
  # and it loads back into JAX
  again = NearID.load(out)
  assert np.sum(again.embed(images) * model.embed(images), 1).min() >= 0.999


def test_nearid_export_layout(loaded, tmp_path):
  _, _, _, model = loaded
  out = model.export(tmp_path / "n", format="nearid")
  with open(os.path.join(out, "config.json")) as f:
    config = json.load(f)
  assert config["model_type"] == "nearid"
  assert config["architectures"] == ["NearIDModel"]
  assert config["embed_dim"] == model.arch.width
  assert config["vision_config"]["hidden_act"] == "gelu_pytorch_tanh"
  keys = safetensors.numpy.load_file(os.path.join(out, "model.safetensors"))
  assert all(k.startswith("backbone.vision_model.") for k in keys)
  assert "backbone.vision_model.head.attention.in_proj_weight" in keys
  with open(os.path.join(out, "preprocessor_config.json")) as f:
    pre = json.load(f)
  assert pre["size"] == {"height": model.arch.image_size,
                         "width": model.arch.image_size}


def _write_bigvision(path, flat, *, scanned, two_tower, bf16=False):
  """big_vision layout written by hand from the canonical tree."""
  flat = dict(flat)
  if scanned:
    depth = common.depth_of(flat)
    names = {k.split("/", 2)[2] for k in flat
             if k.startswith("Transformer/encoderblock_0/")}
    for n in names:
      flat[f"Transformer/encoderblock/{n}"] = np.stack(
          [flat.pop(f"Transformer/encoderblock_{i}/{n}") for i in range(depth)])
  if bf16:  # np.savez stores bfloat16 as raw 2-byte void
    flat = {k: v.astype(ml_dtypes.bfloat16) for k, v in flat.items()}
  prefix = "params/img/" if two_tower else ""
  arrays = {prefix + k: v for k, v in flat.items()}
  if two_tower:  # a text tower and the logit scale/bias, to be ignored
    arrays.update({"params/txt/Encoder_0/encoder_norm/scale": np.ones(4),
                   "params/t": np.ones(1), "params/b": np.zeros(1)})
  np.savez(path, **arrays)


@pytest.mark.parametrize("scanned", [False, True])
@pytest.mark.parametrize("two_tower", [False, True])
def test_bigvision_layouts_give_the_same_embeddings(loaded, tmp_path, scanned,
                                                    two_tower):
  _, _, _, model = loaded
  # As released files do, the name carries the resolution, which shapes
  # alone cannot give when it is not a multiple of the patch.
  path = str(tmp_path / f"ckpt_{model.arch.image_size}.npz")
  _write_bigvision(path, model.flat_params(), scanned=scanned,
                   two_tower=two_tower)
  if not two_tower:
    assert "embedding/kernel" in np.load(path)
  again = NearID.load(path)
  assert again.arch.width == model.arch.width
  images = _images(model, seed=2)
  np.testing.assert_allclose(again.embed(images), model.embed(images),
                             atol=1e-5)


def test_bigvision_resolution_without_file_name(loaded, tmp_path):
  _, _, _, model = loaded
  path = str(tmp_path / "params.npz")
  _write_bigvision(path, model.flat_params(), scanned=False, two_tower=True)
  a = model.arch
  assert NearID.load(path).arch.image_size == a.grid * a.patch_size
  again = NearID.load(path, image_size=a.image_size)
  images = _images(model, seed=6)
  np.testing.assert_allclose(again.embed(images), model.embed(images),
                             atol=1e-5)


def test_bigvision_bfloat16_void_arrays_load(loaded, tmp_path):
  _, _, _, model = loaded
  path = str(tmp_path / f"bf16_{model.arch.image_size}.npz")
  _write_bigvision(path, model.flat_params(), scanned=True, two_tower=True,
                   bf16=True)
  with np.load(path) as f:
    assert f["params/img/pos_embedding"].dtype.kind == "V"
  again = NearID.load(path)
  images = _images(model, seed=3)
  assert np.sum(again.embed(images) * model.embed(images), 1).min() > 0.995


def test_bigvision_export_round_trip_with_projection(loaded, tmp_path):
  _, path, _, _ = loaded
  model = NearID.load(path, out_dim=24, seed=3)
  images = _images(model, seed=4)
  emb = model.embed(images)
  assert emb.shape == (len(images), 24)
  with pytest.raises(ValueError, match="no place for the projection"):
    model.export(tmp_path / "x", format="nearid")
  out = model.export(tmp_path / "bv", format="big_vision")
  np.testing.assert_allclose(NearID.load(out).embed(images), emb, atol=1e-6)


def _interp_rows(grid, m):
  """Linear resampling of axis 0 from n to m points, end points aligned."""
  n = grid.shape[0]
  src = np.arange(m) * (n - 1) / (m - 1)
  lo = np.clip(np.floor(src).astype(int), 0, n - 2)
  w = (src - lo)[:, None, None]
  return grid[lo] * (1 - w) + grid[lo + 1] * w


def test_other_resolution_resamples_position_embeddings(loaded):
  _, path, _, model = loaded
  a = model.arch
  res = a.patch_size * (a.grid + 3)
  big = NearID.load(path, image_size=res)
  assert big.arch.grid == a.grid + 3
  got = np.asarray(big.params["img"]["pos_embedding"])
  old = np.asarray(model.params["img"]["pos_embedding"]).reshape(
      a.grid, a.grid, a.width)
  want = _interp_rows(_interp_rows(old, a.grid + 3).transpose(1, 0, 2),
                      a.grid + 3).transpose(1, 0, 2)
  np.testing.assert_allclose(got.reshape(want.shape), want, atol=1e-5)
  emb = big.embed(_images(model))
  assert np.isfinite(emb).all() and np.allclose(np.linalg.norm(emb, axis=1), 1)


# --- errors -----------------------------------------------------------------

def test_path_without_checkpoint(tmp_path):
  with pytest.raises(CheckpointError, match="no such file"):
    NearID.load(tmp_path / "nope")
  with pytest.raises(CheckpointError, match="holds no checkpoint"):
    NearID.load(tmp_path)
  (tmp_path / "notes.txt").write_text("hi")
  with pytest.raises(CheckpointError, match="notes.txt: not a checkpoint"):
    NearID.load(tmp_path / "notes.txt")
  (tmp_path / "broken.npz").write_bytes(b"not a zip")
  with pytest.raises(CheckpointError, match="broken.npz: not a readable"):
    NearID.load(tmp_path / "broken.npz")


def _copy_hf(src, dst, edit):
  os.makedirs(dst)
  tensors = safetensors.numpy.load_file(os.path.join(src, "model.safetensors"))
  edit(tensors)
  safetensors.numpy.save_file(tensors, os.path.join(dst, "model.safetensors"))
  with open(os.path.join(src, "config.json")) as f:
    config = f.read()
  with open(os.path.join(dst, "config.json"), "w") as f:
    f.write(config)
  return str(dst)


def _key(tensors, suffix):
  return next(k for k in tensors if k.endswith(suffix))


def test_missing_tensor_is_named(loaded, tmp_path):
  _, path, _, _ = loaded
  bad = _copy_hf(path, tmp_path / "m",
                 lambda t: t.pop(_key(t, "layers.1.mlp.fc2.bias")))
  with pytest.raises(CheckpointError,
                     match=r"m: missing tensor 'encoder.layers.1.mlp.fc2.bias'"):
    NearID.load(bad)


def test_wrong_shape_is_named(loaded, tmp_path):
  _, path, _, _ = loaded

  def edit(t):
    k = _key(t, "layers.0.layer_norm2.weight")
    t[k] = np.ones(t[k].shape[0] + 1, np.float32)
  bad = _copy_hf(path, tmp_path / "s", edit)
  with pytest.raises(CheckpointError, match=r"LayerNorm_1/scale' has shape"):
    NearID.load(bad)


def test_bigvision_missing_and_misshapen(loaded, tmp_path):
  _, _, _, model = loaded
  flat = model.flat_params()
  del flat["MAPHead_0/probe"]
  np.savez(tmp_path / "a.npz", **{"params/img/" + k: v for k, v in flat.items()})
  with pytest.raises(CheckpointError, match=r"a.npz: missing tensor "
                     r"'MAPHead_0/probe' \(expected shape \(1, 1, "):
    NearID.load(tmp_path / "a.npz")
  flat = model.flat_params()
  flat["Transformer/encoder_norm/bias"] = np.zeros(3, np.float32)
  np.savez(tmp_path / "b.npz", **{"params/img/" + k: v for k, v in flat.items()})
  with pytest.raises(CheckpointError, match=r"'Transformer/encoder_norm/bias' "
                     r"has shape \(3,\), expected"):
    NearID.load(tmp_path / "b.npz")


def test_config_that_contradicts_tensors(loaded, tmp_path):
  _, path, _, _ = loaded
  bad = _copy_hf(path, tmp_path / "c", lambda t: None)
  with open(os.path.join(bad, "config.json")) as f:
    config = json.load(f)
  config["num_hidden_layers"] += 1
  with open(os.path.join(bad, "config.json"), "w") as f:
    json.dump(config, f)
  with pytest.raises(CheckpointError, match="num_hidden_layers"):
    NearID.load(bad)
  config["model_type"] = "clip_vision_model"
  with open(os.path.join(bad, "config.json"), "w") as f:
    json.dump(config, f)
  with pytest.raises(CheckpointError, match="'clip_vision_model' is not"):
    NearID.load(bad)


def test_two_tower_hf_directory(loaded, tmp_path):
  """A full SiglipModel download: vision tower taken, text tower ignored."""
  _, path, _, model = loaded
  def edit(t):
    for k in list(t):
      t["vision_model." + k] = t.pop(k)
    t["text_model.embeddings.token_embedding.weight"] = np.ones((5, 4),
                                                                np.float32)
    t["logit_scale"] = np.ones(1, np.float32)
  d = _copy_hf(path, tmp_path / "two", edit)
  with open(os.path.join(d, "config.json")) as f:
    vcfg = json.load(f)
  with open(os.path.join(d, "config.json"), "w") as f:
    json.dump({"model_type": "siglip", "vision_config": vcfg,
               "text_config": {}}, f)
  images = _images(model, seed=5)
  np.testing.assert_allclose(NearID.load(d).embed(images), model.embed(images),
                             atol=1e-6)


def test_export_refuses_to_overwrite(loaded, tmp_path):
  _, _, _, model = loaded
  out = tmp_path / "e"
  model.export(out, format="hf-siglip")
  with pytest.raises(FileExistsError, match="overwrite=True"):
    model.export(out, format="hf-siglip")
  model.export(out, format="nearid", overwrite=True)
  assert json.load(open(out / "config.json"))["model_type"] == "nearid"
  assert [p for p in os.listdir(tmp_path) if p.startswith(".export")] == []
  with pytest.raises(ValueError, match="unknown export format 'onnx'"):
    model.export(tmp_path / "f", format="onnx")


def test_failed_export_leaves_nothing_and_keeps_the_old(loaded, tmp_path,
                                                     monkeypatch):
  _, _, _, model = loaded
  out = tmp_path / "e"
  model.export(out, format="hf-siglip")
  before = {p.name: p.read_bytes() for p in out.iterdir()}

  def write_half_then_fail(path, *args):
    open(os.path.join(path, "model.safetensors"), "wb").write(b"partial")
    raise OSError("disk full")
  monkeypatch.setattr(hf, "save", write_half_then_fail)
  for target, overwrite in ((out, True), (tmp_path / "new", False)):
    with pytest.raises(OSError, match="disk full"):
      model.export(target, format="nearid", overwrite=overwrite)
  assert {p.name: p.read_bytes() for p in out.iterdir()} == before
  assert sorted(os.listdir(tmp_path)) == ["e"]  # no "new", no temp dirs


@pytest.mark.parametrize("images,match", [
    (np.zeros((2, 20, 20, 4), np.uint8), r"expected \(H, W, 3\) RGB, got "
     r"shape \(20, 20, 4\)"),
    (np.zeros((2, 20, 20, 3), np.float32), r"image 0: array: float32 values "
     r"in \[0, 0\], taken as 0..1 pixels; pixels are 0..255: pass "
     r"np.round\(x \* 255\).astype\(np.uint8\)"),
    (np.zeros((20, 20, 3), np.uint8), r"expected a \(B, H, W, 3\) array"),
])
def test_bad_images_are_refused(loaded, images, match):
  _, _, _, model = loaded
  with pytest.raises(ValueError, match=match):
    model.embed(images)


def test_directory_preprocessing_equals_transformers(siglip_dir):
  # Sizes below and above the resolution, RGBA/LA/L/P modes.
  images = pil_images()
  model = NearID.load(siglip_dir)
  want = transformers_embed(siglip_dir, images)
  np.testing.assert_allclose(model.embed(images), want, atol=1e-4, rtol=0)
  resample = json.load(open(os.path.join(siglip_dir,
                                         "preprocessor_config.json")))["resample"]
  if resample != 2:  # the check can tell bilinear from the directory's filter
    bilinear = NearID.load(siglip_dir, resize="pil").embed(images)
    assert np.abs(bilinear - want).max() > 1e-3


def test_training_takes_the_directory_preprocessing(siglip_dir):
  """model.init a directory: its preprocessor config sets model.resize, and
  input.resize with it (the pipeline and the feature cache's fingerprint),
  unless model.resize_from_checkpoint is off."""
  resample = json.load(open(os.path.join(siglip_dir,
                                         "preprocessor_config.json")))["resample"]
  want = {2: "pil", 3: "pil-bicubic"}[resample]
  config = training_config()
  config.model.init, config.model.res = siglip_dir, 56  # 60 drops pixels
  train.check_config(config)
  assert config.model.resize == config.input.resize == want
  assert NearID.from_config(config).resize == want

  config = training_config()
  config.model.init, config.model.res = siglip_dir, 56  # 60 drops pixels
  config.model.resize, config.model.resize_from_checkpoint = "tf", False
  train.check_config(config)
  assert config.input.resize == "tf"
  assert NearID.from_config(config).resize == "tf"


def test_export_keeps_the_preprocessing(siglip_dir, tmp_path):
  model = NearID.load(siglip_dir)
  out = model.export(tmp_path / "e", format="nearid")
  cfg = json.load(open(os.path.join(out, "preprocessor_config.json")))
  src = json.load(open(os.path.join(siglip_dir, "preprocessor_config.json")))
  assert cfg["resample"] == src["resample"]
  images = pil_images(seed=1)
  np.testing.assert_allclose(export_check.embed(out, "nearid", images),
                             model.embed(images), atol=1e-4, rtol=0)
  assert NearID.load(out).resize == model.resize


@pytest.mark.parametrize("change,match", [
    ({"size": {"shortest_edge": 60}}, r"size=\{'shortest_edge': 60\}: only"),
    ({"size": {"height": 64, "width": 64}}, r"size=\{'height': 64, 'width': 64\}: the model's "
     "config has image_size 60"),
    ({"image_mean": [0.48, 0.46, 0.41]}, r"rescale_factor .*, image_mean \[0.48, .* do not map "
     "pixels"),
    ({"do_center_crop": True}, "do_center_crop=True: only a squash-resize"),
    ({"resample": 9}, "resample 9: not a PIL filter"),
])
def test_preprocessor_config_we_cannot_reproduce(siglip_dir, tmp_path, change,
                                                 match):
  d = shutil.copytree(siglip_dir, tmp_path / "d")
  path = d / "preprocessor_config.json"
  path.write_text(json.dumps({**json.loads(path.read_text()), **change}))
  with pytest.raises(CheckpointError, match="preprocessor_config.json: " +
                     match):
    NearID.load(d)
