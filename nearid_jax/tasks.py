"""What each `launch.py --mode` runs. Every mode takes (config, workdir)."""
import os

import input_pipeline
from nearid_jax import sweep as sweep_lib
from nearid_jax import workdir as workdir_lib
from nearid_jax.demo import demo as demo_lib
from nearid_jax.evaluators import evaluate as evaluate_lib
from nearid_jax.model import NearID
from nearid_jax.training import feature_cache
from nearid_jax.training import train as train_lib


def _resolve(config, workdir):
  """Data dirs under the workdir; the demo config's own pretrained tower.

  The config is checked first: a fault is refused before the demo tower's
  pretraining, the first compute.
  """
  workdir_lib.resolve_data_dirs(config, workdir)
  train_lib.check_config(config)
  if "demo" in config:
    demo_lib.pretrained_tower(config, workdir)


def prepare(config, workdir):
  """Prepares the datasets; workdir may be None when input.data_dir and
  input.manual_dir are set (launch.py checks)."""
  if workdir is not None:
    workdir_lib.resolve_data_dirs(config, workdir)
  input_pipeline.prepare(config.input)  # one line per dataset


def cache(config, workdir):
  """The frozen tower's tokens into config.input.feature_cache, once."""
  _resolve(config, workdir)
  meta = feature_cache.write(config, config.input.feature_cache)
  print(f"feature cache {config.input.feature_cache}: {meta['images']} "
        "images")


def train(config, workdir):
  _resolve(config, workdir)
  train_lib.train_and_evaluate(config, workdir)


def evaluate(config, workdir):
  _resolve(config, workdir)
  evaluate_lib.run(config, workdir, os.path.join(workdir, "eval"))


def export(config, workdir):
  """The workdir's latest head (with its tower) in each configured format."""
  model = NearID.load(workdir)
  for fmt in config.export.formats:
    out = model.export(os.path.join(workdir, "export", fmt), format=fmt,
                       dtype=config.export.dtype, overwrite=True)
    print(f"exported {fmt} ({config.export.dtype}): {out}")


def sweep(config, config_file, root):
  runs = sweep_lib.runs(config, config_file, root)  # all checked up front
  for i, (run_config, workdir) in enumerate(runs):
    print(f"sweep run {i + 1}/{len(runs)}: {workdir}", flush=True)
    _resolve(run_config, workdir)
    train_lib.train_and_evaluate(run_config, workdir)


MODES = {"demo": demo_lib.run, "prepare": prepare, "cache": cache,
         "train": train,
         "eval": evaluate, "export": export}
