"""SPEC.md preprocessing: squash-resize to res x res, then [-1, 1].

Resize methods: "pil" (default) is PIL bilinear, antialiased when
downscaling, what transformers' SiglipImageProcessor does with `resample: 2`;
"pil-bicubic", "pil-lanczos", ... are PIL's other filters, so that a
checkpoint's preprocessor_config.json (transformers' default for SigLIP is
bicubic) is reproduced exactly. "tf" is bilinear without antialias and with
half-pixel centres, as big_vision's tf.image.resize.

Pixels are 0..255 (uint8). Other inputs, so that none silently means
something else (`image_uint8`): 16-bit greyscale (PIL "I;16*") is scaled
to 8 bits, x / 257 (PIL's convert("RGB"), which transformers uses, clips
it at 255); 32-bit PIL images ("I", "F") and non-uint8 arrays are taken as
0..255 and rounded, and refused, naming what was found, when a value lies
outside 0..255 or a float image lies within 0..1 (0..1 pixels: scale by
255); an empty (zero-size) image is refused.
"""
import os

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


def _as_uint8(x, what):
  """Pixel values meant as 0..255 -> uint8; ValueError naming `what` and the
  values found when they cannot be (module doc)."""
  if x.dtype == np.uint8:
    return x
  if x.dtype.kind not in "iuf":
    raise ValueError(f"{what}: dtype {x.dtype}, expected uint8 pixels "
                     "0..255")
  lo, hi = float(np.min(x)), float(np.max(x))
  if x.dtype.kind == "f" and 0 <= lo <= hi <= 1:
    raise ValueError(f"{what}: {x.dtype} values in [{lo:g}, {hi:g}], taken "
                     "as 0..1 pixels; pixels are 0..255: pass "
                     "np.round(x * 255).astype(np.uint8)")
  if not 0 <= lo <= hi <= 255:  # NaN fails too
    raise ValueError(f"{what}: {x.dtype} values in [{lo:g}, {hi:g}], "
                     "outside 0..255: scale them to uint8 0..255")
  return np.round(x).astype(np.uint8)


def pil_uint8(image):
  """A PIL image -> uint8 (H, W, 3) RGB: `to_rgb`, but 16-bit greyscale
  scaled to 8 bits, and "I" / "F" checked as 0..255 (module doc)."""
  if image.width == 0 or image.height == 0:
    raise ValueError(f"empty ({image.width}x{image.height} pixels)")
  if image.mode.startswith("I;16"):
    x = np.asarray(image).astype(np.uint32)
    grey = ((x * 255 + 32767) // 65535).astype(np.uint8)  # x / 257, rounded
  elif image.mode in ("I", "F"):
    grey = _as_uint8(np.asarray(image), f"PIL mode {image.mode!r}")
  else:
    return np.asarray(to_rgb(image))
  return np.repeat(grey[..., None], 3, axis=-1)


def read_image(f):
  """An image file (path or file object) -> uint8 (H, W, 3) RGB
  (`pil_uint8`)."""
  with Image.open(f) as im:
    return pil_uint8(im)


def image_uint8(image, i):
  """One image (a path, a PIL image or a (H, W, 3) array) -> uint8 (H, W, 3);
  ValueError naming its index i and what is wrong (module doc)."""
  try:
    if isinstance(image, (str, os.PathLike)):
      return read_image(image)
    if isinstance(image, Image.Image):
      return pil_uint8(image)
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3:
      raise ValueError(f"expected (H, W, 3) RGB, got shape {image.shape}")
    if not image.shape[0] or not image.shape[1]:
      raise ValueError(f"empty ({image.shape[1]}x{image.shape[0]} pixels)")
    return _as_uint8(image, "array")
  except (OSError, ValueError) as e:
    raise ValueError(f"image {i}: {e}") from e


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
  """A uint8 (B, H, W, 3) array or a list of image paths, PIL images or
  (H, W, 3) arrays (`image_uint8`) -> float32 (B, res, res, 3) in [-1, 1].

  Each image is read and resized before the next is read: a list of large
  files holds one full-size decode at a time. (A PIL image keeps its pixels
  once loaded, so a list of opened large images holds them all: pass paths.)
  """
  if isinstance(images, np.ndarray) and images.ndim != 4:
    raise ValueError(f"images: expected a (B, H, W, 3) array, got shape "
                     f"{images.shape}")
  out = [resize(image_uint8(image, i), res, method)
         for i, image in enumerate(images)]
  return np.stack(out) if out else np.zeros((0, res, res, 3), np.float32)
