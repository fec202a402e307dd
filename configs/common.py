"""Fields every training config has; the values are the paper recipe (R7)."""
import ml_collections

import input_pipeline


def training_config():
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.total_steps = 3300          # 11 epochs at batch 128
  c.lr = 1e-4
  c.wd = 1e-4
  c.warmup_steps = 100
  c.grad_clip_norm = 1.0
  # (axis, size), -1 = the remaining devices. Add ("fsdp", n) to shard the
  # frozen tower's weights n ways (FSDP: the batch is split over both axes).
  c.mesh = (("data", -1),)
  c.log_every = 10
  c.eval_every = 100            # 0 = no evaluation during training
  c.ckpt_every = 100
  c.keep_ckpts = 3
  # A non-finite loss or gradient: "stop" (naming the step; checkpoints stay
  # before it) or "skip" that update and go on (train/skipped_updates).
  c.on_nonfinite = "stop"
  # Resuming with changes to fields that change what is trained (model,
  # data, batch, optimizer, lr, schedule, seed, loss, resolution, ...) is
  # refused, naming them; True continues the run with the new values
  # (config.json becomes the new config, the old one is kept as
  # config.<UTC time>.json). nearid_jax/training/config_drift.py lists the
  # fields that may always change (cadence, eval, export, total_steps).
  c.resume_with_changes = False

  c.loss = ml_collections.ConfigDict()
  c.loss.name = "two_tier"      # losses.LOSSES; the other fields its kwargs
  c.loss.temperature = 0.07
  c.loss.alpha = 0.5

  c.model = ml_collections.ConfigDict()
  c.model.init = ""             # checkpoint path (NearID.load); "" = random
  c.model.variant = "So400m/14" # the random tower's shape when init is ""
  c.model.res = 384
  c.model.out_dim = 0           # 0 = the tower's width, no projection
  c.model.dtype = "float32"     # the frozen tower's compute dtype
  c.model.scan = True
  c.model.remat = False
  c.model.resize = "pil"
  # A Hugging Face or NearID directory as model.init: its
  # preprocessor_config.json sets model.resize (and input.resize, which
  # follows it), so training preprocesses as the checkpoint was made to.
  # False: model.resize as given.
  c.model.resize_from_checkpoint = True
  # Attention kernels: "auto" = XLA:CPU's layouts on the CPU, cuDNN's flash
  # attention on a GPU, the plain math on TPUs; "plain", "cpu" or "gpu" force
  # one (nearid_jax/kernels.py).
  c.model.kernels = "auto"

  c.input = input_pipeline.default_config()  # fields documented there
  c.input.res = c.model.get_ref("res")
  c.input.resize = c.model.get_ref("resize")
  c.input.batch_size = 128      # global, in groups of 3 views + 3 distractors

  c.eval = ml_collections.ConfigDict()
  c.eval.split = "test"
  c.eval.batch_size = 64        # rows (each 3 views + 3 per source)
  c.eval.mtg = True             # also MTG when it is prepared
  # Keep the frozen tower's tokens of the eval split on the host after the
  # first evaluation of a run; later ones run only the head (the paper's
  # test split: ~22 GB at So400m/14@384 in bf16; evaluate.SplitTokens).
  c.eval.cache_tokens = True

  c.export = ml_collections.ConfigDict()
  c.export.formats = ("nearid", "hf-siglip")
  c.export.dtype = "float32"
  return c
