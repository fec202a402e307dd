"""big_vision `.npz` checkpoints: SigLIP2 two-tower files and image-only trees.

Keys are flat, "/"-separated. Two-tower files keep the image tower under
`params/img/` (the text tower, `params/t` and `params/b` are ignored);
image-only trees put it under `params/`, `img/` or at the top level.
"""
import os
import re
import zipfile

import numpy as np

from nearid_jax.formats import common

# Most specific first: "params/img/" must win over "params/".
_PREFIXES = ("params/img/", "img/", "params/", "")


def load(path):
  """-> (canonical flat dict, Arch)."""
  try:
    npz = np.load(path, allow_pickle=False)
  except (OSError, ValueError, zipfile.BadZipFile) as e:
    raise common.CheckpointError(f"{path}: not a readable .npz file ({e})")
  with npz:
    keys = list(npz.keys())
    prefix = next((p for p in _PREFIXES if p + "embedding/kernel" in keys
                   or p + "Transformer/encoder_norm/scale" in keys), None)
    if prefix is None:
      raise common.CheckpointError(
          f"{path}: no SigLIP image tower found (looked for "
          f"'embedding/kernel' under {[p for p in _PREFIXES if p]} or at "
          "the top level)")
    if prefix + "head/kernel" in keys:
      raise common.CheckpointError(
          f"{path}: {prefix}head/kernel is an image-tower projection, which "
          "SigLIP2 towers do not have and NearID does not model")
    flat = {k[len(prefix):]: common.to_float32(npz[k]) for k in keys
            if k.startswith(prefix) and not k.startswith(("params/txt/", "txt/"))
            and k[len(prefix):].split("/")[0] in _TOWER_TOP}
  flat = common.unscan(flat)
  # Released files carry the resolution in their name: siglip2_so400m14_384.npz
  m = re.search(r"_(\d+)\.npz$", os.path.basename(path))
  arch = common.infer_arch(flat, path, int(m.group(1)) if m else None)
  return flat, arch


# Top-level entries of big_vision's image tower that we model.
_TOWER_TOP = ("embedding", "pos_embedding", "Transformer", "MAPHead_0", "proj")


def save(path, flat, scanned=False, two_tower=True):
  """Writes a canonical tree as big_vision would (no text tower)."""
  if scanned:
    flat = common.scan(flat, common.depth_of(flat))
  prefix = "params/img/" if two_tower else "params/"
  tmp = path + ".tmp.npz"
  np.savez(tmp, **{prefix + k: np.asarray(v) for k, v in flat.items()})
  os.replace(tmp, path)
