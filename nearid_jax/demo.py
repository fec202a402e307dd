"""The main job on the embedded default, from data to an exported model.

  1. generate the synthetic NearID-format dataset and prepare its ArrayRecord
  2. make the frozen tower: `pico/8` at the config's seed (see the README
     on why a random tower suffices here)
  3. train the MAP head with the two-tier loss; eval at step 0 (baseline),
     every eval_every steps and at the end, into metrics.jsonl
  4. evaluate the final head: report.json, report.md, plots
  5. export (nearid, hf-siglip) and check the export with transformers
Each step reuses what a previous run left in the workdir.
"""
import json
import os
import time

import jax
import numpy as np

from nearid_jax import evaluate
from nearid_jax import train
from nearid_jax import workdir as workdir_lib


def _log(msg):
  print(f"[demo {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _data(config, workdir):
  import input_pipeline  # pylint: disable=g-import-not-at-top
  from input_pipeline import synthetic  # pylint: disable=g-import-not-at-top
  inp = config.input
  if not os.path.isdir(os.path.join(inp.manual_dir, "NearID")):
    synthetic.generate(inp.manual_dir, config.demo.identities,
                       config.demo.image_res, config.seed,
                       tuple(inp.eval_sources), mtg=config.demo.mtg_rows)
    _log(f"generated {config.demo.identities} identities, "
         f"{config.demo.mtg_rows} MTG rows: {inp.manual_dir}")
  for name, path in input_pipeline.prepare(inp).items():
    _log(f"prepared {name}: {path}")
  return input_pipeline


def _verify_exports(model, workdir, config, images):
  emb = model.embed(images)
  out = {}
  for fmt in config.export.formats:
    path = model.export(os.path.join(workdir, "export", fmt), format=fmt,
                        dtype=config.export.dtype, overwrite=True)
    try:
      from nearid_jax import torch_export  # pylint: disable=g-import-not-at-top
    except ImportError:
      out[fmt] = {"dir": path, "verified": "skipped: no torch/transformers"}
    else:
      diff = float(np.abs(torch_export.embed(path, fmt, images) - emb).max())
      out[fmt] = {"dir": path, "transformers_max_abs_diff": diff}
    _log(f"exported {fmt}: {out[fmt]}")
  return out


def run(config, workdir):
  t0 = time.time()
  os.makedirs(workdir, exist_ok=True)
  workdir_lib.resolve_data_dirs(config, workdir)
  input_pipeline = _data(config, workdir)

  _log(f"training the MAP head for {config.total_steps} steps")
  _, model = train.train_and_evaluate(config, workdir)

  report_dir = os.path.join(workdir, "report")
  evaluate.run(config, workdir, report_dir)
  batch = next(iter(input_pipeline.eval_batches(
      config.input, config.eval.split, batch_size=8)))
  exports = _verify_exports(model, workdir, config,
                            batch["views"][:, 0][batch["valid"]])

  rows = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  evals = [r for r in rows if "eval/nearid/ssr" in r]
  summary = {
      "seed": config.seed, "seconds": round(time.time() - t0, 1),
      "ssr_step0": evals[0]["eval/nearid/ssr"] if evals else None,
      "ssr_final": evals[-1]["eval/nearid/ssr"] if evals else None,
      "final_step": evals[-1]["step"] if evals else None,
      "exports": exports, "report": report_dir,
      "devices": [str(d) for d in jax.devices()],
  }
  with open(os.path.join(workdir, "demo.json"), "w") as f:
    json.dump(summary, f, indent=2)
  _log(f"NearID SSR on held-out identities: {summary['ssr_step0']:.3f} at "
       f"step 0 (frozen baseline) -> {summary['ssr_final']:.3f} at step "
       f"{summary['final_step']}")
  _log(f"done in {summary['seconds']:.0f}s. In {workdir}: metrics.jsonl, "
       "TensorBoard events, checkpoints/, report/ (report.md, "
       "report.json, plots), export/ (nearid, hf-siglip), demo.json")
  return summary
