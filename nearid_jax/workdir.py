"""A training workdir as a model: its config's tower + its latest trained head."""
import json
import os

import jax
import ml_collections

from nearid_jax import checkpointing


def is_workdir(path):
  return (os.path.isdir(os.path.join(path, "checkpoints"))
          and os.path.exists(os.path.join(path, "config.json")))


def read_config(workdir):
  with open(os.path.join(workdir, "config.json")) as f:
    return ml_collections.ConfigDict(json.load(f))


def load(workdir, step=None):
  """-> NearID with the head of checkpoint `step` (default: the latest)."""
  from nearid_jax import train  # pylint: disable=g-import-not-at-top
  config = read_config(workdir)
  model = train.load_model(config)
  state, _ = train.create_train_state(config, model.params["head"])
  mngr = checkpointing.manager(workdir, async_save=False)
  restored = checkpointing.restore(mngr, state, step=step)
  if restored is None:
    raise FileNotFoundError(f"{workdir}: no checkpoint in "
                            f"{os.path.join(workdir, 'checkpoints')}")
  model.params = {"img": model.params["img"],
                  "head": jax.device_get(restored.params)}
  model.step = int(restored.step)
  return model


def resolve_data_dirs(config, workdir):
  """input.data_dir / manual_dir left "" live in the workdir (the demo's)."""
  inp = config.input
  inp.manual_dir = inp.manual_dir or os.path.join(workdir, "data", "hf")
  inp.data_dir = inp.data_dir or os.path.join(workdir, "data", "tfds")
