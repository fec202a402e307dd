"""NearID: frozen SigLIP2 tower + trainable MAP head, and its public API.

Also the two things every layer above shares: the one way to build a model
from a config (NearID.from_config) and the one tower pass (tower_tokens)
that training, evaluation and the feature cache run.
"""
import glob
import os
import secrets
import shutil
import socket

import jax
import jax.numpy as jnp
import numpy as np

from input_pipeline import locks
from input_pipeline import preprocess
from nearid_jax import kernels as kernels_lib
from nearid_jax import vit
from nearid_jax import workdir as workdir_lib
from nearid_jax.cpu import xla_flags
from nearid_jax.formats import bigvision
from nearid_jax.formats import common
from nearid_jax.formats import hf
import nearid_jax.formats as formats

# Top-level canonical entries that belong to the trainable head.
HEAD_KEYS = ("MAPHead_0", "proj")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
_EXPORT_TMP = ".export-"


def default_scan(arch, scan=None):
  """Scanned blocks for deep towers (fast compiles) unless asked otherwise."""
  return arch.depth > 12 if scan is None else scan


def split_params(flat, arch, scan):
  """Canonical flat dict -> {"img": tower tree, "head": head tree}."""
  tower = {k: v for k, v in flat.items() if not k.startswith(HEAD_KEYS)}
  head = {k: v for k, v in flat.items() if k.startswith(HEAD_KEYS)}
  if scan:
    tower = common.scan(tower, arch.depth)
  return {"img": common.unflatten(tower), "head": common.unflatten(head)}


def join_params(params, scan):
  """Inverse of split_params, as float32 numpy."""
  tower = common.flatten(jax.device_get(params["img"]))
  if scan:
    tower = common.unscan(tower)
  flat = {**tower, **common.flatten(jax.device_get(params["head"]))}
  return {k: np.asarray(v, np.float32) for k, v in flat.items()}


def checkpoint_resize(config, init=None):
  """The resize method of the model built from `init` (default model.init):
  a training workdir's own (its config's), a Hugging Face or NearID
  directory's preprocessor_config.json when model.resize_from_checkpoint,
  else model.resize."""
  m = config.model
  path = os.fspath(init or m.init)
  if path and workdir_lib.is_workdir(path):
    return workdir_lib.read_config(path).model.resize
  if m.get("resize_from_checkpoint", True) and path and os.path.isdir(path):
    return formats.resize_method(path)
  return m.resize


def resolve_resize(config, init=None):
  """config.model.resize <- checkpoint_resize: the input pipeline
  (input.resize follows model.resize) and the feature cache's fingerprint
  then resize images as the model does."""
  config.model.resize = checkpoint_resize(config, init)
  return config.model.resize


def random_tower(arch, seed=0):
  """Canonical flat float32 dict of a freshly initialised tower + MAP head."""
  k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
  images = jnp.zeros((1, arch.image_size, arch.image_size, 3))
  tokens = jnp.zeros((1, arch.num_patches, arch.width))
  tower = jax.jit(vit.VisionTower(arch).init)(k1, images)["params"]
  head = jax.jit(vit.NearIDHead(arch).init)(k2, tokens)["params"]
  flat = {**common.flatten(tower), **common.flatten(head)}
  return {k: np.asarray(v, np.float32) for k, v in flat.items()}


def tower_tokens(tower, img_params, pixels):
  """The frozen tower's pass: pixels (..., R, R, 3) -> tokens (..., N, D).

  uint8 pixels are scaled to [-1, 1] here, on the device; float pixels are
  taken as scaled already. No gradient ever reaches the tower.
  """
  lead = pixels.shape[:-3]
  x = pixels.reshape((-1,) + pixels.shape[-3:])
  if x.dtype == jnp.uint8:
    x = preprocess.scale(x)
  tokens = tower.apply({"params": img_params}, x.astype(tower.dtype))
  return jax.lax.stop_gradient(tokens.reshape(lead + tokens.shape[-2:]))


def forward(tower, head, params, pixels):
  """Pixels -> L2-normalised embeddings; the tower is frozen."""
  return head.apply({"params": params["head"]},
                    tower_tokens(tower, params["img"], pixels))


