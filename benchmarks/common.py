"""Shared benchmark helpers: timing loop, matmul peak, thread notes, output.

Every benchmark in this folder measures on the machine it runs on, in the same
process, against a matmul peak measured in that run, and prints a markdown
table (optionally also a JSON file). Timings are seconds of wall clock and of
process CPU time.
"""
import json
import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
try:  # the PyTorch references; benchmarks.accelerator runs without it
  import torch
except ImportError:
  torch = None

from nearid_jax.cpu import xla_flags

# The benchmarks are entry points: they run with launch.py's XLA:CPU
# settings (read when JAX starts its backend, after this import).
xla_flags.add_defaults()

# XLA's optimisation passes off: the many small compiles of a smoke run
# (--quick) run several times faster.
QUICK_XLA_FLAGS = ("--xla_backend_optimization_level=0",
                   "--xla_llvm_disable_expensive_passes=true")

# Big enough for both libraries to reach their matmul peak (a smoke run,
# benchmarks.suite --quick, lowers it: its peak means nothing).
MATMUL_N = 2048


def quick_compiles():
  """Adds QUICK_XLA_FLAGS to XLA_FLAGS (read when JAX starts its backend:
  call it before the first computation)."""
  os.environ["XLA_FLAGS"] = " ".join(
      [os.environ.get("XLA_FLAGS", ""), *QUICK_XLA_FLAGS]).strip()


def time_calls(fns, *, warmup=2, repeats=5, settle=0, settle_s=0.0):
  """Times callables: {name: fn} -> {name: {"wall_s": [...], "cpu_s": [...]}}.

  Each fn takes no argument and must return only when its work is done (block
  on JAX arrays). Calls are interleaved round by round, so a burst of load
  from other processes on a shared machine hits every implementation alike
  instead of whichever happened to be running then. cpu_s is this process's
  CPU time (all threads) per call: unlike wall time it barely moves with the
  neighbours' load, but it also counts threads that spin while they wait.

  settle: untimed calls of each fn right before each of its timed ones. Use
  1 for calls of tens of milliseconds: PyTorch's OpenMP workers spin for a
  while after returning, and that spinning lands on whatever runs next on
  the same cores (measured: the demo's JAX step took 21.2 ms right after a
  PyTorch step, 17.2 ms after its own). settle_s: keep making untimed calls
  until that long has passed since the settling began; calls of a few
  milliseconds need it (the cached demo step, 1.95 ms settled, took 5.6,
  2.6 and 2.3 ms as the first three calls after a 2048^2 torch.mm).
  """
  for fn in fns.values():
    for _ in range(warmup):
      fn()
  times = {name: {"wall_s": [], "cpu_s": []} for name in fns}
  for _ in range(repeats):
    for name, fn in fns.items():
      start, n = time.perf_counter(), 0
      while n < settle or time.perf_counter() - start < settle_s:
        fn()
        n += 1
      wall, cpu = time.perf_counter(), time.process_time()
      fn()
      times[name]["cpu_s"].append(time.process_time() - cpu)
      times[name]["wall_s"].append(time.perf_counter() - wall)
  return times


def summarize(times):
  """One entry of time_calls -> best_/median_/all_ {wall,cpu}_s.

  Throughput is computed from the best call: on a shared machine the slower
  calls measure the neighbours' load, not the code.
  """
  out = {}
  for kind, seconds in times.items():  # "wall_s", "cpu_s"
    out.update({f"best_{kind}": min(seconds),
                f"median_{kind}": float(np.median(seconds)),
                f"all_{kind}": [round(s, 5) for s in seconds]})
  return out


def matmul_calls(n=MATMUL_N):
  """{name: call} of a float32 (n, n) @ (n, n) product in JAX and in torch.

  Time them in the same time_calls as the code under test (time_with_peak),
  so the peak is sampled all through the run (see peak_flops). Their
  operands need no grad, so autograd adds nothing outside inference_mode.
  """
  rng = np.random.default_rng(0)
  a, b = (rng.standard_normal((n, n), np.float32) for _ in range(2))
  ja, jb = jnp.asarray(a), jnp.asarray(b)
  ta, tb = torch.from_numpy(a), torch.from_numpy(b)
  dot = jax.jit(jnp.dot)
  return {"jnp.dot": lambda: dot(ja, jb).block_until_ready(),
          "torch.mm": lambda: torch.mm(ta, tb)}


