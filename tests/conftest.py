"""Shared fixtures: tiny random SigLIP towers saved the way users get them."""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import numpy as np  # pylint: disable=g-import-not-at-top
import pytest  # pylint: disable=g-import-not-at-top
from PIL import Image  # pylint: disable=g-import-not-at-top

from nearid_jax.cpu import xla_flags  # pylint: disable=g-import-not-at-top

# The tests run with the XLA:CPU settings the entry points use.
xla_flags.add_defaults()

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

# Two tiny configs: patch 14 with 4 heads at a resolution that is not a
# multiple of the patch (as So400m/14@384); patch 16 with another width, MLP
# and head count (head_dim 8 vs 12), so head reshapes are tested both ways.
TINY = {
    "p14": dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                num_attention_heads=4, image_size=60, patch_size=14),
    "p16": dict(hidden_size=64, intermediate_size=80, num_hidden_layers=3,
                num_attention_heads=8, image_size=64, patch_size=16),
}


def random_siglip(name, seed=0):
  """A transformers SiglipVisionModel with random (non-default) weights."""
  torch.manual_seed(seed)
  cfg = transformers.SiglipVisionConfig(**TINY[name])
  model = transformers.SiglipVisionModel(cfg).eval()
  with torch.no_grad():  # default init leaves LNs at 1/0 and biases at 0
    for name, p in model.named_parameters():
      is_ln_scale = "norm" in name and name.endswith("weight")
      p.copy_(torch.randn_like(p) * 0.2 + (1.0 if is_ln_scale else 0.0))
  return model


@pytest.fixture(scope="session", params=sorted(TINY))
def hf_model_dir(request, tmp_path_factory):
  """(name, directory, torch model) of a saved SiglipVisionModel."""
  model = random_siglip(request.param)
  d = tmp_path_factory.mktemp(f"hf_{request.param}")
  model.save_pretrained(d)
  return request.param, str(d), model


def random_images(n, h, w, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), np.uint8)


def save_siglip(directory, resample, name="p14", seed=0):
  """random_siglip saved with a preprocessor_config.json whose resize uses
  PIL filter `resample` (2 bilinear, 3 bicubic: transformers' default)."""
  random_siglip(name, seed).save_pretrained(directory)
  res = TINY[name]["image_size"]
  transformers.SiglipImageProcessorPil(
      size={"height": res, "width": res}, resample=resample).save_pretrained(
          directory)
  return str(directory)


@pytest.fixture(scope="session", params=[2, 3], ids=["bilinear", "bicubic"])
def siglip_dir(request, tmp_path_factory):
  """A SiglipVisionModel directory with its own preprocessor config."""
  return save_siglip(tmp_path_factory.mktemp(f"siglip_{request.param}"),
                     request.param)


def pil_images(seed=0):
  """PIL images of several sizes (down- and upscaled to 60) and modes."""
  rng = np.random.default_rng(seed)
  out = []
  for (h, w), mode in (((90, 70), "RGB"), ((31, 45), "RGB"), ((75, 50), "RGBA"),
                       ((40, 80), "L"), ((66, 33), "LA"), ((50, 61), "P")):
    im = Image.fromarray(rng.integers(0, 256, (h, w, 4), np.uint8), "RGBA")
    out.append(im if mode == "RGBA" else im.convert(mode))
  # A palette image with a transparent entry, composited as RGBA is.
  p = out[-1].copy()
  p.info["transparency"] = 5
  return out + [p]


def transformers_embed(directory, images):
  """transformers end to end: SiglipVisionModel + AutoImageProcessor of the
  directory, L2-normalised pooler output."""
  model = transformers.SiglipVisionModel.from_pretrained(directory).eval()
  pix = transformers.AutoImageProcessor.from_pretrained(directory)(
      images=list(images), return_tensors="pt")["pixel_values"]
  with torch.no_grad():
    out = model(pixel_values=pix).pooler_output
  return torch.nn.functional.normalize(out, dim=-1).numpy()


# The DreamBench++ rating files live in shared/, beside the repository, not
# in it: their tests skip in a clone without one.
DREAMBENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))), "..", "shared", "data", "dreambench")


@pytest.fixture(name="dreambench")
def fixture_dreambench():
  if not os.path.isdir(DREAMBENCH):
    pytest.skip(f"DreamBench++ ratings not found at {DREAMBENCH} (the shared/ "
                "folder beside the repository)")
  return DREAMBENCH
