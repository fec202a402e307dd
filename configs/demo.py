"""The embedded default: a small SigLIP2-shaped tower on a 2-core CPU."""
import ml_collections


def get_config(arg=None):
  del arg
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.model = ml_collections.ConfigDict()
  c.model.variant = "pico/8"   # vit.VARIANTS name / patch size
  c.model.res = 32
  c.model.init = ""            # a checkpoint path; "" = make a random one
  c.model.dtype = "float32"
  c.export = ml_collections.ConfigDict()
  c.export.formats = ("nearid", "hf-siglip")
  c.export.dtype = "float32"
  return c
