"""The one entry point: parses flags and hands the config to the library.

  python launch.py --config configs/demo.py --workdir runs/demo --mode demo
"""
from absl import app
from absl import flags
from ml_collections import config_flags

from nearid_jax import demo

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory.")
_MODE = flags.DEFINE_enum("mode", "demo", ["demo"], "What to run.")
flags.mark_flags_as_required(["config", "workdir"])

MODES = {"demo": demo.run}


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  MODES[_MODE.value](_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  app.run(main)
