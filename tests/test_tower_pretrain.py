"""The demo tower's warm-up: its pool, its objective, the saved checkpoint."""
import functools

import jax
import ml_collections
import numpy as np
import pytest
from scipy.special import logsumexp

from nearid_jax import model as model_lib
from nearid_jax.demo import tower_pretrain as tp
from nearid_jax import vit
from nearid_jax.formats.common import flatten
from nearid_jax.model import NearID

ARCH = vit.Arch.from_variant("mu/8", 24)


def _cfg(**kw):
  cfg = dict(total_steps=40, batch_size=4, lr=3e-3, wd=0.0, warmup_steps=5,
             grad_clip_norm=1.0, temperature=0.1, object_weight=1.0,
             log_every=1)
  return ml_collections.ConfigDict({**cfg, **kw})


def test_pool_groups_share_objects_and_backgrounds_as_documented():
  pool = tp.render_pool(3, 24, 24, seed=0)  # no resize: pixels stay exact
  assert pool.shape == (3, tp.SCENES, tp.SHOTS, 24, 24, 3)
  same = lambda a, b: np.mean(np.all(a == b, axis=-1))
  for g in pool:
    # Scene s = object s // 2 on background s % 2: scenes 0 and 2 share the
    # background (most pixels equal), scenes 0 and 1 do not (grey noise).
    assert same(g[0, 0], g[2, 0]) > 0.4 and same(g[1, 0], g[3, 0]) > 0.4
    assert same(g[0, 0], g[1, 0]) < 0.05
    # Two shots of one scene: same background, the object moved.
    assert 0.4 < same(g[0, 0], g[0, 1]) < 1.0
  # Its own random stream: another seed gives other scenes.
  assert same(pool[0, 0, 0], tp.render_pool(1, 24, 24, seed=1)[0, 0, 0]) < 0.05


def _info_nce(anchor, positives, tau):
  """Multi-positive InfoNCE, plain numpy: anchor (B, D), positives (B, P, D)."""
  b, p, d = positives.shape
  logits = anchor @ positives.reshape(b * p, d).T / tau  # (B, B*P)
  own = logits[np.arange(b)[:, None], np.arange(b * p).reshape(b, p)]
  return np.mean(logsumexp(logits, axis=1)[:, None] - own)


@pytest.mark.slow
def test_objective_matches_numpy_infonce_on_scenes_and_objects():
  params = tp.init_params(ARCH, 0, object_head=True)
  images = np.random.default_rng(0).integers(
      0, 256, (2, tp.SCENES, tp.SHOTS, 24, 24, 3), np.uint8)
  tower, head = vit.VisionTower(ARCH), vit.NearIDHead(ARCH)
  objective = jax.jit(functools.partial(tp.objective, tower, head),
                      static_argnums=(2, 3))
  loss, aux = objective(params, images, 0.1, 0.5)

  x = images.reshape(-1, 24, 24, 3).astype(np.float32) / 127.5 - 1
  forward = jax.jit(functools.partial(model_lib.forward, tower, head))
  def emb(h):  # (G, 4 scenes, 2 shots, D), unit norm
    e = forward({"img": params["img"], "head": h}, x)
    return np.asarray(e, np.float64).reshape(2, 4, 2, -1)
  s = emb(params["head"]).reshape(8, 2, -1)
  want_scene = _info_nce(s[:, 0], s[:, 1:], 0.1)
  # Object o of a group: scenes 2o and 2o + 1, both shots.
  o = emb(params["object_head"]).reshape(4, 4, -1)
  want_object = _info_nce(o[:, 0], o[:, 1:], 0.1)
  np.testing.assert_allclose(aux["scene_loss"], want_scene, rtol=1e-5)
  np.testing.assert_allclose(aux["object_loss"], want_object, rtol=1e-5)
  np.testing.assert_allclose(loss, want_scene + 0.5 * want_object, rtol=1e-5)

  loss, aux = objective(params, images, 0.1, 0.0)
  assert "object_loss" not in aux
  np.testing.assert_allclose(loss, want_scene, rtol=1e-5)


@pytest.mark.slow
def test_pretraining_trains_the_tower_and_saves_what_nearid_loads(tmp_path):
  path = str(tmp_path / "mu8_24.npz")
  cfg = _cfg(groups=6, image_res=24)
  flat, history = tp.make(path, ARCH, cfg, seed=0, log=lambda _: None)
  losses = [loss for _, loss, _ in history]
  assert len(losses) == cfg.total_steps
  assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5])
  # Every tensor moved: nothing of the tower was frozen during the warm-up.
  # But the MAP head's key bias: a constant per query, it drops out of the
  # softmax, so its gradient is exactly zero (vit.ProbeAttention) and it
  # keeps its initial zeros.
  init = tp.init_params(ARCH, 0, object_head=True)
  start = {**flatten(init["img"]), **flatten(init["head"])}
  assert sorted(flat) == sorted(start)  # tower + MAP head, no auxiliary head
  key_bias = "MAPHead_0/MultiHeadDotProductAttention_0/key/bias"
  np.testing.assert_array_equal(flat[key_bias], start[key_bias])
  for k in flat:
    if k != key_bias:
      assert not np.allclose(flat[k], start[k]), k

  model = NearID.load(path)
  assert model.arch == ARCH
  loaded = model.flat_params()
  for k in flat:
    np.testing.assert_array_equal(loaded[k], flat[k], err_msg=k)
  images = np.random.default_rng(1).integers(0, 256, (3, 24, 24, 3), np.uint8)
  params = model_lib.split_params(flat, ARCH, scan=False)
  want = model_lib.forward(vit.VisionTower(ARCH), vit.NearIDHead(ARCH),
                           params, images.astype(np.float32) / 127.5 - 1)
  # The plain kernels, op by op, against the model's jit (the CPU's kernels
  # on the CPU): float32 rounding of unit vectors through two blocks.
  np.testing.assert_allclose(model.embed(images), want, atol=1e-5)


def test_a_batch_larger_than_the_pool_is_refused():
  with pytest.raises(ValueError, match="batch_size=4 groups: the pool has "
                     "only 2"):
    tp.pretrain(ARCH, tp.render_pool(2, 24, 24, 0), _cfg(), seed=0)
