"""Resuming with another config; readers use the checkpoint's config;
TensorBoard shows each step once after a resume."""
import glob
import json
import math
import os
import shutil

import jax.numpy as jnp
import pytest

import tb_events
from conftest import save_siglip
from fake_data import FakeGroups
from nearid_jax import checkpointing
from nearid_jax import workdir as workdir_lib
from nearid_jax.model import NearID
from nearid_jax.training import config_drift
from nearid_jax.training import train
from nearid_jax.training.metric_writer import MetricWriter
from test_train import tiny_config


def base_config(**kw):
  # warmup 1 of 2 steps: the cosine part ends at step 2, so extending the
  # run changes the next step's lr (tested below).
  return tiny_config(**{"total_steps": 2, "warmup_steps": 1, **kw})


@pytest.fixture(scope="module")
def tower(tmp_path_factory):
  """A tiny SigLIP tower (64 px, patch 16) loaded without compiling."""
  return save_siglip(tmp_path_factory.mktemp("tower"), 3, name="p16")


def tower_config(tower, **kw):
  c = base_config(**kw)
  c.model.init, c.model.res = tower, 64
  return c


@pytest.fixture(scope="module")
def saved_run(tower, tmp_path_factory):
  """A workdir as a run of tower_config() leaves it at step 2 (the head
  untrained: the checks below read configs, not numbers)."""
  workdir = str(tmp_path_factory.mktemp("saved") / "run")
  config = tower_config(tower)
  train.check_config(config)  # as training does: resize from the tower
  os.makedirs(workdir)
  mngr = checkpointing.manager(workdir, async_save=False)
  saved = config_drift.check_and_record(config, workdir, mngr)
  state, _ = train.create_train_state(
      config, NearID.from_config(config).params["head"])
  checkpointing.save(mngr, 2, state.replace(step=jnp.array(2)),
                     config=saved)
  return workdir


@pytest.fixture
def run(saved_run, tmp_path):
  return str(shutil.copytree(saved_run, tmp_path / "run"))


def _config_json(workdir):
  with open(os.path.join(workdir, "config.json")) as f:
    return json.load(f)


def _kept(workdir):
  """The dated copies of replaced configs."""
  paths = sorted(glob.glob(os.path.join(workdir, "config.*.json")))
  return paths, [json.load(open(p)) for p in paths]


def _saved(workdir, step):
  return checkpointing.saved_config(checkpointing.manager(workdir), step)


def _resume(config, workdir, log):
  train.check_config(config)  # as training does: resize from the tower
  return config_drift.check_and_record(
      config, workdir, checkpointing.manager(workdir), log)


def test_changes_to_what_is_trained_are_refused_naming_each(tower, run):
  before = _config_json(run)
  config = tower_config(tower, lr=0.5, seed=3, log_every=2)
  config.input.batch_size = 16
  config.loss.temperature = 0.5
  config.model.res = 32  # input.res follows
  with pytest.raises(config_drift.ConfigChanged) as e:
    train.train_and_evaluate(config, run, data_iter=FakeGroups(16, 32))
  msg = str(e.value)
  assert msg.startswith(f"{run}: its checkpoint of step 2 was trained with "
                        "another config")
  for line in ("input.batch_size: 8 -> 16", "input.res: 64 -> 32",
               "loss.temperature: 0.07 -> 0.5", "lr: 0.01 -> 0.5",
               "model.res: 64 -> 32", "seed: 0 -> 3"):
    assert f"\n  {line}" in msg, (line, msg)
  assert "log_every" not in msg  # allowed: no reason to refuse
  assert "--config.resume_with_changes=True" in msg
  # Refused before anything was written.
  assert _config_json(run) == before and _kept(run) == ([], [])
  assert list(checkpointing.manager(run).all_steps()) == [2]


