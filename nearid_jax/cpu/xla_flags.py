"""The XLA:CPU settings nearid_jax runs with (docs/benchmarks.md has the
measurements behind each).

jaxlib's CPU compiler hands elementwise ops, reductions and dots to YNNPACK
subgraphs by default; around a ViT block's dots those run slower than XLA's
own loops and Eigen's matmuls, so `add_defaults` turns them off. One
exception, per jit: on the tiny dots of the narrowest towers (the demo's)
YNNPACK's dot kernels are faster than Eigen's, so computations running such
a tower ask for them (tower_options), and so do the retrieval kernels.
`add_defaults` also asks for 512-bit vectors in XLA's own loops (jaxlib
asks LLVM for 256); a CPU without AVX-512 keeps its own, narrower ones.

Nothing happens at import. XLA reads XLA_FLAGS once, when JAX starts its
backend, so the entry points (launch.py, the benchmarks, the tests) call
add_defaults() before running JAX code; a library user may call it too. A
flag the user already put in XLA_FLAGS is left as it is, and
NEARID_XLA_DEFAULTS=0 leaves XLA_FLAGS and every jit to jaxlib's defaults.
On TPU and GPU neither setting applies.
"""
import functools
import os

import jax

YNN_FLAG = "xla_cpu_experimental_ynn_fusion_type"
WIDTH_FLAG = "xla_cpu_prefer_vector_width"
YNN_INDIVIDUAL_DOTS = "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"
# No YNNPACK fusions; AVX-512 loops.
DEFAULTS = {YNN_FLAG: "", WIDTH_FLAG: "512"}
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


def ynn_dots(environ=os.environ):
  """jax.jit compiler_options giving each dot to YNNPACK's kernels.

  None (XLA_FLAGS decides) off the CPU, when the user's XLA_FLAGS chose
  YNNPACK fusions and with NEARID_XLA_DEFAULTS=0.
  """
  if (not _enabled(environ)
      or _given(environ).get(YNN_FLAG, DEFAULTS[YNN_FLAG])
      != DEFAULTS[YNN_FLAG]
      or jax.default_backend() != "cpu"):
    return None
  return {YNN_FLAG: YNN_INDIVIDUAL_DOTS}


def tower_options(arch, environ=os.environ):
  """compiler_options for computations that run `arch`'s tower: ynn_dots()
  up to YNN_DOTS_MAX_WIDTH wide, else None."""
  return None if arch.width > YNN_DOTS_MAX_WIDTH else ynn_dots(environ)


def jit_ynn_dots(**jit_kwargs):
  """Decorator: jax.jit(fun, compiler_options=ynn_dots(), **jit_kwargs).

  The jit is made at the first call, not at import: asking for the backend
  at import would start it before jax.distributed.initialize().
  """
  def wrap(fun):
    jitted = []

    @functools.wraps(fun)
    def call(*args, **kwargs):
      if not jitted:
        jitted.append(jax.jit(fun, compiler_options=ynn_dots(), **jit_kwargs))
      return jitted[0](*args, **kwargs)
    return call
  return wrap
