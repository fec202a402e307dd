"""The main job on the embedded default: checkpoint -> embed -> export -> verify."""
import json
import os
import time

import numpy as np

from nearid_jax import vit
from nearid_jax.formats import bigvision
from nearid_jax.model import NearID
from nearid_jax.random_init import random_tower


def _log(msg):
  print(f"[demo {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def run(config, workdir):
  os.makedirs(workdir, exist_ok=True)
  arch = vit.Arch.from_variant(config.model.variant, config.model.res)
  path = config.model.init
  if not path:
    path = os.path.join(workdir, "pretrained", "tower.npz")
    if not os.path.exists(path):
      os.makedirs(os.path.dirname(path), exist_ok=True)
      bigvision.save(path, random_tower(arch, config.seed))
      _log(f"wrote a random {config.model.variant}@{config.model.res} "
           f"tower in big_vision layout: {path}")
  model = NearID.load(path, dtype=config.model.dtype)
  _log(f"loaded {path}: {model.arch}")

  rng = np.random.default_rng(config.seed)
  images = rng.integers(0, 256, (8, 48, 40, 3), np.uint8)
  emb = model.embed(images)
  _log(f"embedded {len(images)} images -> {emb.shape}, norms "
       f"{np.linalg.norm(emb, axis=1).min():.4f}..")

  report = {"checkpoint": path, "arch": vars(model.arch), "exports": {}}
  for fmt in config.export.formats:
    out = model.export(os.path.join(workdir, "export", fmt), format=fmt,
                       dtype=config.export.dtype, overwrite=True)
    report["exports"][fmt] = {"dir": out, **_verify(out, fmt, images, emb)}
    _log(f"exported {fmt}: {out} {report['exports'][fmt]}")
  with open(os.path.join(workdir, "demo.json"), "w") as f:
    json.dump(report, f, indent=2)
  _log(f"done: {os.path.join(workdir, 'demo.json')}")
  return report


def _verify(out_dir, fmt, images, emb):
  """Reload the export with transformers when it is installed."""
  try:
    from nearid_jax import torch_export  # pylint: disable=g-import-not-at-top
  except ImportError:
    return {"verified": "skipped (torch/transformers not installed)"}
  ref = torch_export.embed(out_dir, fmt, images)
  return {"verified": "transformers",
          "max_abs_diff": float(np.abs(ref - emb).max())}