def test_with_the_flag_both_configs_are_kept(tower, run):
  old = _config_json(run)
  logged = []
  config = tower_config(tower, lr=0.5, resume_with_changes=True)
  new = _resume(config, run, logged.append)
  assert logged[0] == ("resuming step 2 with a changed config "
                       "(config.resume_with_changes):\n  lr: 0.01 -> 0.5\n"
                       "  resume_with_changes: false -> true")
  paths, kept = _kept(run)
  assert kept == [old] and _config_json(run) == new
  assert logged[1] == f"config.json replaced; the previous one kept as " \
                      f"{paths[0]}"
  assert new["lr"] == 0.5 and _saved(run, 2)["lr"] == 0.01


def test_cadence_and_longer_runs_are_allowed_and_logged(tower, run):
  old = _config_json(run)
  logged = []
  config = tower_config(tower, total_steps=3, log_every=2, keep_ckpts=2,
                        mesh=(("data", 4), ("fsdp", 2)))
  config.eval.batch_size = 16
  _resume(config, run, logged.append)
  # Old schedule (2 steps, warmup 1): step 3 is past the cosine's end, lr 0.
  # New (3 steps): halfway down the cosine from step 1 to 3.
  new_lr = 0.01 * 0.5 * (1 + math.cos(math.pi * 0.5))
  assert logged[0] == (
      "resuming step 2 with a changed config:\n"
      "  eval.batch_size: 64 -> 16\n  keep_ckpts: 3 -> 2\n"
      "  log_every: 1 -> 2\n"
      '  mesh: [["data", -1]] -> [["data", 4], ["fsdp", 2]]\n'
      "  total_steps: 2 -> 3\n"
      "  (the lr schedule is recomputed over total_steps=3: step 3's lr "
      f"0 -> {new_lr:.4g})")
  assert _kept(run)[1] == [old] and _config_json(run)["total_steps"] == 3


def test_readers_use_the_checkpoints_config_not_an_edited_one(run):
  path = os.path.join(run, "config.json")
  edited = _config_json(run)
  edited["model"]["res"] = edited["input"]["res"] = 32
  with open(path, "w") as f:
    json.dump(edited, f)
  assert workdir_lib.read_config(run).model.res == 64
  model = NearID.load(run)  # what export and eval build
  assert model.arch.image_size == 64 and model.step == 2


def test_an_unreadable_newest_config_is_compared_past(tower, run):
  """The resume compares with the newest checkpoint whose config reads
  (the restore then sets the unreadable one aside), not crash on it."""
  config = tower_config(tower)
  train.check_config(config)
  state, _ = train.create_train_state(
      config, NearID.from_config(config).params["head"])
  checkpointing.save(checkpointing.manager(run, async_save=False), 3,
                     state.replace(step=jnp.array(3)),
                     config=config_drift.as_json(config))
  with open(os.path.join(run, "checkpoints", "3", "config", "metadata"),
            "w") as f:
    f.write("{not json")
  with pytest.raises(config_drift.ConfigChanged,
                     match=r"its checkpoint of step 2 .*\n  lr: 0.01 -> 0.5"):
    _resume(tower_config(tower, lr=0.5), run, print)


@pytest.mark.slow  # three reads of the unreadable step, 1 s and 2 s apart
def test_a_reader_past_an_unreadable_checkpoint_of_another_config(tower, run):
  """The newest checkpoint (another config) cannot be read: the model of the
  newest config must not get the older checkpoint's head."""
  config = tower_config(tower)
  train.check_config(config)
  config.eval.batch_size = 16
  state, _ = train.create_train_state(
      config, NearID.from_config(config).params["head"])
  checkpointing.save(checkpointing.manager(run, async_save=False), 3,
                     state.replace(step=jnp.array(3)),
                     config=config_drift.as_json(config))
  shutil.rmtree(os.path.join(run, "checkpoints", "3", "state"))
  with pytest.raises(ValueError, match=r"checkpoint 2, the newest readable "
                     "one, was trained with another config"):
    NearID.load(run)


def test_checkpoints_without_a_config_fall_back_to_config_json(tower, run):
  """Workdirs written before configs were kept with checkpoints."""
  shutil.rmtree(os.path.join(run, "checkpoints", "2", "config"))
  assert _saved(run, 2) is None
  edited = _config_json(run)
  edited["eval"]["batch_size"] = 16
  with open(os.path.join(run, "config.json"), "w") as f:
    json.dump(edited, f)
  assert workdir_lib.read_config(run).eval.batch_size == 16
  # and a resume is compared with config.json
  with pytest.raises(config_drift.ConfigChanged, match=r"\n  lr: 0.01 -> 0.5"):
    _resume(tower_config(tower, lr=0.5), run, print)


