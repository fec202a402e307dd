"""nearid_jax's XLA:CPU settings: one explicit call, never over the user's;
importing nearid_jax changes nothing."""
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

import configs.demo
from nearid_jax.training import train
from nearid_jax import vit
from nearid_jax.cpu import xla_flags

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_FLAG = "--xla_cpu_experimental_ynn_fusion_type="
_WIDTH = "--xla_cpu_prefer_vector_width=512"
_PICO = vit.Arch.from_variant("pico/8@48")


def test_defaults_are_appended_and_user_flags_kept():
  env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
  xla_flags.add_defaults(env)
  assert env["XLA_FLAGS"] == ("--xla_force_host_platform_device_count=8 "
                              f"{_FLAG} {_WIDTH}")
  xla_flags.add_defaults(env)  # idempotent
  assert env["XLA_FLAGS"].count("ynn_fusion_type") == 1
  assert env["XLA_FLAGS"].count("vector_width") == 1

  mine = {"XLA_FLAGS": f"{_FLAG}eltwise --xla_cpu_prefer_vector_width=256"}
  xla_flags.add_defaults(mine)
  assert mine["XLA_FLAGS"] == f"{_FLAG}eltwise --xla_cpu_prefer_vector_width=256"

  theirs = {"XLA_FLAGS": _FLAG + "eltwise"}
  xla_flags.add_defaults(theirs)
  assert theirs["XLA_FLAGS"] == f"{_FLAG}eltwise {_WIDTH}"

  empty = {}
  xla_flags.add_defaults(empty)
  assert empty["XLA_FLAGS"] == f"{_FLAG} {_WIDTH}"

  off = {"NEARID_XLA_DEFAULTS": "0", "XLA_FLAGS": "--xla_dump_to=/tmp/x"}
  xla_flags.add_defaults(off)
  assert off["XLA_FLAGS"] == "--xla_dump_to=/tmp/x"


def test_tower_options_only_for_narrow_towers_and_never_over_the_user():
  ynn_dots = {"xla_cpu_experimental_ynn_fusion_type":
              "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"}
  ours = {"XLA_FLAGS": _FLAG}
  assert xla_flags.tower_options(_PICO, ours) == ynn_dots
  assert xla_flags.tower_options(vit.Arch.from_variant("B/16@224"),
                                 ours) is None
  assert xla_flags.tower_options(_PICO, {"XLA_FLAGS": _FLAG + "dot"}) is None
  assert xla_flags.tower_options(
      _PICO, {"XLA_FLAGS": _FLAG, "NEARID_XLA_DEFAULTS": "0"}) is None
  assert xla_flags.ynn_dots(ours) == ynn_dots  # any width: the retrieval's


def test_jit_ynn_dots_compiles_at_the_first_call_with_ynnpack_dots():
  calls = []

  @xla_flags.jit_ynn_dots(static_argnames=("k",))
  def f(x, *, k):
    calls.append(k)  # traced once per static k
    return jax.nn.softmax(x @ x.T) * k

  x = jnp.ones((64, 64))
  assert float(f(x, k=2)[0, 0]) == 2 / 64 and f(x, k=2).shape == (64, 64)
  assert calls == [2]  # jitted: the second call did not trace again
  assert f.__name__ == "f"


_PROBE = """
import os, sys
import jax, jax.numpy as jnp
before = dict(os.environ)
import nearid_jax, nearid_jax.cpu.xla_flags, nearid_jax.model
import input_pipeline, nearid_jax.training.train, nearid_jax.tasks
assert dict(os.environ) == before, "importing nearid_jax changed os.environ"
if sys.argv[1] == "defaults":
  nearid_jax.cpu.xla_flags.add_defaults()
txt = jax.jit(lambda x: jax.nn.softmax(x @ x) * 3).lower(
    jnp.ones((64, 64))).compile().as_text()
print(txt.count('"kind":"__ynn_fusion"'))
"""


def _ynn_fusions(mode):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env["PYTHONPATH"] = _ROOT
  out = subprocess.run([sys.executable, "-c", _PROBE, mode], env=env,
                       check=True, capture_output=True, text=True)
  return int(out.stdout)


@pytest.mark.slow
def test_import_changes_nothing_and_add_defaults_turns_ynnpack_fusions_off():
  # jaxlib's default puts the dot and the softmax in a YNNPACK subgraph;
  # importing nearid_jax leaves it so (and os.environ as it was).
  assert _ynn_fusions("import") >= 1
  assert _ynn_fusions("defaults") == 0


def _compiled_ynn_fusions(variant, res):
  """YNNPACK fusions in the compiled train step of a random `variant` tower
  (its blocks scanned: one to compile, the options are per tower width)."""
  config = configs.demo.get_config()
  config.model.variant, config.model.res = variant, res
  config.model.scan = True
  config.input.batch_size = 8
  mesh = train.check_config(config)
  _, frozen, state, step = train.setup(config, mesh)
  b = config.input.batch_size
  batch = {"views": jnp.zeros((b, 3, res, res, 3), jnp.uint8),
           "view_mask": jnp.ones((b, 3), bool),
           "distractors": jnp.zeros((b, 3, res, res, 3), jnp.uint8),
           "distractor_mask": jnp.ones((b, 3), bool)}
  txt = step.lower(frozen, state, batch).compile().as_text()
  return txt.count('"kind":"__ynn_fusion"')


@pytest.mark.slow
@pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA:CPU only")
def test_only_a_pico_towers_train_step_takes_ynnpack_dots():
  assert _compiled_ynn_fusions("pico/8", 48) > 0
  assert _compiled_ynn_fusions("Ti/16", 32) == 0
