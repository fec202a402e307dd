"""Preprocessing against transformers' SiglipImageProcessor and numpy."""
import io

import numpy as np
import pytest
from PIL import Image
import transformers

from conftest import pil_images
from conftest import random_images
from input_pipeline import preprocess
from nearid_jax.demo import export_check


@pytest.mark.parametrize("hw", [(30, 50), (64, 64), (200, 90)])
def test_pil_matches_siglip_image_processor(tmp_path, hw):
  (tmp_path / "preprocessor_config.json").write_text(
      '{"image_processor_type": "SiglipImageProcessor", "do_resize": true, '
      '"size": {"height": 64, "width": 64}, "resample": 2, "do_rescale": '
      'true, "rescale_factor": 0.00392156862745098, "do_normalize": true, '
      '"image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}')
  images = random_images(3, *hw)
  want = export_check.processor(str(tmp_path))(
      images=list(images), return_tensors="np")["pixel_values"]
  got = preprocess.preprocess(images, 64, "pil")
  np.testing.assert_allclose(got, want.transpose(0, 2, 3, 1), atol=1e-6)


def _bilinear_half_pixel(img, res):
  """tf.image.resize(bilinear, antialias=False): half-pixel centres."""
  def axis(n):
    src = np.clip((np.arange(res) + 0.5) * n / res - 0.5, 0, n - 1)
    lo = np.minimum(np.floor(src).astype(int), n - 2)
    return lo, src - lo
  (ly, wy), (lx, wx) = axis(img.shape[0]), axis(img.shape[1])
  img = img.astype(np.float64)
  rows = img[ly] * (1 - wy)[:, None, None] + img[ly + 1] * wy[:, None, None]
  return rows[:, lx] * (1 - wx)[None, :, None] + rows[:, lx + 1] * wx[None, :,
                                                                        None]


@pytest.mark.parametrize("hw", [(20, 48), (64, 64), (90, 33)])
def test_tf_resize_is_bilinear_without_antialias(hw):
  img = random_images(1, *hw)[0]
  got = preprocess.resize(img, 40, "tf")
  want = _bilinear_half_pixel(img, 40) / 127.5 - 1
  np.testing.assert_allclose(got, want, atol=1e-5)


def test_pil_images_and_arrays_agree():
  arr = random_images(2, 30, 40)
  pil = [Image.fromarray(a) for a in arr]
  a = preprocess.preprocess(arr, 16)
  np.testing.assert_array_equal(preprocess.preprocess(pil, 16), a)
  assert a.min() >= -1 and a.max() <= 1


@pytest.mark.parametrize("resample", range(6))
def test_every_pil_filter_and_mode_matches_siglip_image_processor(resample):
  # Down- and upscaling; RGBA, LA and a palette with transparency are
  # composited on white, L and P converted, exactly as transformers does.
  images = pil_images()
  want = transformers.SiglipImageProcessorPil(
      size={"height": 60, "width": 60}, resample=resample)(
          images=images, return_tensors="np")["pixel_values"]
  got = preprocess.preprocess(images, 60,
                              preprocess.method_of_resample(resample))
  np.testing.assert_allclose(got, want.transpose(0, 2, 3, 1), atol=1e-6)


def test_alpha_is_composited_on_white():
  rgba = np.zeros((4, 4, 4), np.uint8)
  rgba[..., 3] = 0  # fully transparent black: white after compositing
  rgba[0, 0] = (255, 0, 0, 255)  # opaque red stays red
  got = preprocess.read_image(_saved(Image.fromarray(rgba, "RGBA")))
  assert got[0, 0].tolist() == [255, 0, 0]
  assert (got.reshape(-1, 3)[1:] == 255).all()


def _saved(im):
  f = io.BytesIO()
  im.save(f, "PNG")
  f.seek(0)
  return f


def test_unknown_resample_code():
  with pytest.raises(ValueError, match="resample 7: not a PIL filter"):
    preprocess.method_of_resample(7)


def test_unknown_resize_method():
  with pytest.raises(ValueError, match="unknown resize method 'cubic'"):
    preprocess.resize(random_images(1, 8, 8)[0], 4, "cubic")