def test_a_fresh_start_keeps_the_config_json_it_replaces(tower, tmp_path):
  """No checkpoint: nothing is mixed, nothing compared (e.g. a retry with a
  smaller batch after running out of memory); the old config is kept."""
  old = config_drift.as_json(tower_config(tower))
  with open(tmp_path / "config.json", "w") as f:
    json.dump(old, f)
  config = tower_config(tower)
  config.input.batch_size = 16
  logged = []
  new = _resume(config, str(tmp_path), logged.append)
  paths, kept = _kept(str(tmp_path))
  assert kept == [old] and _config_json(str(tmp_path)) == new
  assert logged == [f"config.json replaced; the previous one kept as "
                    f"{paths[0]} (no checkpoint: a fresh start)"]


def test_allowed_fields_are_fields():
  fields = config_drift.flatten(config_drift.as_json(tiny_config()))
  for path in config_drift.ALLOWED:
    assert any(f == path or f.startswith(path) for f in fields), path


def test_tensorboard_shows_each_step_once_after_a_resume(tmp_path):
  first = MetricWriter(str(tmp_path), resume_step=-1)  # a fresh start
  for step in range(6):
    first.write(step, {"train/loss": step})
  first.close()  # killed after step 5; the last checkpoint is of step 3
  resumed = MetricWriter(str(tmp_path), resume_step=3)
  for step in range(4, 8):
    resumed.write(step, {"train/loss": 10 + step})
  resumed.close()
  raw = tb_events.scalars(str(tmp_path), purge=False)["train/loss"]
  assert [s for s, _ in raw] == [0, 1, 2, 3, 4, 5, 4, 5, 6, 7]
  shown = tb_events.scalars(str(tmp_path))["train/loss"]
  assert shown == [(0, 0), (1, 1), (2, 2), (3, 3), (4, 14), (5, 15),
                   (6, 16), (7, 17)]
  rows = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
  assert [(r["step"], r["train/loss"]) for r in rows] == shown


# Slow: trains 4 steps in three starts (make test runs it).
@pytest.mark.slow
def test_a_run_resumed_with_changes_trains_each_part_as_configured(tmp_path):
  run = str(tmp_path / "run")

  def train_to(config):
    state, _ = train.train_and_evaluate(
        config, run, data_iter=FakeGroups(8, config.model.res))
    return int(state.step)

  assert train_to(base_config()) == 2
  with pytest.raises(config_drift.ConfigChanged, match="lr: 0.01 -> 0.5"):
    train_to(base_config(lr=0.5, total_steps=3))
  assert train_to(base_config(lr=0.5, total_steps=3,
                              resume_with_changes=True)) == 3
  # The config now in force needs no flag; extending the run needs none.
  assert train_to(base_config(lr=0.5, total_steps=4)) == 4
  assert [_saved(run, s)["lr"] for s in (2, 3, 4)] == [0.01, 0.5, 0.5]
  assert [c["lr"] for c in _kept(run)[1]] == [0.01, 0.5]
  assert _config_json(run)["total_steps"] == 4
  rows = [json.loads(l) for l in open(os.path.join(run, "metrics.jsonl"))]
  assert [r["step"] for r in rows] == [1, 2, 3, 4]
  # Peak 0.5 after 1 warmup step, cosine to 0 at total_steps: step 3 ran
  # halfway down to step 3 (total 3), step 4 two thirds down to step 4.
  want = [0.25 * (1 + math.cos(math.pi / 2)),
          0.25 * (1 + math.cos(math.pi * 2 / 3))]
  got = [r["train/lr"] for r in rows[2:]]
  assert got == pytest.approx(want, rel=1e-6)  # float32 cos: a few ulps
  assert [s for s, _ in tb_events.scalars(run)["train/loss"]] == [1, 2, 3, 4]
