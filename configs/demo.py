"""The embedded default: the full job on a small SigLIP2-shaped tower, 2 CPUs.

    make demo     # = python launch.py --config configs/demo.py \
                  #       --workdir runs/demo --mode demo

Synthetic NearID-format data (input_pipeline/synthetic.py), a frozen
`pico/8` tower that the demo pretrains once on a disjoint pool of synthetic
identities (nearid_jax/demo/tower_pretrain.py), and the paper's two-tier
training of the MAP head (nearid_jax/demo/demo.py).
"""
import ml_collections

from configs.common import training_config


def get_config(arg=None):
  del arg
  c = training_config()
  c.total_steps = 300
  c.warmup_steps = 50
  c.lr = 1e-2  # a small head learns faster than R7's (docs/demo.md)
  c.log_every = 50
  c.eval_every = 100
  c.ckpt_every = 100

  # "": <workdir>/pretrained/pico8_48.npz, made once from demo.pretrain
  # (below) by every mode that runs the model; with
  # demo.pretrain.total_steps=0, "" is a random tower from the seed.
  c.model.init = ""
  c.model.variant, c.model.res = "pico/8", 48
  c.model.scan = False

  c.input.batch_size = 32
  c.input.data_dir = ""         # "" = <workdir>/data/tfds
  c.input.manual_dir = ""       # "" = <workdir>/data/hf (generated)
  # Colour edits: what a frozen pico tower's tokens can carry (docs/demo.md).
  c.input.sources = ("Flux", "SDXL")  # eval_sources follows
  c.input.mtg_repeat = 1

  c.eval.batch_size = 64

  c.demo = ml_collections.ConfigDict()
  c.demo.identities = 2000
  c.demo.image_res = 64         # generated images; squash-resized to res
  c.demo.mtg_rows = 60

  # The frozen tower's self-supervised warm-up
  # (nearid_jax/demo/tower_pretrain.py);
  # total_steps = 0 leaves a random tower from `seed`.
  c.demo.pretrain = ml_collections.ConfigDict()
  p = c.demo.pretrain
  p.groups = 2000               # x 2 identities x 2 backgrounds x 2 shots
  p.image_res = c.demo.get_ref("image_res")
  p.total_steps = 800
  p.batch_size = 16             # groups: 64 scenes, 128 images a step
  p.lr = 2e-3
  p.wd = 1e-4
  p.warmup_steps = 50
  p.grad_clip_norm = 1.0
  p.temperature = 0.1
  p.object_weight = 3.0         # the auxiliary object head's loss (dropped)
  p.log_every = 100
  # The head trains on the frozen tower's tokens, computed once into
  # <workdir>/data/cache (nearid_jax/training/feature_cache.py) unless
  # input.feature_cache names another folder.
  c.demo.cache_features = True
  return c
