"""The one entry point: parses flags and hands the config to the library.

  python launch.py --config configs/demo.py --workdir runs/demo --mode demo
  python launch.py --config configs/nearid_r7.py:CKPT --workdir W [--mode train]
      modes: demo, prepare, cache, train, eval, export, sweep
  --config.FIELD=VALUE overrides any field; a misspelled one is an error.
"""
from absl import app
from absl import flags
import jax
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (the sweep "
                               "root with --mode sweep).")
_MODE = flags.DEFINE_enum(
    "mode", "train",
    ["demo", "prepare", "cache", "train", "eval", "export", "sweep"],
    "What to run.")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "Call jax.distributed.initialize() first (multi-"
    "host TPU slices and GPU clusters; it reads the cluster from the "
    "environment).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if _DISTRIBUTED.value:
    jax.distributed.initialize()
  # Imported after flag parsing so that --help stays fast.
  from nearid_jax import tasks  # pylint: disable=g-import-not-at-top
  config, workdir = _CONFIG.value, _WORKDIR.value
  from nearid_jax.preemption import Preempted  # pylint: disable=g-import-not-at-top
  try:
    if _MODE.value == "sweep":
      tasks.sweep(config,
                  config_flags.get_config_filename(flags.FLAGS["config"]),
                  workdir)
    else:
      tasks.MODES[_MODE.value](config, workdir)
  except Preempted as e:
    # A clean stop: the scheduler restarts the same command, which resumes.
    print(e, flush=True)


if __name__ == "__main__":
  app.run(main)
