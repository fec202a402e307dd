"""The sharded train step, the frozen tower, resume, and config refusals."""
import jax
import numpy as np
import pytest

import tb_events
from configs.common import training_config
from fake_data import FakeGroups
from input_pipeline import DataError
from nearid_jax import sharding
from nearid_jax.model import NearID
from nearid_jax.training import train


def tiny_config(**kw):
  c = training_config()
  c.model.variant, c.model.res, c.model.scan = "pico/8", 16, False
  c.input.batch_size = 8
  c.total_steps, c.warmup_steps = 6, 2
  c.lr = 1e-2  # large enough that 3 steps move the head measurably
  c.log_every, c.ckpt_every, c.eval_every = 1, 1, 0
  c.update(kw)
  return c


def run_steps(config, mesh_spec, devices, n=3):
  mesh = sharding.make_mesh(mesh_spec, devices)
  _, frozen, state, step = train.setup(config, mesh)
  data = FakeGroups(config.input.batch_size, config.model.res)
  for _ in range(n):
    state, metrics = step(frozen, state, sharding.global_batch(next(data),
                                                               mesh))
  return jax.device_get(state.params), jax.device_get(metrics)


def scan_config(scan):
  c = tiny_config()
  c.model.scan = scan
  return c


@pytest.fixture(scope="module")
def single_device_runs():
  """scan -> the 1-device run, made on first use."""
  runs = {}

  def run(scan):
    if scan not in runs:
      runs[scan] = run_steps(scan_config(scan), [("data", 1)],
                             jax.devices()[:1])
    return runs[scan]
  return run


# FSDP both ways: each block's weights gathered in the unrolled tower, and
# once per step of the scan in the scanned one (tests/test_sharding.py reads
# the scanned step's collectives).
# Slow: trains on three meshes and one device (make test runs it).
@pytest.mark.slow
@pytest.mark.parametrize("mesh_spec,scan", [
    ([("data", 8), ("fsdp", 1)], False),
    ([("data", 4), ("fsdp", 2)], False),
    ([("data", 2), ("fsdp", 4)], True)])
def test_sharded_step_equals_single_device(single_device_runs, mesh_spec,
                                           scan):
  assert len(jax.devices()) == 8
  want, want_metrics = single_device_runs(scan)
  got, metrics = run_steps(scan_config(scan), mesh_spec, jax.devices())
  # The attention key bias has an exactly zero gradient (softmax over keys
  # ignores a constant per query), so Adam scales reduction-order noise up to
  # lr-sized steps there: it agrees only to ~lr * 0.1. Every other leaf 1e-5.
  key_bias = ("MultiHeadDotProductAttention_0", "key", "bias")
  for path, a in jax.tree_util.tree_flatten_with_path(got)[0]:
    names = tuple(p.key for p in path)
    b = want
    for n in names:
      b = b[n]
    tol = 1e-3 if names[-3:] == key_bias else 1e-5
    np.testing.assert_allclose(a, b, atol=tol, rtol=1e-5, err_msg=str(names))
  np.testing.assert_allclose(metrics["train/loss"], want_metrics["train/loss"],
                             rtol=1e-5)
  # the head moved: equality above is not between two untouched copies
  init = NearID.from_config(tiny_config()).params["head"]
  moved = max(float(np.abs(a - b).max()) for a, b in zip(
      jax.tree.leaves(got), jax.tree.leaves(init)))
  assert moved > 1e-3