def test_empty_image_is_refused_naming_it():
  ok = random_images(1, 8, 8)[0]
  for empty, size in ((Image.new("RGB", (0, 0)), "0x0"),
                      (np.zeros((0, 5, 3), np.uint8), "5x0")):
    with pytest.raises(ValueError, match=rf"^image 1: empty \({size} "
                       r"pixels\)$"):
      preprocess.preprocess([ok, empty], 16)


@pytest.mark.parametrize("mode", ["I;16", "I;16B"])
def test_16_bit_greyscale_is_scaled_not_clipped(mode):
  x = np.linspace(0, 65535, 12 * 10).round().astype(np.uint16).reshape(12, 10)
  im = Image.fromarray(x)
  if mode == "I;16B":
    im = Image.frombytes(mode, im.size, x.astype(">u2").tobytes())
  assert im.mode == mode
  want = np.repeat(np.round(x / 257).astype(np.uint8)[..., None], 3, -1)
  np.testing.assert_array_equal(preprocess.pil_uint8(im), want)
  # A 16-bit PNG file, as read for training, scoring and embed([path]).
  np.testing.assert_array_equal(preprocess.read_image(_saved(im)), want)
  np.testing.assert_array_equal(preprocess.preprocess([im], 12),
                                preprocess.preprocess(want[None], 12))


def test_32_bit_and_float_pixels_are_0_to_255_or_refused():
  x = np.arange(64, dtype=np.float32).reshape(8, 8) * 4 + 0.4  # 0.4..252.4
  want = np.repeat(np.round(x).astype(np.uint8)[..., None], 3, -1)
  np.testing.assert_array_equal(preprocess.pil_uint8(Image.fromarray(x)),
                                want)
  np.testing.assert_array_equal(
      preprocess.pil_uint8(Image.fromarray(x.astype(np.int32))),
      np.repeat(x.astype(np.uint8)[..., None], 3, -1))
  np.testing.assert_array_equal(preprocess.image_uint8(want * 1.0, 0), want)
  ok = random_images(1, 8, 8)[0]
  for image, found in (
      (Image.fromarray(x / 255), r"PIL mode 'F': float32 values in "
       r"\[0.00156863, 0.989804\], taken as 0..1 pixels; pixels are 0..255: "
       r"pass np.round\(x \* 255\).astype\(np.uint8\)"),
      (Image.fromarray(x * 2), r"PIL mode 'F': float32 values in \[0.8, "
       r"504.8\], outside 0..255: scale them to uint8 0..255"),
      (Image.fromarray((x * 300).astype(np.int32)), r"PIL mode 'I': int32 "
       r"values in \[120, 75720\], outside 0..255"),
      (np.stack([x / 127.5 - 1] * 3, -1), r"array: float32 values in "
       r"\[-0.996863, 0.979608\], outside 0..255"),
      (np.full((4, 4, 3), np.nan), r"array: float64 values in \[nan, nan\]"),
      (np.full((4, 4, 3), 1000, np.uint16), r"array: uint16 values in "
       r"\[1000, 1000\], outside 0..255"),
      (np.ones((4, 4, 3), bool), r"array: dtype bool, expected uint8")):
    with pytest.raises(ValueError, match=rf"^image 1: {found}"):
      preprocess.preprocess([ok, image], 16)


def test_each_image_is_resized_before_the_next_is_read(tmp_path,
                                                       monkeypatch):
  arrays = random_images(3, 40, 30)
  paths = []
  for i, a in enumerate(arrays):
    paths.append(str(tmp_path / f"{i}.png"))
    Image.fromarray(a).save(paths[-1])
  events = []
  read, resize = preprocess.image_uint8, preprocess.resize

  def reading(image, i):
    events.append(("read", i))
    return read(image, i)

  def resizing(image, *args):
    events.append(("resize", image.shape))
    return resize(image, *args)

  monkeypatch.setattr(preprocess, "image_uint8", reading)
  monkeypatch.setattr(preprocess, "resize", resizing)
  for images in (paths, [Image.open(p) for p in paths]):
    events.clear()
    got = preprocess.preprocess(images, 16)
    # A full-size decode is resized (and dropped) before the next is read.
    assert events == [e for i in range(3)
                      for e in (("read", i), ("resize", (40, 30, 3)))]
    np.testing.assert_array_equal(got, preprocess.preprocess(arrays, 16))
