"""The main job on the embedded default, from data to an exported model.

  1. generate the synthetic NearID-format dataset and prepare its ArrayRecord
  2. make the frozen tower: `pico/8` pretrained once on its own pool of
     synthetic identities and saved as the run's "pretrained" checkpoint
     (tower_pretrain.py; docs/demo.md says why and how); cache its tokens
     of every training image (nearid_jax/training/feature_cache.py)
  3. train the MAP head with the two-tier loss on the cached tokens; eval at
     step 0 (baseline), every eval_every steps and at the end, into
     metrics.jsonl
  4. evaluate the final head: report.json, report.md, plots
  5. export (nearid, hf-siglip) and check the export with transformers
Each step reuses what a previous run left in the workdir.
"""
import dataclasses
import json
import os
import time

import jax
import numpy as np

import input_pipeline
from input_pipeline import synthetic
from nearid_jax import signals
from nearid_jax import vit
from nearid_jax import workdir as workdir_lib
from nearid_jax.demo import tower_pretrain
from nearid_jax.evaluators import evaluate
from nearid_jax.training import feature_cache
from nearid_jax.training import train


def _log(msg):
  print(f"[demo {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _data(config, workdir):
  inp = config.input
  if not os.path.isdir(os.path.join(inp.manual_dir, "NearID")):
    # Whole or not at all: the folder's presence says the data is there.
    with signals.deferred():
      synthetic.generate(inp.manual_dir, config.demo.identities,
                         config.demo.image_res, config.seed,
                         tuple(inp.eval_sources), mtg=config.demo.mtg_rows)
    _log(f"generated {config.demo.identities} identities, "
         f"{config.demo.mtg_rows} MTG rows: {inp.manual_dir}")
  input_pipeline.prepare(inp, log=_log)


def pretrained_tower(config, workdir):
  """Points config.model.init at the demo's pretrained tower, made if missing.

  Nothing to do when model.init is set or demo.pretrain.total_steps is 0 (a
  random tower from the seed). The checkpoint is remade when the pretraining
  config it was made with differs from this one.
  """
  p = config.demo.pretrain
  if config.model.init or not p.total_steps:
    return None
  arch = vit.Arch.from_variant(config.model.variant, config.model.res)
  name = f"{config.model.variant.replace('/', '')}_{arch.image_size}"
  path = os.path.join(workdir, "pretrained", name + ".npz")
  recipe = {"arch": dataclasses.asdict(arch), "seed": config.seed,
            "resize": config.model.resize, **p.to_dict()}
  recipe_path = os.path.join(workdir, "pretrained", name + ".json")
  made = None
  if os.path.exists(recipe_path):
    with open(recipe_path) as f:
      made = json.load(f)
    made.pop("history", None)
  if os.path.exists(path) and made == recipe:
    _log(f"pretrained tower: {path} (made by an earlier run)")
  else:
    _log(f"pretraining the {config.model.variant}@{arch.image_size} tower "
         f"for {p.total_steps} steps (once; saved as {path})")
    # Written into the workdir: as its writer (train, cache, eval modes
    # come here too).
    with workdir_lib.writer_lock(workdir, "tower pretraining"):
      os.makedirs(os.path.dirname(path), exist_ok=True)
      _, history = tower_pretrain.make(path, arch, p, config.seed,
                                       config.model.resize, log=_log,
                                       kernels=config.model.kernels)
      with signals.deferred(), open(recipe_path, "w") as f:
        json.dump({**recipe, "history": history}, f, indent=2)
  config.model.init = path
  return path


def _feature_cache(config, workdir):
  """Points input.feature_cache at the tower's cached tokens, written once."""
  if not config.demo.cache_features:
    return
  own = not config.input.feature_cache
  if own:
    config.input.feature_cache = os.path.join(workdir, "data", "cache")
  # A cache of an older tower in the demo's own folder is simply replaced.
  meta = feature_cache.write(config, config.input.feature_cache,
                             overwrite=own or None, log=_log)
  _log(f"feature cache: the frozen tower's tokens of {meta['images']} "
       f"images in {config.input.feature_cache}")


def _verify_exports(model, workdir, config, images):
  emb = model.embed(images)
  out = {}
  for fmt in config.export.formats:
    path = model.export(os.path.join(workdir, "export", fmt), format=fmt,
                        dtype=config.export.dtype, overwrite=True)
    try:
      # torch and transformers are test requirements, not runtime ones.
      from nearid_jax.demo import export_check  # pylint: disable=g-import-not-at-top
    except ImportError:
      out[fmt] = {"dir": path, "verified": "skipped: no torch/transformers"}
    else:
      diff = float(np.abs(export_check.embed(path, fmt, images) - emb).max())
      out[fmt] = {"dir": path, "transformers_max_abs_diff": diff}
    _log(f"exported {fmt}: {out[fmt]}")
  return out


def run(config, workdir):
  """All the steps above; a second demo or trainer of the workdir is refused
  at once, naming this one (workdir_lib.writer_lock)."""
  with workdir_lib.writer_lock(workdir, "demo"):
    return _run(config, workdir)


def _run(config, workdir):
  t0 = time.time()
  seconds = {}

  def phase(name, start):
    seconds[name] = round(time.time() - start, 1)
    return time.time()

  os.makedirs(workdir, exist_ok=True)
  workdir_lib.resolve_data_dirs(config, workdir)
  _data(config, workdir)
  t = phase("data", t0)
  tower = pretrained_tower(config, workdir)
  t = phase("pretrain_tower", t)
  _feature_cache(config, workdir)
  t = phase("feature_cache", t)

  _log(f"training the MAP head for {config.total_steps} steps")
  _, model = train.train_and_evaluate(config, workdir)
  t = phase("train_and_eval", t)

  report_dir = os.path.join(workdir, "report")
  evaluate.run(config, workdir, report_dir)
  batch = next(iter(input_pipeline.eval_batches(
      config.input, config.eval.split, batch_size=8)))
  exports = _verify_exports(model, workdir, config,
                            batch["views"][:, 0][batch["valid"]])
  phase("report_and_export", t)

  rows = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  evals = [r for r in rows if "eval/nearid/ssr" in r]
  summary = {
      "seed": config.seed, "seconds": round(time.time() - t0, 1),
      "seconds_by_phase": seconds,
      "tower": tower or config.model.init or "random (model.init unset)",
      "ssr_step0": evals[0]["eval/nearid/ssr"] if evals else None,
      "ssr_final": evals[-1]["eval/nearid/ssr"] if evals else None,
      "final_step": evals[-1]["step"] if evals else None,
      "exports": exports, "report": report_dir,
      "devices": [str(d) for d in jax.devices()],
  }
  with signals.deferred(), open(os.path.join(workdir, "demo.json"), "w") as f:
    json.dump(summary, f, indent=2)
  _log(f"NearID SSR on held-out identities: {summary['ssr_step0']:.3f} at "
       f"step 0 (frozen baseline) -> {summary['ssr_final']:.3f} at step "
       f"{summary['final_step']}")
  _log(f"done in {summary['seconds']:.0f}s. In {workdir}: metrics.jsonl, "
       "TensorBoard events, checkpoints/, report/ (report.md, "
       "report.json, plots), export/ (nearid, hf-siglip), demo.json")
  return summary