def time_with_peak(fns, *, warmup, repeats, settle=0, settle_s=0.0):
  """time_calls of `fns` with matmul_calls interleaved -> (times, peaks).

  The matmuls run after every call under test, so even a single round
  samples the peak several times across the run. peaks =
  (peak_flops(times), peak_flops(times, "cpu_s")). warmup: untimed rounds
  of `fns` (0 when their first call was made already, e.g. to check
  results); the matmuls get one of their own first. Their size is MATMUL_N
  at the time of the call. settle, settle_s: as time_calls'.
  """
  n = MATMUL_N
  matmuls = matmul_calls(n)
  for call in matmuls.values():
    call()
  calls = {}
  for name, fn in fns.items():
    calls[name] = fn
    calls.update({f"{m} after {name}": call for m, call in matmuls.items()})
  times = time_calls(calls, warmup=warmup, repeats=repeats, settle=settle,
                     settle_s=settle_s)
  return times, (peak_flops(times, n=n), peak_flops(times, "cpu_s", n))


def peak_flops(times, kind="wall_s", n=MATMUL_N):
  """FLOP/s of matmul_calls' entries in `times` (best call each), and the max.

  Entries named "jnp.dot ..." and "torch.mm ..." (time_with_peak's) count as
  calls of those. The best of calls spread over the run: a single short
  measurement taken while a neighbour is busy would put everything else
  above 100%. With kind="cpu_s" it is FLOPs per CPU-second (all threads):
  the efficiency of the code, which the neighbours' load barely moves.
  """
  out = {m: 2 * n ** 3 / min(s for name, t in times.items()
                             if name.split(" ")[0] == m for s in t[kind])
         for m in ("jnp.dot", "torch.mm")}
  out["peak"] = max(out.values())
  return out


def forward_flops(arch, batch, heads=1):
  """Analytic FLOPs of one forward pass (tower + MAP heads) on `batch` images.

  A multiply-add counts 2 FLOPs; only matmul-like work is counted (LayerNorm,
  softmax, GELU, biases and residual adds are a few percent and left out).
  With N = patches, D = width, M = MLP width, p = patch size, per image:

    patch embedding (a stride-p conv = a matmul): 2 * N * (3 p^2) * D
    each of the `depth` blocks:
      q, k, v and out projections:  4 * 2 * N * D^2
      scores q k^T (all heads):     2 * N^2 * D
      weighted sum of values:       2 * N^2 * D
      MLP (D -> M -> D):            2 * 2 * N * D * M
    each MAP head (one probe query attending over the N tokens; `heads` of
    them read the same tower tokens in evaluation):
      q and out projections of the probe:  2 * 2 * D^2
      k and v projections of the tokens:   2 * 2 * N * D^2
      scores and weighted sum:             2 * 2 * N * D
      MLP on the probe:                    2 * 2 * D * M

  This is the model's textbook count, the same for every implementation:
  our MAP head folds the k and v projections into the probe (vit.
  ProbeAttention), 4 N D H FLOPs (H heads) in place of their 4 N D^2, which
  are under 1% of So400m/14@384's count and 6% of the demo tower's.
  """
  n, d, m, p = arch.num_patches, arch.width, arch.mlp_dim, arch.patch_size
  embed = 2 * n * 3 * p * p * d
  block = 8 * n * d * d + 4 * n * n * d + 4 * n * d * m
  head = 4 * d * d + 4 * n * d * d + 4 * n * d + 4 * d * m
  return batch * (embed + arch.depth * block + heads * head)


def random_batch(groups, res, seed=0):
  """uint8 batch shaped like the pipeline's (see tests/fake_data.py)."""
  rng = np.random.default_rng(seed)
  view_mask = np.ones((groups, 3), bool)
  view_mask[rng.random(groups) < 0.3, 2] = False
  return {
      "views": rng.integers(0, 256, (groups, 3, res, res, 3), np.uint8),
      "view_mask": view_mask,
      "distractors": rng.integers(0, 256, (groups, 3, res, res, 3), np.uint8),
      "distractor_mask": view_mask & (rng.random((groups, 3)) < 0.8),
  }


