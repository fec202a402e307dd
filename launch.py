"""The one entry point: parses flags and hands the config to the library.

  python launch.py --config configs/demo.py --workdir runs/demo --mode demo
  python launch.py --config configs/nearid_r7.py:CKPT --workdir W [--mode train]
  python launch.py --config configs/nearid_r7.py --mode prepare \
      --config.input.manual_dir=data/hf --config.input.data_dir=data/tfds
      modes: demo, prepare, cache, train, eval, export, sweep
  --config.FIELD=VALUE overrides any field; a misspelled one is an error.
  --verbosity=0 (or higher) shows the libraries' INFO logs and progress
  bars; by default only this project's progress lines and warnings show.
"""
import logging
import os
import shlex
import signal
import sys

from absl import app
from absl import flags
from absl import logging as absl_logging
from ml_collections import config_flags

from nearid_jax import signals
from nearid_jax.cpu import xla_flags
from nearid_jax.training.preemption import Preempted

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Run directory (the sweep root with --mode sweep); "
    "optional for --mode prepare when input.data_dir and input.manual_dir "
    "are set.")
_MODE = flags.DEFINE_enum(
    "mode", "train",
    ["demo", "prepare", "cache", "train", "eval", "export", "sweep"],
    "What to run.")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "Call jax.distributed.initialize() first (multi-"
    "host TPU slices and GPU clusters; it reads the cluster from the "
    "environment).")
flags.mark_flags_as_required(["config"])


def _quiet_console():
  """The libraries' logs (TFDS, orbax, grain: absl's; transformers') below
  ERROR and their progress bars off, unless the command line asked for a
  --verbosity. This project's own lines are prints and Python warnings."""
  if any(a.startswith(("--verbosity", "-v=", "--v=")) for a in sys.argv[1:]):
    return
  absl_logging.set_verbosity(absl_logging.WARNING)  # the root logger's level
  logging.getLogger("absl").setLevel(logging.ERROR)  # what libraries log
  os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
  os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  tfds.disable_progress_bar()


def main(argv):
  """Runs the mode; a stop notice (SIGTERM, Ctrl-C) ends it cleanly: exit 0
  for SIGTERM, 130 (the shell's Ctrl-C status) for SIGINT outside training,
  with the command that resumes or redoes it (nearid_jax/signals.py)."""
  signals.install()  # before anything is read or written
  rerun = f"run the same command: python {shlex.join(sys.argv)}"
  try:
    _run(argv)
  except signals.Interrupted as e:
    print(f"--mode {_MODE.value} stopped by {e.name} before it finished; "
          f"nothing half-written is kept. To finish it, {rerun}", flush=True)
    return 0 if e.signum == signal.SIGTERM else 130
  except KeyboardInterrupt:
    print(f"--mode {_MODE.value} stopped at once by a second Ctrl-C; "
          f"nothing saved since the last checkpoint. {rerun}", flush=True)
    return 130
  except Preempted as e:
    # A clean stop: the scheduler restarts the same command, which resumes.
    print(f"{e}: python {shlex.join(sys.argv)}", flush=True)
  return 0


def _run(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config, workdir = _CONFIG.value, _WORKDIR.value
  if workdir is None:
    if _MODE.value != "prepare":
      raise app.UsageError(f"--mode {_MODE.value} needs --workdir")
    unset = [f"--config.input.{k}" for k in ("manual_dir", "data_dir")
             if not config.input[k]]
    if unset:
      raise app.UsageError(f"--mode prepare without --workdir needs "
                           f"{' and '.join(unset)} (empty, they default to "
                           "the workdir's data/hf and data/tfds)")
  _quiet_console()
  # Before JAX starts its backend: XLA reads XLA_FLAGS once.
  xla_flags.add_defaults(os.environ)
  import jax  # pylint: disable=g-import-not-at-top
  if _DISTRIBUTED.value:
    jax.distributed.initialize()
    if jax.process_count() == 1:
      # JAX's preemption sync service took SIGTERM; with no other process
      # to agree with, ours is the one to hear it.
      signals.install([signal.SIGTERM])
  # Imported after flag parsing so that --help stays fast.
  from nearid_jax import tasks  # pylint: disable=g-import-not-at-top
  if _MODE.value == "sweep":
    tasks.sweep(config,
                config_flags.get_config_filename(flags.FLAGS["config"]),
                workdir)
  else:
    tasks.MODES[_MODE.value](config, workdir)


if __name__ == "__main__":
  app.run(main)
