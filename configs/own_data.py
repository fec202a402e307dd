"""Your own NearID-format data on a small SigLIP2 tower (README, "Your own data").

  python launch.py --config configs/own_data.py --mode prepare \
      --config.input.manual_dir=data/hf --config.input.data_dir=data/tfds \
      "--config.input.sources=('Flux', 'SDXL')"
  python launch.py --config configs/own_data.py:/ckpts/siglip2_b16_224.npz \
      --workdir runs/mine --config.input.manual_dir=data/hf \
      --config.input.data_dir=data/tfds "--config.input.sources=('Flux', 'SDXL')"

The argument is the tower's checkpoint (big_vision .npz or HF directory);
without one the tower is random (`model.variant` at `model.res`): a dry run
of the data path, not a model worth evaluating. No MTG unless
input.mtg_repeat > 0 (it is evaluated when prepared).
"""
from configs.common import training_config


def get_config(arg=""):
  c = training_config()
  c.model.init = arg
  c.model.variant, c.model.res = "B/16", 224
  c.model.scan = False
  c.input.sources = ("Flux",)   # eval_sources follows
  c.input.mtg_repeat = 0
  c.input.batch_size = 32
  c.eval.batch_size = 32
  c.total_steps = 1000
  return c
