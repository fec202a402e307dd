"""XLA:CPU fusion settings on our train step: jaxlib's default vs nearid_jax's.

Run from the repository root:

  .venv/bin/python -m benchmarks.xla_options [--towers pico/8@48:32,...] \
      [--repeats 10] [--json out.json]

For each tower ("variant@res:groups", random weights, the demo config's
other settings) the train step of train.setup is compiled with XLA:CPU's
YNNPACK library set three ways (nearid_jax/cpu/xla_flags.py):

  jaxlib default   what jaxlib 0.10.2 does unasked: YNNPACK subgraphs of
                   dots with their elementwise neighbours, reductions, ...,
                   and 256-bit vectors in XLA's own loops
  no YNNPACK       XLA's loop emitters and Eigen's matmuls (nearid_jax's
                   process-wide default)
  YNNPACK dots     only the dots, each alone (what nearid_jax asks for
                   towers up to xla_flags.YNN_DOTS_MAX_WIDTH wide)

and the last two each with 512-bit vectors in XLA's loops (nearid_jax's
process-wide default) and with jaxlib's 256. These four are jit
compiler_options of one process, timed interleaved (common.time_calls,
best call). jaxlib's default cannot be asked for that way, so a child
process started with NEARID_XLA_DEFAULTS=0 times it, after the parent (its
numbers come from another process: less comparable on a busy machine).
The column nearid_jax uses for the tower is marked *.
"""
import argparse
import json
import os
import subprocess
import sys

import jax

from benchmarks import common
from benchmarks import train_throughput
from nearid_jax import sharding
from nearid_jax.training import train
from nearid_jax.cpu import xla_flags

_LIBRARY = {"no YNNPACK": "", "YNNPACK dots": xla_flags.YNN_INDIVIDUAL_DOTS}
SETTINGS = {f"{name}{label}": {xla_flags.YNN_FLAG: value,
                               xla_flags.WIDTH_FLAG: width}
            for name, value in _LIBRARY.items()
            for label, width in (("", 512), (", 256-bit", 256))}
DEFAULT_TOWERS = "pico/8@48:32,Ti/16@224:1,B/16@224:1"


def _tower(spec):
  variant_res, _, groups = spec.partition(":")
  return variant_res, int(groups or 1)


def time_steps(spec, settings, repeats):
  """{setting: summarize()} of the train step of `spec` under each setting.

  settings: {name: compiler_options or None (the process's defaults)}.
  """
  tower, groups = _tower(spec)
  config = train_throughput.make_config("demo", groups, tower)
  mesh = sharding.make_mesh(config.mesh)
  model, frozen, state, _ = train.setup(config, mesh)
  tx = train.optim.make(config)
  batch = sharding.global_batch(train_throughput.random_batch(
      groups, config.model.res), mesh)
  steps, states = {}, {}
  for name, options in settings.items():
    steps[name] = jax.jit(train.make_train_step(model, tx, config),
                          compiler_options=options)
    states[name] = jax.tree.map(lambda x: x.copy(), state)

  def call(name):
    def run():
      states[name], metrics = steps[name](frozen, states[name], batch)
      jax.block_until_ready(metrics)
    return run
  times = common.time_calls({n: call(n) for n in settings}, warmup=1,
                            repeats=repeats, settle=1)
  return model.arch, {n: common.summarize(t) for n, t in times.items()}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--towers", default=DEFAULT_TOWERS,
                      help="comma-separated variant@res:groups (6 images a "
                           "group); So400m/14@384:1 takes minutes")
  parser.add_argument("--repeats", type=int, default=10)
  parser.add_argument("--json", default="")
  parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
  args = parser.parse_args()
  towers = [t for t in args.towers.split(",") if t]
  if args.child:  # jaxlib's defaults: NEARID_XLA_DEFAULTS=0 set by the parent
    print(json.dumps({t: time_steps(t, {"jaxlib default": None},
                                    args.repeats)[1] for t in towers}))
    return

  results = {}
  for t in towers:
    arch, results[t] = time_steps(t, SETTINGS, args.repeats)
    results[t]["chosen"] = ("YNNPACK dots" if xla_flags.tower_options(arch)
                            else "no YNNPACK")
    print(f"{t}: " + ", ".join(f"{n} {1e3 * s['best_wall_s']:.1f} ms"
                               for n, s in results[t].items()
                               if n != "chosen"), flush=True)
  env = {**os.environ, "NEARID_XLA_DEFAULTS": "0"}
  env.pop("XLA_FLAGS", None)
  child = subprocess.run(
      [sys.executable, "-m", "benchmarks.xla_options", "--child", "--towers",
       args.towers, "--repeats", str(args.repeats)],
      env=env, check=True, capture_output=True, text=True)
  for t, r in json.loads(child.stdout.strip().splitlines()[-1]).items():
    results[t].update(r)

  names = ["jaxlib default", *SETTINGS]
  rows = []
  for t in towers:
    r = results[t]
    base = r["jaxlib default"]["best_wall_s"]
    rows.append([t] + [
        f"{1e3 * r[n]['best_wall_s']:.1f}"
        + (" *" if n == r["chosen"] else "")
        + ("" if n == names[0] else f" ({base / r[n]['best_wall_s']:.2f}x)")
        for n in names])
  notes = common.thread_notes()
  print(f"\nCPU: {notes['cpu']}, {notes['cores']} cores, load average "
        f"{notes['load_avg_1m']}; train step ms (best of {args.repeats}), "
        "speed-up over jaxlib's default in brackets; * = nearid_jax's "
        "choice\n")
  print(common.markdown_table(["tower:groups", *names], rows))
  if args.json:
    common.write_json(args.json, {"results": results, "threads": notes})


if __name__ == "__main__":
  main()