def test_only_the_head_is_optimised():
  config = tiny_config()
  model = NearID.from_config(config)
  state, _ = train.create_train_state(config, model.params["head"])
  n_head = sum(x.size for x in jax.tree.leaves(model.params["head"]))
  n_tower = sum(x.size for x in jax.tree.leaves(model.params["img"]))
  # AdamW keeps two moments per head parameter, nothing for the tower.
  n_opt = sum(x.size for x in jax.tree.leaves(state.opt_state)
              if x.ndim > 0)
  assert n_opt == 2 * n_head and n_tower > n_head

  # and no gradient reaches the tower through the public forward
  from nearid_jax.model import forward  # pylint: disable=g-import-not-at-top
  x = np.random.default_rng(0).uniform(-1, 1, (2, 16, 16, 3)).astype(
      np.float32)
  g = jax.jit(jax.grad(lambda img: forward(
      model.tower, model.head, {"img": img, "head": model.params["head"]},
      x).sum()))(model.params["img"])
  assert all(float(np.abs(leaf).max()) == 0 for leaf in jax.tree.leaves(g))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  config = tiny_config(ckpt_every=3)
  full, _ = train.train_and_evaluate(
      config, str(tmp_path_factory.mktemp("full")),
      data_iter=FakeGroups(8, config.model.res))
  return jax.device_get(full.params)


@pytest.mark.slow
@pytest.mark.parametrize("fault", [KeyboardInterrupt, DataError])
def test_resume_gives_the_uninterrupted_result(uninterrupted, tmp_path,
                                               fault):
  config = tiny_config(ckpt_every=3)  # the fault comes after step 3's save
  # A stop (Ctrl-C) or a data fault out of the iterator after step 3's
  # (async) checkpoint: the save completes, nothing written is lost.
  with pytest.raises(fault, match="simulated fault before batch 3"):
    train.train_and_evaluate(config, str(tmp_path / "cut"),
                             data_iter=FakeGroups(8, config.model.res,
                                                  fail_at=3, fail_with=fault))
  resumed, _ = train.train_and_evaluate(
      config, str(tmp_path / "cut"), data_iter=FakeGroups(8, config.model.res))
  assert int(resumed.step) == 6
  # Same programs on the same data: bitwise equal.
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(resumed.params),
               uninterrupted)
  lines = (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()
  assert [__import__("json").loads(l)["step"] for l in lines] == [1, 2, 3, 4,
                                                                  5, 6]
  shown = tb_events.scalars(str(tmp_path / "cut"))["train/loss"]
  assert [s for s, _ in shown] == [1, 2, 3, 4, 5, 6]


@pytest.mark.parametrize("mesh,batch,match", [
    ([("data", 3)], 9, r"config.mesh=\[\('data', 3\)\] does not divide the 8"),
    ([("data", -1), ("fsdp", 3)], 8, "does not divide the 8 devices"),
    # 12 splits over 'data' alone; the batch is split over both axes
    ([("data", 2), ("fsdp", 4)], 12, r"input.batch_size=12 is not divisible "
     r"by the 8-way batch split \(mesh axes \('data', 'fsdp'\)\)"),
    ([("data", 4), ("model", 2)], 8, r"unknown axes \['model'\]; the axes "
     "are 'data' and optionally 'fsdp'"),
    ([("batch", -1)], 8, "needs distinct axis names and a 'data' axis"),
])
def test_bad_mesh_or_batch_refused_before_compute(mesh, batch, match):
  config = tiny_config(mesh=mesh)
  config.input.batch_size = batch
  with pytest.raises(ValueError, match=match):
    train.check_config(config)


@pytest.mark.parametrize("change,match", [
    (dict(res=18), r"model.res=18 is not a multiple of the patch size 8 "
     r"\(the last 2 pixels"),
    (dict(variant="B/14", res=380), "model.res=380 is not a multiple"),
])
def test_resolution_that_drops_pixels_refused_before_compute(change, match):
  config = tiny_config()
  config.model.update(change)
  with pytest.raises(ValueError, match=match):
    train.check_config(config)


def test_released_resolutions_that_drop_pixels_are_allowed():
  # So400m/14@384: 27x27 patches, 6 px dropped, as released.
  config = tiny_config()
  config.model.variant, config.model.res = "So400m/14", 384
  train.check_config(config)


@pytest.mark.parametrize("key,value,match", [
    ("on_nonfinite", "ignore", "on_nonfinite='ignore': one of"),
    ("ckpt_every", 0, "ckpt_every=0 must be positive"),
])
def test_bad_policy_values_refused(key, value, match):
  with pytest.raises(ValueError, match=match):
    train.check_config(tiny_config(**{key: value}))
