"""A resumed run's config against the one its checkpoint was saved under.

Every field changes what is trained unless ALLOWED names it. On resume,
changes to those fields are refused (ConfigChanged lists each one, old ->
new) unless the new config sets `resume_with_changes`; the other changes
are logged. `config.json` is the config of the workdir's latest start; each
one it replaces is kept beside it as `config.<UTC time>.json`. Every
checkpoint holds the config it was saved under (checkpointing.save), which
is what readers build from (workdir.read_config).
"""
import datetime
import json
import os

import jax
import ml_collections

from nearid_jax import optim
from nearid_jax import workdir as workdir_lib

FLAG = "resume_with_changes"

# Fields that may change on resume ("x." covers x's subtree). Everything
# else (model, data and sources, batch, optimizer, lr and schedule, seed,
# loss, resolution, resize, ...) changes what is trained and is refused.
ALLOWED = (
    FLAG,
    "total_steps",  # extends or shortens the run; the lr schedule follows
    "log_every", "eval_every", "ckpt_every", "keep_ckpts",
    "eval.", "input.eval_sources", "export.",
    # Moved data; a build is checked against its inputs when it is read.
    "input.data_dir", "input.manual_dir", "input.rebuild",
    # Reader threads and buffers; not num_workers: grain's saved iterator
    # state is per worker process.
    "input.num_threads", "input.prefetch",
    # The frozen tower's tokens read from a cache (checked against the
    # tower and the data when read) instead of computed: a speed-up; the
    # cache holds them in bfloat16 (float8 is input.feature_cache_dtype,
    # refused). Whether `--mode cache` may replace another run's cache is
    # no part of training.
    "input.feature_cache", "input.feature_cache_overwrite",
    # The remedies after a stop: no step so far met a corrupt image or a
    # non-finite update.
    "input.skip_corrupt", "on_nonfinite",
    # The same math laid out or scheduled otherwise: only float rounding
    # differs (tests/test_train.py's sharded-vs-single-device test).
    "mesh", "model.kernels", "model.remat", "model.scan",
)


class ConfigChanged(ValueError):
  """A resume whose config changes what the run in the workdir trains."""


class _Absent:
  def __repr__(self):
    return "(absent)"


ABSENT = _Absent()


def as_json(config):
  """A ConfigDict as config.json holds it (tuples become lists)."""
  return json.loads(config.to_json_best_effort())


def flatten(tree, prefix=""):
  """{"a.b": value} of a nested dict; lists are values."""
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(flatten(value, f"{prefix}{key}."))
    else:
      out[prefix + key] = value
  return out


def changes(old, new):
  """-> [(field path, old value, new value)] of two JSON configs, sorted;
  ABSENT where one of them has no such field."""
  a, b = flatten(old), flatten(new)
  return [(p, a.get(p, ABSENT), b.get(p, ABSENT))
          for p in sorted(a.keys() | b.keys())
          if a.get(p, ABSENT) != b.get(p, ABSENT)]


def allowed(path):
  return any(path == a or (a.endswith(".") and path.startswith(a))
             for a in ALLOWED)


def _show(value):
  return repr(value) if value is ABSENT else json.dumps(value)


def _lines(diff):
  return "".join(f"\n  {p}: {_show(a)} -> {_show(b)}" for p, a, b in diff)


def _schedule_note(old, new, step):
  """The lr of the next step under the old and the recomputed schedule."""
  old_lr, new_lr = (float(optim.schedule(ml_collections.ConfigDict(c))(step))
                    for c in (old, new))
  return (f"\n  (the lr schedule is recomputed over total_steps="
          f"{new['total_steps']}: step {step + 1}'s lr {old_lr:.4g} -> "
          f"{new_lr:.4g})")


def _read(path):
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def _write(path, obj):
  tmp = path + ".tmp"  # replaced whole: another process never reads half
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2)
  os.replace(tmp, path)


def _keep_copy(workdir, old):
  stamp = datetime.datetime.now(datetime.timezone.utc).strftime(
      "%Y%m%dT%H%M%SZ")
  path, n = os.path.join(workdir, f"config.{stamp}.json"), 1
  while os.path.exists(path):
    path, n = os.path.join(workdir, f"config.{stamp}.{n}.json"), n + 1
  _write(path, old)
  return path


def check_and_record(config, workdir, mngr, log=print):
  """Refuses (ConfigChanged) or logs how `config` differs from the config of
  the newest checkpoint in `mngr`, then writes it as config.json.

  Checkpoints saved before configs travelled with them are compared with
  config.json. Without a checkpoint the run starts afresh: nothing is
  compared, a replaced config.json is kept as a dated copy.
  Returns the config as JSON (what checkpointing.save stores).
  """
  new = as_json(config)
  path = os.path.join(workdir, "config.json")
  previous = _read(path)
  step, saved = mngr.latest_step(), None
  if step is not None:
    # The newest checkpoint's config that reads (an unreadable checkpoint
    # is set aside by the restore that follows), else config.json.
    try:
      saved, read_step = workdir_lib.read_config_and_step(workdir)
    except FileNotFoundError:  # neither: nothing to compare with
      pass
    else:
      saved = as_json(saved)
      step = step if read_step is None else read_step
  if saved is not None:
    diff = changes(saved, new)
    refused = [d for d in diff if not allowed(d[0])]
    if refused and not config.get(FLAG):
      raise ConfigChanged(
          f"{workdir}: its checkpoint of step {step} was trained with "
          "another config; resuming would mix two runs. Changed fields that "
          f"change what is trained:{_lines(refused)}\nStart this config in "
          f"a new workdir, or continue this run with the new values: "
          f"--config.{FLAG}=True (the previous config is kept as "
          "config.<UTC time>.json).")
    if diff:
      note = (_schedule_note(saved, new, step)
              if any(p == "total_steps" for p, _, _ in diff) else "")
      how = f" (config.{FLAG})" if refused else ""
      log(f"resuming step {step} with a changed config{how}:"
          f"{_lines(diff)}{note}")
  if jax.process_index() == 0 and previous != new:
    if previous is not None:
      kept = _keep_copy(workdir, previous)
      log(f"config.json replaced; the previous one kept as {kept}"
          + ("" if step is not None else " (no checkpoint: a fresh start)"))
    _write(path, new)
  return new
