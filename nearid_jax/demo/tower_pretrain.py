"""The demo's "pretrained" tower: a short self-supervised warm-up, then frozen.

No SigLIP2 weights can be downloaded for the embedded demo, and a frozen
random tower caps the trained head near 50% SSR (docs/demo.md). So the demo makes
its own small pretrained checkpoint, once, the way a foundation model is
made before NearID freezes it: on other data, with other objectives.

  data        synthetic identities from their own random stream (not the
              dataset's), so none is in any split the head trains or is
              evaluated on. A group: 2 identities x 2 backgrounds = 4
              scenes, each object in its own pose; each scene shot twice
              (object nudged, light changed). No near-identity distractors.
  objectives  InfoNCE (losses.info_nce) on two heads over one tower:
              scene: the MAP head, saved with the tower. A scene's other shot
                is its positive; every other scene of the batch a negative,
                including its own object on the other background and
                another object on its background. Like a web image-text
                model, it must tell scenes apart by object *and* context.
              object: an auxiliary MAP head, dropped afterwards (as
                SigLIP2's decoder heads are). The object's 3 other images
                are its positives: the tower learns what stays the same
                when the background changes.
  trained     everything (no stop_gradient): tower and both heads
  output      a big_vision image-tower .npz (tower + scene MAP head), loaded
              like a released SigLIP2 file through config.model.init

The saved head is context-bound: it scores a distractor on the anchor's own
background above the anchor's object elsewhere, so the frozen baseline stays
low, as SigLIP2's does on NearID; the tower's tokens carry the object cues
that NearID's training then teaches the head to pool.
"""
import dataclasses
import functools
import itertools
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from input_pipeline import preprocess
from input_pipeline import synthetic
from nearid_jax import kernels as kernels_lib
from nearid_jax import losses
from nearid_jax import optim
from nearid_jax import vit
from nearid_jax.cpu import xla_flags
from nearid_jax.formats import bigvision
from nearid_jax.formats import common

# Mixed into the pool's seed: its stream is not the dataset's
# (synthetic.generate draws from default_rng(seed)).
_POOL_STREAM = 0x7072657472
SCENES = 4  # per group: 2 identities x 2 backgrounds, object-major
SHOTS = 2


def _shot(view, rng):
  """The same scene photographed again: object nudged, light changed."""
  r = view.radius
  return dataclasses.replace(
      view, cx=view.cx + rng.uniform(-0.1, 0.1) * r,
      cy=view.cy + rng.uniform(-0.1, 0.1) * r,
      radius=r * rng.uniform(0.95, 1.05),
      rot=view.rot + rng.uniform(-0.15, 0.15),
      gain=view.gain + rng.uniform(-0.05, 0.05))


def render_pool(num_groups, image_res, res, seed, resize="pil"):
  """-> uint8 (num_groups, SCENES, SHOTS, res, res, 3), as the model sees it.

  Scene s of a group shows object s // 2 on background s % 2.
  """
  rng = np.random.default_rng([seed, _POOL_STREAM])
  out = np.empty((num_groups, SCENES, SHOTS, res, res, 3), np.uint8)
  for g in range(num_groups):
    objects = [synthetic.sample_identity(rng) for _ in range(2)]
    backgrounds = [synthetic.background(rng, image_res) for _ in range(2)]
    for s, (parts, bg) in enumerate(itertools.product(objects, backgrounds)):
      view = dataclasses.replace(synthetic.sample_view(rng, image_res),
                                 background=bg)
      for k in range(SHOTS):
        img, _ = synthetic.render(parts, _shot(view, rng))
        out[g, s, k] = preprocess.resize_uint8(img, res, resize)
  return out


def objective(tower, head, params, images, temperature, object_weight):
  """images (G, SCENES, SHOTS, R, R, 3) -> (loss, aux scalars).

  params: {"img", "head"} and, when object_weight, "object_head".
  """
  g = images.shape[0]
  x = preprocess.scale(images.reshape((-1,) + images.shape[3:]))
  tokens = tower.apply({"params": params["img"]}, x)
  # Scenes: shot 0 anchors, shot 1 is the positive.
  emb = head.apply({"params": params["head"]}, tokens)
  emb = emb.reshape(g * SCENES, SHOTS, -1)
  loss, aux = losses.info_nce(emb[:, 0], emb[:, 1:], emb[:, :0],
                              temperature=temperature)
  aux = {"scene_loss": loss, "scene_acc": aux["tier1_acc"]}
  if object_weight:
    # Objects: their first image anchors, the 3 others are positives.
    emb = head.apply({"params": params["object_head"]}, tokens)
    emb = emb.reshape(g * 2, 2 * SHOTS, -1)
    obj, obj_aux = losses.info_nce(emb[:, 0], emb[:, 1:], emb[:, :0],
                                   temperature=temperature)
    loss = loss + object_weight * obj
    aux.update(object_loss=obj, object_acc=obj_aux["tier1_acc"])
  return loss, aux


