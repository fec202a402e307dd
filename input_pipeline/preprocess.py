"""SPEC.md preprocessing: squash-resize to res x res, then [-1, 1].

Resize methods: "pil" (default) is PIL bilinear, antialiased when
downscaling, what transformers' SiglipImageProcessor does with `resample: 2`;
"pil-bicubic", "pil-lanczos", ... are PIL's other filters, so that a
checkpoint's preprocessor_config.json (transformers' default for SigLIP is
bicubic) is reproduced exactly. "tf" is bilinear without antialias and with
half-pixel centres, as big_vision's tf.image.resize.
"""
import jax
import numpy as np
from PIL import Image

# Method name -> PIL filter. The filters' integer values are the `resample`
# codes of transformers' preprocessor_config.json.
PIL_FILTERS = {
    "pil": Image.Resampling.BILINEAR,
    "pil-bicubic": Image.Resampling.BICUBIC,
    "pil-lanczos": Image.Resampling.LANCZOS,
    "pil-nearest": Image.Resampling.NEAREST,
    "pil-box": Image.Resampling.BOX,
    "pil-hamming": Image.Resampling.HAMMING,
}
RESIZE_METHODS = (*PIL_FILTERS, "tf")


def method_of_resample(code):
  """A preprocessor_config.json `resample` code -> a PIL method name."""
  for name, f in PIL_FILTERS.items():
    if f == code:
      return name
  raise ValueError(f"resample {code!r}: not a PIL filter code (0..5)")


def to_rgb(image):
  """A PIL image of any mode -> RGB, as transformers' convert_to_rgb does:
  a mode with alpha (or a palette with a transparent entry) is composited
  onto white, not cut off."""
  if "A" in image.getbands() or image.info.get("transparency") is not None:
    image = image.convert("RGBA")
    white = Image.new("RGBA", image.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, image).convert("RGB")
  return image.convert("RGB")


def read_image(f):
  """An image file (path or file object) -> uint8 (H, W, 3) RGB (`to_rgb`)."""
  with Image.open(f) as im:
    return np.asarray(to_rgb(im))


def as_uint8_images(images):
  """A uint8 (B, H, W, 3) array or a list of PIL images / (H, W, 3) arrays."""
  if isinstance(images, np.ndarray):
    if images.ndim != 4:
      raise ValueError(f"images: expected a (B, H, W, 3) array, got shape "
                       f"{images.shape}")
    images = list(images)
  out = []
  for i, im in enumerate(images):
    if isinstance(im, Image.Image):
      im = np.asarray(to_rgb(im))
    im = np.asarray(im)
    if im.ndim != 3 or im.shape[-1] != 3:
      raise ValueError(f"image {i}: expected (H, W, 3) RGB, got shape "
                       f"{im.shape}")
    if im.dtype != np.uint8:
      raise ValueError(f"image {i}: expected dtype uint8 (0..255), got "
                       f"{im.dtype}")
    out.append(im)
  return out


def scale(x):
  """uint8 pixel values (any array type, host or device) -> [-1, 1]."""
  return x.astype(np.float32) / 127.5 - 1.0


def resize(image, res, method="pil"):
  """uint8 (H, W, 3) -> float32 (res, res, 3) in [-1, 1]."""
  if method in PIL_FILTERS:
    return scale(resize_uint8(image, res, method))
  if method == "tf":
    return scale(np.asarray(jax.image.resize(
        image.astype(np.float32), (res, res, 3), "bilinear", antialias=False)))
  raise ValueError(f"unknown resize method {method!r}: one of "
                   f"{RESIZE_METHODS}")


def resize_uint8(image, res, method="pil"):
  """uint8 (H, W, 3) -> uint8 (res, res, 3): `resize` without the scaling.

  For input pipelines that keep uint8 on the host and `scale` on device.
  PIL methods give scale(resize_uint8(x)) == resize(x) exactly; "tf" rounds
  its float result to the nearest integer (at most 0.5 / 127.5 away).
  """
  if method in PIL_FILTERS:
    if image.shape[:2] == (res, res):
      return image
    return np.asarray(Image.fromarray(image).resize((res, res),
                                                    PIL_FILTERS[method]))
  if method == "tf":
    x = np.asarray(jax.image.resize(image.astype(np.float32), (res, res, 3),
                                    "bilinear", antialias=False))
    return np.clip(np.round(x), 0, 255).astype(np.uint8)
  raise ValueError(f"unknown resize method {method!r}: one of "
                   f"{RESIZE_METHODS}")


def preprocess(images, res, method="pil"):
  """-> float32 (B, res, res, 3) in [-1, 1]."""
  ims = as_uint8_images(images)
  if not ims:
    return np.zeros((0, res, res, 3), np.float32)
  return np.stack([resize(im, res, method) for im in ims])
