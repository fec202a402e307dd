"""R7 on SigLIP2 B/16@224: a cheaper tower for ablations and sweeps.

  python launch.py --config configs/b16_224.py:/ckpts/siglip2_b16_224.npz ...
"""
from configs.common import training_config


def get_config(arg="siglip2_b16_224.npz"):
  c = training_config()
  c.model.init = arg
  c.model.variant, c.model.res = "B/16", 224
  c.model.scan = False
  return c