@functools.lru_cache
def _init_fn(arch, object_head):
  def init(key):
    k_img, k_head, k_object = jax.random.split(key, 3)
    images = jnp.zeros((1, arch.image_size, arch.image_size, 3))
    tokens = jnp.zeros((1, arch.num_patches, arch.width))
    head = vit.NearIDHead(arch)
    params = {"img": vit.VisionTower(arch).init(k_img, images)["params"],
              "head": head.init(k_head, tokens)["params"]}
    if object_head:
      params["object_head"] = head.init(k_object, tokens)["params"]
    return params
  return jax.jit(init)  # compiled once per shape, whatever the seed


def init_params(arch, seed, object_head):
  """Fresh tower + MAP head ({"img", "head"}) and the auxiliary object head."""
  return _init_fn(arch, object_head)(jax.random.PRNGKey(seed))


def pretrain(arch, pool, cfg, seed, log=print, kernels="auto"):
  """Trains on `pool` -> (canonical flat float32 tower + MAP head, history).

  cfg (config.demo.pretrain): total_steps, batch_size (groups), lr, wd,
  warmup_steps, grad_clip_norm (optim.make's fields), temperature,
  object_weight, log_every. history: [(step, loss, {aux})] every log_every.
  """
  if cfg.batch_size > len(pool):
    raise ValueError(f"demo.pretrain.batch_size={cfg.batch_size} groups: the "
                     f"pool has only {len(pool)} (demo.pretrain.groups)")
  k = kernels_lib.kernels(kernels)
  tower = vit.VisionTower(arch, kernels=k)
  head = vit.NearIDHead(arch, kernels=k)
  params = init_params(arch, seed, bool(cfg.object_weight))
  tx = optim.make(cfg)
  opt_state = tx.init(params)

  def loss_fn(params, images):
    return objective(tower, head, params, images, cfg.temperature,
                     cfg.object_weight)

  @functools.partial(jax.jit,
                     compiler_options=xla_flags.tower_options(arch))
  def step(params, opt_state, images):
    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params,
                                                                  images)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss, aux

  rng = np.random.default_rng(seed)
  history, t0 = [], time.time()
  for i in range(1, cfg.total_steps + 1):
    batch = pool[rng.choice(len(pool), cfg.batch_size, replace=False)]
    swap = rng.random(batch.shape[:2]) < 0.5  # which shot anchors
    batch[swap] = batch[swap][:, ::-1]
    params, opt_state, loss, aux = step(params, opt_state, batch)
    if i % cfg.log_every == 0 or i == cfg.total_steps:
      loss, aux = float(loss), {k: float(v) for k, v in aux.items()}
      if not np.isfinite(loss):
        raise FloatingPointError(f"tower pretraining step {i}: loss {loss}")
      history.append((i, loss, aux))
      log(f"pretrain step {i}/{cfg.total_steps} loss {loss:.4f} ("
          + ", ".join(f"{k} {v:.3f}" for k, v in sorted(aux.items()))
          + f") | {i / (time.time() - t0):.2f} steps/s")
  flat = {**common.flatten(jax.device_get(params["img"])),
          **common.flatten(jax.device_get(params["head"]))}
  return {k: np.asarray(v, np.float32) for k, v in flat.items()}, history


def make(path, arch, cfg, seed, resize="pil", log=print, kernels="auto"):
  """Renders the pool, pretrains, saves the .npz -> (flat params, history)."""
  t0 = time.time()
  pool = render_pool(cfg.groups, cfg.image_res, arch.image_size, seed, resize)
  log(f"pretraining pool: {cfg.groups} groups of 2 identities x 2 "
      f"backgrounds x {SHOTS} shots ({time.time() - t0:.0f}s)")
  flat, history = pretrain(arch, pool, cfg, seed, log, kernels)
  bigvision.save(path, flat, two_tower=False)
  return flat, history