class NearID:
  """An identity embedder. Build it with `NearID.load(path)`."""

  def __init__(self, arch, params, *, out_dim=None, dtype="float32",
               scan=None, remat=False, resize="pil", batch_size=32,
               kernels="auto"):
    if dtype not in DTYPES:
      raise ValueError(f"dtype {dtype!r}: one of {sorted(DTYPES)}")
    if resize not in preprocess.RESIZE_METHODS:
      raise ValueError(f"resize {resize!r}: one of "
                       f"{preprocess.RESIZE_METHODS}")
    self.arch = arch
    self.out_dim = out_dim or arch.width
    self.scan = default_scan(arch, scan)
    self.resize = resize
    self.batch_size = batch_size
    # The backend's attention forms (kernels.py): XLA:CPU's layouts on the
    # CPU, cuDNN's flash attention on a GPU, the plain math elsewhere.
    self.kernels = kernels_lib.kernels(kernels)
    self.compiler_options = xla_flags.tower_options(arch)
    self.tower = vit.VisionTower(arch, scan=self.scan, remat=remat,
                                 dtype=DTYPES[dtype], kernels=self.kernels)
    self.head = vit.NearIDHead(arch, out_dim, kernels=self.kernels)
    self.params = params
    self._forward = jax.jit(lambda p, x: forward(self.tower, self.head, p, x),
                            compiler_options=self.compiler_options)

  @classmethod
  def load(cls, path, *, image_size=None, out_dim=None, seed=0, resize=None,
           **kw):
    """Loads any checkpoint of SPEC.md §2 (the architecture comes from shapes).

    image_size: run at another resolution (position embeddings resampled).
    out_dim: add a Dense projection to this width (fresh, from `seed`) when it
      differs from the tower's width and the checkpoint has none.
    resize: the resize method (preprocess.RESIZE_METHODS); by default a
      directory's preprocessor_config.json decides, so embed() equals
      transformers + AutoImageProcessor on it, and a .npz gets "pil".
    Other keywords go to the constructor (dtype, scan, remat, ...).
    A training workdir gives its latest trained head on its config's tower
    (its config decides image size, dtype and the rest).
    """
    if workdir_lib.is_workdir(os.fspath(path)):
      return cls._from_workdir(os.fspath(path))
    flat, arch = formats.load(path)
    resize = resize or formats.resize_method(path, arch)
    if image_size and image_size != arch.image_size:
      arch = arch.replace(image_size=image_size)
      flat["pos_embedding"] = common.resample_posemb(flat["pos_embedding"],
                                                     arch.grid)
    wants_proj = bool(out_dim) and out_dim != arch.width
    has_proj = any(k.startswith("proj/") for k in flat)
    if wants_proj and not has_proj:
      flat.update(_fresh_projection(arch, out_dim, seed))
    elif has_proj:
      out_dim = flat["proj/kernel"].shape[1]
    common.check(flat, arch, os.fspath(path), out_dim)
    scan = default_scan(arch, kw.pop("scan", None))
    params = split_params(flat, arch, scan)
    return cls(arch, jax.device_put(params), out_dim=out_dim, scan=scan,
               resize=resize, **kw)

  @classmethod
  def from_config(cls, config, init=None):
    """The model a training config starts from: config.model's tower and
    pretrained head at its resolution, dtype and kernels.

    init: a checkpoint in place of config.model.init, or a training workdir
    (which brings its own config and trained head). With neither, a random
    tower from config.seed (smoke tests, benchmarks).
    """
    m = config.model
    path = os.fspath(init or m.init)
    if path and workdir_lib.is_workdir(path):
      return cls._from_workdir(path)
    kw = dict(dtype=m.dtype, scan=m.scan, remat=m.remat,
              resize=checkpoint_resize(config, init),
              kernels=m.get("kernels", "auto"))
    if path:
      model = cls.load(path, image_size=m.res or None,
                       out_dim=m.out_dim or None, seed=config.seed, **kw)
      model.arch.check_tiles("model.res" if m.res else f"{path} resolution")
      return model
    arch = vit.Arch.from_variant(m.variant, m.res)
    if m.out_dim and m.out_dim != arch.width:
      raise ValueError("model.out_dim needs model.init (a checkpoint)")
    scan = default_scan(arch, kw.pop("scan"))
    return cls(arch, split_params(random_tower(arch, config.seed), arch, scan),
               scan=scan, **kw)

  @classmethod
  def _from_workdir(cls, workdir):
    """The model of the config saved with the workdir's newest readable
    checkpoint, with that checkpoint's head."""
    config, config_step = workdir_lib.read_config_and_step(workdir)
    model = cls.from_config(config)
    head, model.step = workdir_lib.restore_head(
        workdir, jax.device_get(model.params["head"]))
    if (config_step not in (None, model.step)  # past an unreadable newest
        and workdir_lib.read_config(workdir, model.step).to_dict()
        != config.to_dict()):
      raise ValueError(
          f"{workdir}: checkpoint {model.step}, the newest readable one, was "
          "trained with another config than the newest (unreadable) one; "
          "load again once that one is set aside")
    model.params = {"img": model.params["img"], "head": head}
    return model

  def embed(self, images):
    """uint8 (B, H, W, 3), or a list of image paths, PIL images or uint8
    (H, W, 3) arrays -> float32 (B, D), unit norm.

    Other pixel types are converted or refused (preprocess.image_uint8);
    each image is resized as it is read (preprocess.preprocess).
    """
    x = preprocess.preprocess(images, self.arch.image_size, self.resize)
    out = []
    for i in range(0, len(x), self.batch_size):
      chunk = x[i:i + self.batch_size]
      # Pad to a power of two (capped at batch_size): few compiled shapes.
      size = min(self.batch_size, 1 << (len(chunk) - 1).bit_length())
      padded = np.pad(chunk, [(0, size - len(chunk))] + [(0, 0)] * 3)
      out.append(np.asarray(self._forward(self.params, padded))[:len(chunk)])
    if not out:
      return np.zeros((0, self.out_dim), np.float32)
    return np.concatenate(out).astype(np.float32)

  def flat_params(self):
    """Canonical (big_vision, unrolled) float32 tree of tower and head."""
    return join_params(self.params, self.scan)

  def export(self, out_dir, format="nearid", dtype="float32", overwrite=False):  # pylint: disable=redefined-builtin
    """Writes a NearID release dir, a SiglipVisionModel dir or a big_vision npz.

    The directory appears whole or not at all: it is written beside its
    destination (`.export-<host>-<pid>-*`) and renamed into place; those an
    export that died left are removed by the next one. Files and directory
    get the user's umask.
    """
    if format not in formats.EXPORT_FORMATS:
      raise ValueError(f"unknown export format {format!r}: one of "
                       f"{formats.EXPORT_FORMATS}")
    if dtype not in ("float32", "float16"):
      raise ValueError(f"export dtype {dtype!r}: 'float32' or 'float16'")
    if self.out_dim != self.arch.width and format != "big_vision":
      raise ValueError(
          f"format {format!r} has no place for the projection to "
          f"{self.out_dim} dims; export format='big_vision' instead")
    out_dir = os.path.abspath(os.fspath(out_dir))
    if os.path.exists(out_dir) and not overwrite:
      raise FileExistsError(f"{out_dir} exists; pass overwrite=True to "
                            "replace it")
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    _remove_dead_exports(parent)
    tmp = os.path.join(parent, f"{_EXPORT_TMP}{socket.gethostname()}-"
                       f"{os.getpid()}-{secrets.token_hex(4)}")
    os.mkdir(tmp)  # not mkdtemp (0700): the user's umask
    try:
      flat = self.flat_params()
      if format == "big_vision":
        # The name carries the resolution, as released SigLIP2 files do.
        name = f"nearid_{self.arch.image_size}.npz"
        bigvision.save(os.path.join(tmp, name),
                       {k: v.astype(dtype) for k, v in flat.items()},
                       scanned=self.scan, two_tower=False)
      else:
        hf.save(tmp, flat, self.arch, format, dtype, self.resize)
      _follow_umask(tmp)
      # The old export is moved aside, not deleted, until the new one is in.
      old = tmp + ".old"
      if os.path.exists(out_dir):
        os.replace(out_dir, old)
      os.replace(tmp, out_dir)
    finally:
      for path in (tmp, tmp + ".old"):
        if os.path.exists(path):
          shutil.rmtree(path)
    return out_dir


def _remove_dead_exports(parent):
  """Removes the temporary dirs of exports whose process no longer runs."""
  for path in glob.glob(os.path.join(parent, _EXPORT_TMP + "*")):
    try:
      host, pid, _ = os.path.basename(path)[len(_EXPORT_TMP):].rsplit("-", 2)
      pid = int(pid)
    except ValueError:
      continue  # not named by export
    if not locks.running(host, pid):
      shutil.rmtree(path)


def _follow_umask(directory):
  """Gives the files the user's umask: safetensors writes them 0600."""
  umask = os.umask(0)
  os.umask(umask)
  for name in os.listdir(directory):
    os.chmod(os.path.join(directory, name), 0o666 & ~umask)


def _fresh_projection(arch, out_dim, seed):
  head = vit.NearIDHead(arch, out_dim)
  tokens = jnp.zeros((1, arch.num_patches, arch.width))
  params = jax.jit(head.init)(jax.random.PRNGKey(seed), tokens)["params"]
  return {f"proj/{k}": np.asarray(v) for k, v in
          common.flatten(params["proj"]).items()}
