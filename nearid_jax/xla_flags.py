"""The XLA:CPU settings nearid_jax runs with.

jaxlib 0.10.2's CPU compiler hands elementwise ops, reductions and dots to
YNNPACK subgraphs by default. Around a ViT block's dots those subgraphs
materialise broadcast constants and run slower than XLA's own loop emitters
and Eigen's matmuls, so nearid_jax turns them off process-wide (DEFAULTS,
added to XLA_FLAGS when nearid_jax is imported). One exception, per jit: on
the tiny dots of the narrowest towers (head_dim 16, 36 tokens: the demo's
pico tower) YNNPACK's dot kernels are about twice as fast as Eigen's, so
computations running such a tower ask for them (tower_options). Measured
forwards and train steps, both settings in one process, on 2 cores
(benchmarks/README.md): So400m/14@384 and Ti/16@224 ~30% faster than with
YNNPACK dots, B/16@224 equal, the pico demo step ~20% slower.

XLA reads XLA_FLAGS once, when JAX starts its backend: import nearid_jax
before running any JAX code for the defaults to apply. A flag the user
already put in XLA_FLAGS is left as it is; NEARID_XLA_DEFAULTS=0 in the
environment leaves XLA_FLAGS and every jit to jaxlib's defaults. On TPU and
GPU neither setting applies.
"""
import os

import jax

_YNN = "xla_cpu_experimental_ynn_fusion_type"
DEFAULTS = {_YNN: ""}  # no YNNPACK fusions
# Towers up to this wide get YNNPACK's dot kernels (only dots, each alone).
YNN_DOTS_MAX_WIDTH = 64


def _given(environ):
  """{flag name: value} of environ["XLA_FLAGS"] (the last one wins)."""
  pairs = (f.lstrip("-").partition("=")
           for f in environ.get("XLA_FLAGS", "").split())
  return {name: value for name, _, value in pairs}


def _enabled(environ):
  return environ.get("NEARID_XLA_DEFAULTS", "1") != "0"


def add_defaults(environ=os.environ):
  """Appends DEFAULTS to environ["XLA_FLAGS"], except names already there."""
  if not _enabled(environ):
    return
  given = _given(environ)
  extra = [f"--{k}={v}" for k, v in DEFAULTS.items() if k not in given]
  if extra:
    environ["XLA_FLAGS"] = " ".join(
        [environ.get("XLA_FLAGS", ""), *extra]).strip()


def tower_options(arch, environ=os.environ):
  """jax.jit compiler_options for computations that run `arch`'s tower.

  None (XLA_FLAGS decides) off the CPU, for towers wider than
  YNN_DOTS_MAX_WIDTH, when the user's XLA_FLAGS chose YNNPACK fusions and
  with NEARID_XLA_DEFAULTS=0.
  """
  if (not _enabled(environ) or arch.width > YNN_DOTS_MAX_WIDTH
      or _given(environ).get(_YNN, DEFAULTS[_YNN]) != DEFAULTS[_YNN]
      or jax.default_backend() != "cpu"):
    return None
  return {_YNN: "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"}
