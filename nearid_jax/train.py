"""Training the MAP head with the two-tier loss: state, step, and the loop.

Read top to bottom: config checks, model, state, sharded step, data,
checkpoint/resume, loop. The frozen tower is sharded (optionally over a
weight axis), the head and its optimizer state are replicated, the batch is
split over "data"; the loss sees the global batch.
"""
import os
import time
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from nearid_jax import checkpointing
from nearid_jax import losses
from nearid_jax import optim
from nearid_jax import preprocess
from nearid_jax import sharding
from nearid_jax import vit
from nearid_jax.metric_writer import MetricWriter
from nearid_jax.model import frozen_tokens
from nearid_jax.model import NearID
from nearid_jax.model import split_params
from nearid_jax.random_init import random_tower


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any  # the head's only: the tower is not in the optimizer
  opt_state: Any
  rng: jax.Array


def check_config(config):
  """Everything that can be refused before any compute."""
  if config.loss.name not in losses.LOSSES:
    raise ValueError(f"loss.name={config.loss.name!r}: one of "
                     f"{sorted(losses.LOSSES)}")
  for field in ("total_steps", "log_every", "ckpt_every"):
    if config[field] <= 0:
      raise ValueError(f"{field}={config[field]} must be positive")
  mesh = sharding.make_mesh(config.mesh)
  sharding.check_batch(mesh, config.input.batch_size)
  return mesh


def load_model(config):
  """The frozen tower + pretrained head the run starts from."""
  m = config.model
  kw = dict(dtype=m.dtype, scan=m.scan, remat=m.remat, resize=m.resize)
  if m.init:
    return NearID.load(m.init, image_size=m.res or None,
                       out_dim=m.out_dim or None, seed=config.seed, **kw)
  # No checkpoint: a random tower from the seed (smoke tests, benchmarks).
  arch = vit.Arch.from_variant(m.variant, m.res)
  flat = random_tower(arch, config.seed)
  if m.out_dim and m.out_dim != arch.width:
    raise ValueError("model.out_dim needs model.init (a checkpoint)")
  return NearID(arch, split_params(flat, arch, m.scan), **kw)


def create_train_state(config, head_params):
  tx = optim.make(config)
  state = TrainState(step=jnp.zeros((), jnp.int32), params=head_params,
                     opt_state=tx.init(head_params),
                     rng=jax.random.PRNGKey(config.seed))
  return state, tx


def group_tokens(model, frozen, batch):
  """The frozen tower's tokens for every slot of a batch: (B * 6, N, D).

  One tower forward for all 3 views + 3 distractors; a batch read from the
  feature cache (nearid_jax/feature_cache.py) carries them already.
  """
  if "tokens" in batch:
    t = batch["tokens"]  # (B, 6, N, D), bfloat16 on disk
    return t.reshape((-1,) + t.shape[2:]).astype(jnp.float32)
  images = jnp.concatenate([batch["views"], batch["distractors"]], axis=1)
  x = preprocess.scale(images.reshape((-1,) + images.shape[2:]))
  return frozen_tokens(model.tower, frozen, x)


