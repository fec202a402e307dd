"""Checkpoint formats. `load(path)` finds which one a path holds."""
import os

from nearid_jax.formats import bigvision
from nearid_jax.formats import hf
from nearid_jax.formats.common import CheckpointError

EXPORT_FORMATS = ("nearid", "hf-siglip", "big_vision")


def resize_method(path, arch=None):
  """The preprocessing a checkpoint asks for: a Hugging Face or NearID
  release directory's preprocessor_config.json, else SPEC.md's default.
  arch: the checkpoint's, to check the config's size against (None: not
  checked here; loading the checkpoint checks it)."""
  path = os.fspath(path)
  if os.path.exists(os.path.join(path, "config.json")):
    return hf.resize_method(path, arch)
  return "pil"


def load(path):
  """Any supported checkpoint path -> (canonical flat dict, Arch)."""
  path = os.fspath(path)
  if os.path.isfile(path):
    if path.endswith(".npz"):
      return bigvision.load(path)
    raise CheckpointError(
        f"{path}: not a checkpoint; expected a big_vision .npz file or a "
        "directory with config.json and model.safetensors")
  if os.path.isdir(path):
    if os.path.exists(os.path.join(path, "config.json")):
      return hf.load(path)
    npz = [f for f in os.listdir(path) if f.endswith(".npz")]
    if len(npz) == 1:  # e.g. what export(format="big_vision") writes
      return bigvision.load(os.path.join(path, npz[0]))
    raise CheckpointError(
        f"{path}: holds no checkpoint (no config.json of a Hugging Face "
        "SigLIP or NearID release directory, and not exactly one .npz file)")
  raise CheckpointError(f"{path}: no such file or directory")
