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
