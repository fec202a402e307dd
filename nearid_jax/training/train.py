"""Training the MAP head with the two-tier loss: state, step, and the loop.

Read top to bottom: config checks, model, state, sharded step, data,
checkpoint/resume, loop. The frozen tower is replicated, or split over an
"fsdp" axis and gathered per layer (sharding.py); the head and its optimizer
state are replicated; the batch is split over every batch axis; the loss
sees the global batch.
"""
import time
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

import input_pipeline
from nearid_jax import checkpointing
from nearid_jax import losses
from nearid_jax import optim
from nearid_jax import sharding
from nearid_jax import vit
from nearid_jax import workdir as workdir_lib
from nearid_jax.evaluators import evaluate as evaluate_lib
from nearid_jax.model import NearID
from nearid_jax.model import resolve_resize
from nearid_jax.model import tower_tokens
from nearid_jax.training import config_drift
from nearid_jax.training import feature_cache
from nearid_jax.training import preemption
from nearid_jax.training.metric_writer import MetricWriter


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any  # the head's only: the tower is not in the optimizer
  opt_state: Any
  rng: jax.Array
  # Updates not applied because the loss or a gradient was not finite, and
  # the first step that happened at (0: never).
  skipped: jax.Array
  first_nonfinite: jax.Array


NONFINITE_POLICIES = ("stop", "skip")


def check_config(config):
  """Everything that can be refused before any compute; model.resize from
  the checkpoint's preprocessing (model.resolve_resize)."""
  if config.loss.name not in losses.LOSSES:
    raise ValueError(f"loss.name={config.loss.name!r}: one of "
                     f"{sorted(losses.LOSSES)}")
  for field in ("total_steps", "log_every", "ckpt_every"):
    if config[field] <= 0:
      raise ValueError(f"{field}={config[field]} must be positive")
  if config.on_nonfinite not in NONFINITE_POLICIES:
    raise ValueError(f"on_nonfinite={config.on_nonfinite!r}: one of "
                     f"{NONFINITE_POLICIES}")
  if not config.model.init:  # a checkpoint's arch is checked as it loads
    vit.Arch.from_variant(config.model.variant,
                          config.model.res).check_tiles("model.res")
  resolve_resize(config)
  mesh = sharding.make_mesh(config.mesh)
  sharding.check_batch(mesh, config.input.batch_size)
  return mesh


def create_train_state(config, head_params):
  tx = optim.make(config)
  # Separate buffers: the step donates the state, each leaf once.
  zero = lambda: jnp.zeros((), jnp.int32)  # pylint: disable=unnecessary-lambda-assignment
  state = TrainState(step=zero(), params=head_params,
                     opt_state=tx.init(head_params),
                     rng=jax.random.PRNGKey(config.seed), skipped=zero(),
                     first_nonfinite=zero())
  return state, tx


def group_tokens(tower, frozen, batch):
  """The frozen tower's tokens for every slot of a batch: (B * 6, N, D).

  One tower forward for all 3 views + 3 distractors; a batch read from the
  feature cache (feature_cache.py) carries them already.
  """
  if "tokens" in batch:
    t = batch["tokens"]  # (B, 6, N, D), bfloat16 on disk
    return t.reshape((-1,) + t.shape[2:]).astype(jnp.float32)
  images = jnp.concatenate([batch["views"], batch["distractors"]], axis=1)
  return tower_tokens(tower, frozen, images.reshape((-1,) + images.shape[2:]))


def make_train_step(model, tx, config, mesh=None):
  """The step function; `mesh` places the tower as sharding.fsdp_tower."""
  tower = sharding.fsdp_tower(model.tower, mesh)
  loss_fn = losses.LOSSES[config.loss.name]
  hparams = {k: v for k, v in config.loss.items() if k != "name"}
  lr = optim.schedule(config)

  def step(frozen, state, batch):
    tokens = group_tokens(tower, frozen, batch)
    b = batch["view_mask"].shape[0]

    def objective(head):
      emb = model.head.apply({"params": head}, tokens).reshape(b, 6, -1)
      return loss_fn(emb[:, 0], emb[:, 1:3], emb[:, 3:],
                     batch["view_mask"][:, 1:], batch["distractor_mask"],
                     **hparams)

    (loss, aux), grads = jax.value_and_grad(objective, has_aux=True)(
        state.params)
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    # A non-finite loss or gradient never reaches the parameters; the loop
    # then stops or goes on (config.on_nonfinite) at its next host sync.
    ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    params, opt_state = jax.tree.map(
        lambda new, old: jnp.where(ok, new, old), (params, opt_state),
        (state.params, state.opt_state))
    first = jnp.where((state.first_nonfinite == 0) & ~ok, state.step + 1,
                      state.first_nonfinite)
    metrics = {"train/loss": loss, "train/grad_norm": grad_norm,
               "train/lr": lr(state.step),
               **{f"train/{k}": v for k, v in aux.items()}}
    new = state.replace(step=state.step + 1, params=params,
                        opt_state=opt_state,
                        skipped=state.skipped + (~ok).astype(jnp.int32),
                        first_nonfinite=first)
    return new, metrics

  return step


def jit_train_step(step, mesh, frozen, model):
  """One jit with explicit shardings ("pjit"); the state's buffers donated."""
  return jax.jit(
      step,
      in_shardings=(sharding.weight_shardings(mesh, frozen),
                    sharding.replicated(mesh), sharding.batch_sharding(mesh)),
      out_shardings=(sharding.replicated(mesh), sharding.replicated(mesh)),
      donate_argnums=(1,), compiler_options=model.compiler_options)


