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
import torch

MATMUL_N = 2048  # big enough for both libraries to reach their matmul peak


def time_calls(fns, *, warmup=2, repeats=5):
  """Times callables: {name: fn} -> {name: {"wall_s": [...], "cpu_s": [...]}}.

  Each fn takes no argument and must return only when its work is done (block
  on JAX arrays). Calls are interleaved round by round, so a burst of load
  from other processes on a shared machine hits every implementation alike
  instead of whichever happened to be running then. cpu_s is this process's
  CPU time (all threads) per call: unlike wall time it barely moves with the
  neighbours' load, but it also counts threads that spin while they wait.
  """
  for fn in fns.values():
    for _ in range(warmup):
      fn()
  times = {name: {"wall_s": [], "cpu_s": []} for name in fns}
  for _ in range(repeats):
    for name, fn in fns.items():
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

  Put them in the same time_calls as the code under test, so the peak is
  sampled all through the run (see peak_flops); call under
  torch.inference_mode().
  """
  rng = np.random.default_rng(0)
  a, b = (rng.standard_normal((n, n), np.float32) for _ in range(2))
  ja, jb = jnp.asarray(a), jnp.asarray(b)
  ta, tb = torch.from_numpy(a), torch.from_numpy(b)
  dot = jax.jit(jnp.dot)
  return {"jnp.dot": lambda: dot(ja, jb).block_until_ready(),
          "torch.mm": lambda: torch.mm(ta, tb)}


def peak_flops(times, kind="wall_s", n=MATMUL_N):
  """FLOP/s of matmul_calls' entries in `times` (best call each), and the max.

  The best of calls spread over the run: a single short measurement taken
  while a neighbour is busy would put everything else above 100%. With
  kind="cpu_s" it is FLOPs per CPU-second (all threads): the efficiency of the
  code, which the neighbours' load barely moves.
  """
  out = {name: 2 * n ** 3 / min(times[name][kind])
         for name in ("jnp.dot", "torch.mm")}
  out["peak"] = max(out.values())
  return out


def matmul_peak(n=MATMUL_N, repeats=5):
  """The float32 matmul peak measured on its own (peak_flops' dict)."""
  with torch.inference_mode():
    return peak_flops(time_calls(matmul_calls(n), repeats=repeats), n)


def num_cores():
  """Cores this process may run on (`taskset` narrows it; XLA:CPU follows)."""
  return len(os.sched_getaffinity(0))


def set_torch_threads(n=None):
  """One torch intra-op thread per usable core (its default may differ)."""
  torch.set_num_threads(n or num_cores())


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
      "torch": torch.__version__,
      "torch_threads": torch.get_num_threads(),
      "torch_interop_threads": torch.get_num_interop_threads(),
      "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", ""),
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


def write_json(path, obj):
  """Writes `obj` as indented JSON, creating the parent folder."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w") as f:
    json.dump(obj, f, indent=2)
    f.write("\n")
