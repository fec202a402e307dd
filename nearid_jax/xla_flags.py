"""The XLA:CPU settings nearid_jax runs with.

jaxlib 0.10.2's CPU compiler hands elementwise ops, reductions and dots to
YNNPACK subgraphs by default. Around a ViT block's dots those subgraphs
materialise broadcast constants and run slower than XLA's own loop emitters
and Eigen's matmuls, so nearid_jax turns them off process-wide (DEFAULTS,
added to XLA_FLAGS when nearid_jax is imported). One exception, per jit: on
the tiny dots of the narrowest towers (head_dim 16, 36 tokens: the demo's
pico tower) YNNPACK's dot kernels are about twice as fast as Eigen's, so
computations running such a tower ask for them (tower_options), and so do
the retrieval kernels, whose (256 x 1152) @ (1152 x 1024) blocks run ~20%
faster there (595 -> 726 queries/s, both in one process). Train
steps on 2 cores, both settings in one process (benchmarks/xla_options.py,
the README's table): without YNNPACK, So400m/14@384 (1 group) 22.8 s
against 29.3 s with YNNPACK dots and 33.0 s with jaxlib's default; B/16
about equal; the pico demo step 19% slower than with YNNPACK dots.

The second default is a vector width of 512 bits for XLA's own loops
(elementwise ops, reductions; not the dots, which are Eigen's or
YNNPACK's). jaxlib asks LLVM for 256 unless told, a choice made for older
Intel parts that slow down on 512-bit instructions; on the 2-core AMD EPYC
(Zen 4) of the README's benchmarks, XLA's exp and GELU on the demo tower's
shapes ran ~18% faster at 512 (one-off timings), the demo train step 2-6%
and the Ti/16 and B/16 steps 0-2% (benchmarks.xla_options: both widths in
one process). A CPU without AVX-512 keeps its own, narrower, vectors.

XLA reads XLA_FLAGS once, when JAX starts its backend: import nearid_jax
before running any JAX code for the defaults to apply. A flag the user
already put in XLA_FLAGS is left as it is; NEARID_XLA_DEFAULTS=0 in the
environment leaves XLA_FLAGS and every jit to jaxlib's defaults. On TPU and
GPU neither setting applies.
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
