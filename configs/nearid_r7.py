"""The paper recipe R7 (SPEC.md §6): So400m/14@384, batch 128, 3,300 steps.

  python launch.py --config configs/nearid_r7.py:/ckpts/siglip2_so400m14_384.npz \
      --workdir /mnt/bucket/r7 --config.input.data_dir=/mnt/bucket/tfds

The argument is the SigLIP2 checkpoint (big_vision .npz or HF directory).
"""
from configs.common import training_config


def get_config(arg="siglip2_so400m14_384.npz"):
  c = training_config()
  c.model.init = arg
  c.model.variant, c.model.res = "So400m/14", 384
  c.model.dtype = "bfloat16"    # frozen tower in bf16, head in float32
  return c
