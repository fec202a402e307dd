"""The head's optimizer: AdamW, warmup + cosine schedule, global-norm clip."""
import optax


def schedule(config):
  warmup = min(config.warmup_steps, config.total_steps)
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=config.lr, warmup_steps=warmup,
      # optax needs a non-empty cosine part, even for runs all warmup.
      decay_steps=max(config.total_steps, warmup + 1), end_value=0.0)


def make(config):
  return optax.chain(
      optax.clip_by_global_norm(config.grad_clip_norm),
      optax.adamw(schedule(config), weight_decay=config.wd))