def add_timing_flags(parser, what):
  """--warmup, --repeats, --no-compile, --json: the PyTorch comparisons'."""
  parser.add_argument("--warmup", type=int, default=2,
                      help=f"untimed calls of each {what} first (at least 1)")
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--no-compile", action="store_true",
                      help="PyTorch eager only (no torch.compile)")
  parser.add_argument("--json", help="also write the results here")


def num_cores():
  """Cores this process may run on (`taskset` narrows it; XLA:CPU follows)."""
  return len(os.sched_getaffinity(0))


def set_torch_threads(n=None):
  """One torch intra-op thread per usable core (its default may differ)."""
  torch.set_num_threads(n or num_cores())


def with_torch_threads(n, fn):
  """fn run with n torch intra-op threads (restored after)."""
  def call():
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
      return fn()
    finally:
      torch.set_num_threads(before)
  return call


def thread_notes():
  """What decides how many threads each library uses, for the report."""
  return {
      "cpu": _cpu_name(),
      "cores": num_cores(),
      "cores_in_machine": os.cpu_count(),
      "load_avg_1m": round(os.getloadavg()[0], 2),
      "jax": jax.__version__,
      "jax_backend": jax.default_backend(),
      # XLA:CPU runs ops on a pool with one thread per usable core unless
      # XLA_FLAGS says otherwise.
      "XLA_FLAGS": os.environ.get("XLA_FLAGS", ""),
      "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", ""),
      **({"torch": None} if torch is None else {
          "torch": torch.__version__,
          "torch_threads": torch.get_num_threads(),
          "torch_interop_threads": torch.get_num_interop_threads()}),
  }


def _cpu_name():
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def markdown_table(header, rows):
  """Rows of cells (anything str() can print) -> a markdown table string."""
  lines = ["| " + " | ".join(header) + " |",
           "|" + "|".join("---" for _ in header) + "|"]
  lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
  return "\n".join(lines)


def best_of(results, names):
  """The one of `names` whose best call in `results` took least wall time."""
  return min(names, key=lambda k: results[k]["best_wall_s"])


def suite_row(name, config, impl, unit, count, ours, *, flops=None,
              peaks=None, ref=None, ref_impl=None, details=None):
  """One row of benchmarks.suite's table, a JSON-ready dict.

  ours, ref: summarize() dicts of our code and of what it is compared with
    (PyTorch, faiss, ...; None for no comparison), timed in the same
    time_calls; count: items per call (images, groups, queries, rows), so a
    rate is count per best wall second and the ratio is ours / ref.
  flops: FLOPs per call, against peaks = (peak_flops(times),
    peak_flops(times, "cpu_s")) of the matmuls in that time_calls.
  details: the benchmark's own results, kept in the suite's JSON.
  """
  row = {"name": name, "config": config, "impl": impl, "unit": unit,
         "count": count, "rate": count / ours["best_wall_s"],
         "ms": 1e3 * ours["best_wall_s"],
         "median_ms": 1e3 * ours["median_wall_s"],
         "cpu_ms": 1e3 * ours["best_cpu_s"]}
  if flops:
    wall, cpu = peaks
    row.update(gflops=flops / ours["best_wall_s"] / 1e9,
               peak_gflops=wall["peak"] / 1e9,
               pct_peak=100 * flops / ours["best_wall_s"] / wall["peak"],
               pct_peak_cpu=100 * flops / ours["best_cpu_s"] / cpu["peak"])
  if ref is not None:
    row.update(ref=ref_impl, ref_rate=count / ref["best_wall_s"],
               ratio=ref["best_wall_s"] / ours["best_wall_s"],
               ratio_cpu=ref["best_cpu_s"] / ours["best_cpu_s"])
  if details is not None:
    row["details"] = details
  return row


def write_json(path, obj):
  """Writes `obj` as indented JSON, creating the parent folder."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w") as f:
    json.dump(obj, f, indent=2)
    f.write("\n")