def make_train_step(model, tx, config):
  loss_fn = losses.LOSSES[config.loss.name]
  hparams = {k: v for k, v in config.loss.items() if k != "name"}
  lr = optim.schedule(config)

  def step(frozen, state, batch):
    tokens = group_tokens(model, frozen, batch)
    b = batch["view_mask"].shape[0]

    def objective(head):
      emb = model.head.apply({"params": head}, tokens).reshape(b, 6, -1)
      return loss_fn(emb[:, 0], emb[:, 1:3], emb[:, 3:],
                     batch["view_mask"][:, 1:], batch["distractor_mask"],
                     **hparams)

    (loss, aux), grads = jax.value_and_grad(objective, has_aux=True)(
        state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {"train/loss": loss, "train/grad_norm": optax.tree.norm(grads),
               "train/lr": lr(state.step),
               **{f"train/{k}": v for k, v in aux.items()}}
    new = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
    return new, metrics

  return step


def jit_train_step(step, mesh, frozen, state):
  """One jit with explicit shardings ("pjit"); the state's buffers donated."""
  return jax.jit(
      step,
      in_shardings=(sharding.weight_shardings(mesh, frozen),
                    sharding.replicated(mesh), sharding.batch_sharding(mesh)),
      out_shardings=(sharding.replicated(mesh), sharding.replicated(mesh)),
      donate_argnums=(1,))


def setup(config, mesh):
  """-> model, frozen tower params and train state placed on `mesh`, step."""
  model = load_model(config)
  state, tx = create_train_state(config, model.params["head"])
  frozen = jax.device_put(model.params["img"],
                          sharding.weight_shardings(mesh, model.params["img"]))
  state = jax.device_put(state, sharding.replicated(mesh))
  step = jit_train_step(make_train_step(model, tx, config), mesh, frozen, state)
  return model, frozen, state, step


def _log(msg):
  if jax.process_index() == 0:
    print(f"[train {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def train_and_evaluate(config, workdir, data_iter=None, evaluate=None):
  """Trains into `workdir`, resuming from its latest checkpoint.

  data_iter: overrides the input pipeline (an iterator of per-process batches
    with grain's get_state/set_state). evaluate: (model, step) -> scalars,
    run at step 0, every `eval_every` steps and at the end; by default
    evaluate.make_evaluator's NearID/MTG scores, baseline beside trained.
  Returns the final TrainState and the NearID model holding the trained head.
  """
  mesh = check_config(config)
  os.makedirs(workdir, exist_ok=True)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2))

  # --- model and state
  model, frozen, state, train_step = setup(config, mesh)

  if evaluate is None and config.eval_every:
    # The baseline is the checkpoint's own MAP head: the state before training.
    from nearid_jax import evaluate as evaluate_lib  # pylint: disable=g-import-not-at-top
    evaluate = evaluate_lib.make_evaluator(config, mesh, model.params["head"])

  # --- data
  if data_iter is None:
    import input_pipeline  # pylint: disable=g-import-not-at-top
    data_iter = input_pipeline.train_iterator(
        config.input, jax.process_index(), jax.process_count())

  # --- checkpoints: resume if there is one
  mngr = checkpointing.manager(workdir, config.keep_ckpts)
  restored = checkpointing.restore(mngr, state, data_iter)
  if restored is not None:
    state = restored
    _log(f"resumed from step {int(state.step)}")
  first = int(state.step)

  writer = MetricWriter(workdir)

  def run_eval(step):
    if evaluate is None:
      return
    model.params = {"img": frozen, "head": state.params}
    writer.write(step, evaluate(model, step))

  if first == 0 and config.eval_every:
    run_eval(0)

  # --- loop
  images_per_step = config.input.batch_size * 6
  t0, last = time.time(), first
  for step in range(first + 1, config.total_steps + 1):
    batch = sharding.global_batch(next(data_iter), mesh)
    state, metrics = train_step(frozen, state, batch)

    if step % config.log_every == 0 or step == config.total_steps:
      metrics = jax.device_get(metrics)  # the only host sync of the loop
      if not np.isfinite(metrics["train/loss"]):
        raise FloatingPointError(f"step {step}: loss is "
                                 f"{metrics['train/loss']}")
      dt = time.time() - t0
      rate = (step - last) / dt
      writer.write(step, {**metrics, "perf/steps_per_s": rate,
                          "perf/images_per_s": rate * images_per_step})
      eta = (config.total_steps - step) / max(rate, 1e-9)
      _log(f"step {step}/{config.total_steps} loss "
           f"{metrics['train/loss']:.4f} | {rate:.2f} steps/s, "
           f"{rate * images_per_step:.1f} img/s | ETA {eta:.0f}s")
      t0, last = time.time(), step

    if step % config.ckpt_every == 0 or step == config.total_steps:
      checkpointing.save(mngr, step, state, data_iter)
    if config.eval_every and (step % config.eval_every == 0
                              or step == config.total_steps):
      run_eval(step)

  mngr.wait_until_finished()
  writer.close()
  model.params = {"img": frozen, "head": state.params}
  return state, model