def setup(config, mesh):
  """-> model, frozen tower params and train state placed on `mesh`, step."""
  model = NearID.from_config(config)
  state, tx = create_train_state(config, model.params["head"])
  frozen = jax.device_put(model.params["img"],
                          sharding.weight_shardings(mesh, model.params["img"]))
  state = jax.device_put(state, sharding.replicated(mesh))
  step = jit_train_step(make_train_step(model, tx, config, mesh), mesh,
                        frozen, model)
  return model, frozen, state, step


def _log(msg):
  if jax.process_index() == 0:
    print(f"[train {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def train_and_evaluate(config, workdir, data_iter=None, evaluate=None):
  """Trains into `workdir`, resuming from its latest checkpoint.

  A resume whose config changes what is trained is refused before any
  compute (config_drift.ConfigChanged) unless config.resume_with_changes.

  data_iter: overrides the input pipeline (an iterator of per-process batches
    with grain's get_state/set_state). evaluate: (model, step) -> scalars,
    run at step 0, every `eval_every` steps and at the end; by default
    evaluate.make_evaluator's NearID/MTG scores, baseline beside trained.
  Returns the final TrainState and the NearID model holding the trained head.
  A second trainer of the same workdir is refused at once, naming the first
  (workdir_lib.writer_lock): nothing is written before the lock is taken.
  """
  mesh = check_config(config)
  with workdir_lib.writer_lock(workdir, "training"):
    return _train(config, workdir, mesh, data_iter, evaluate)


def _train(config, workdir, mesh, data_iter, evaluate):
  """train_and_evaluate, holding the workdir's lock."""
  mngr = checkpointing.manager(workdir, config.keep_ckpts)
  # Before any compute: a resume that would mix two runs is refused.
  saved_config = config_drift.check_and_record(config, workdir, mngr, _log)

  # --- model and state
  model, frozen, state, train_step = setup(config, mesh)

  if evaluate is None and config.eval_every:
    # The baseline is the checkpoint's own MAP head: the state before training.
    evaluate = evaluate_lib.make_evaluator(config, mesh, model.params["head"])

  # --- data
  if data_iter is None and config.input.feature_cache:
    # `model` still holds the unplaced tower: hashed, not loaded again.
    data_iter = feature_cache.train_iterator(
        config, jax.process_index(), jax.process_count(), model=model)
  elif data_iter is None:
    data_iter = input_pipeline.train_iterator(
        config.input, jax.process_index(), jax.process_count())

  # --- checkpoints: resume from the newest readable one
  restored = checkpointing.restore(mngr, state, data_iter, log=_log)
  if restored is not None:
    state = restored
    _log(f"resumed from step {int(state.step)}")
  first = int(state.step)

  # Rows past the checkpoint are from steps about to be redone (all rows on
  # a fresh start, which redoes the step-0 evaluation too).
  writer = MetricWriter(workdir, resume_step=first if first else -1)

  def run_eval(step):
    if evaluate is None:
      return
    model.params = {"img": frozen, "head": state.params}
    writer.write(step, evaluate(model, step))

  def check_finite(state):
    """Host sync: raises in "stop" mode once an update was not finite."""
    skipped, bad = (int(x) for x in jax.device_get(
        (state.skipped, state.first_nonfinite)))
    if bad and config.on_nonfinite == "stop":
      mngr.wait_until_finished()
      last = mngr.latest_step()
      raise FloatingPointError(
          f"step {bad}: the loss or a gradient is not finite; stopped "
          f"(config.on_nonfinite='stop'). Last good checkpoint: "
          f"{'none' if last is None else f'step {last}'} in {workdir}")
    return skipped

  if first == 0 and config.eval_every:
    run_eval(0)

  # --- loop
  images_per_step = config.input.batch_size * 6
  t0, last = time.time(), first
  try:
    with preemption.Watch() as watch:
      for step in range(first + 1, config.total_steps + 1):
        batch = sharding.global_batch(next(data_iter), mesh)
        state, metrics = train_step(frozen, state, batch)
        end = step == config.total_steps
        preempted = watch.reached(step)
        log = step % config.log_every == 0 or end or preempted
        save = step % config.ckpt_every == 0 or end or preempted
        if log or save:
          skipped = check_finite(state)  # never log or save past a bad step

        if log:
          metrics = jax.device_get(metrics)  # the loop's only regular sync
          dt = time.time() - t0
          rate = (step - last) / dt
          writer.write(step, {**metrics, "train/skipped_updates": skipped,
                              "perf/steps_per_s": rate,
                              "perf/images_per_s": rate * images_per_step})
          eta = (config.total_steps - step) / max(rate, 1e-9)
          _log(f"step {step}/{config.total_steps} loss "
               f"{metrics['train/loss']:.4f} | {rate:.2f} steps/s, "
               f"{rate * images_per_step:.1f} img/s | ETA {eta:.0f}s"
               + (f" | {skipped} updates skipped" if skipped else ""))
          t0, last = time.time(), step

        if save:
          checkpointing.save(mngr, step, state, data_iter, force=preempted,
                             config=saved_config)
        if preempted:
          mngr.wait_until_finished()
          _log(f"preemption notice: saved step {step}, stopping")
          raise preemption.Preempted(step, workdir)
        if config.eval_every and (step % config.eval_every == 0 or end):
          run_eval(step)
  finally:
    # Whatever stops the loop, a save in flight completes and the metrics
    # written so far are flushed: nothing already written is lost.
    mngr.wait_until_finished()
    writer.close()

  model.params = {"img": frozen, "head": state.params}
  return state, model
