"""The embedded default: the full job on a small SigLIP2-shaped tower, 2 CPUs.

    make demo     # = python launch.py --config configs/demo.py \
                  #       --workdir runs/demo --mode demo

Synthetic NearID-format data (input_pipeline/synthetic.py), a frozen
`pico/8` tower made from the seed, and the paper's two-tier training of the
MAP head (nearid_jax/demo.py).
"""
import ml_collections

from configs.common import training_config


def get_config(arg=None):
  del arg
  c = training_config()
  c.total_steps = 600
  c.warmup_steps = 50
  c.lr = 3e-3                   # a fresh small head learns faster than R7's
  c.log_every = 50
  c.eval_every = 200
  c.ckpt_every = 200

  c.model.init = ""             # a random tower from `seed` (README)
  c.model.variant, c.model.res = "pico/8", 48
  c.model.scan = False

  c.input.batch_size = 32
  c.input.data_dir = ""         # "" = <workdir>/data/tfds
  c.input.manual_dir = ""       # "" = <workdir>/data/hf (generated)
  # Colour edits: what a frozen pico tower's tokens can carry (README).
  c.input.sources = ("Flux", "SDXL")
  c.input.eval_sources = c.input.sources
  c.input.mtg_repeat = 1

  c.eval.batch_size = 64

  c.demo = ml_collections.ConfigDict()
  c.demo.identities = 2000
  c.demo.image_res = 64         # generated images; squash-resized to res
  c.demo.mtg_rows = 60
  return c
