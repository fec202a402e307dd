"""Every benchmark in one command: one markdown table, one JSON file.

Run from the repository root:

  .venv/bin/python -m benchmarks.suite [--quick] [--only train_demo,embed] \
      [--json benchmarks/results/suite.json]

One row per measured thing, each from the benchmark module that owns it
(their `rows` functions; their own command lines print more detail). The
--only names are the rows', but "scoring" gives ssr and eval_retrieval:

  train_demo    train step, demo config (pico/8@48, its 32 groups x 6),
                images through the frozen tower; PyTorch also on 1 thread,
                which its small ops may prefer
  train_demo_cached  the step the demo trains with: the head on the same
                batch's tower tokens in bf16, as the feature cache serves
                them, in both libraries
  train_b16     train step, B/16@224, 2 groups (reduced for CPU)
  train_so400m  train step, So400m/14@384, 1 group (reduced for CPU),
                PyTorch eager only (the tower is >98% of its FLOPs, and
                torch.compile only ever wraps the head + loss)
  embed         tower + head forward, B/16@224, batch 8, vs transformers
  score         the score command's work on 64 JPEG files (decode, resize,
                embed, cosine), B/16@224, vs transformers' model + processor
  eval_embed    evaluation embedding of the demo tower, both heads
  eval_split    a training evaluation after the first (demo tower, trained
                head): from the tower tokens the first one kept vs from
                the split's images
  scoring       ssr and eval_retrieval: scoring a 500-row test split
                (7 sources, D=1152): SSR/PA, identity retrieval
  retrieval     exact top-10 over a 100,000 x 1152 gallery vs faiss-cpu
  input_demo    the demo's train step fed by its input pipeline vs on a
                resident batch (is input the bottleneck?)
  cache         head-only epoch from the bf16 token cache vs an uncached
                epoch at So400m/14@384 token shapes (benchmarks/
                cache_throughput.py)

Every FLOP/s figure is against the float32 matmul peak (jnp.dot and
torch.mm, 2048^3) timed between the calls of the same benchmark; "% of peak"
shows wall-clock and, after the slash, CPU-time efficiency (which the
neighbours' load on a shared machine barely moves). Ratios are ours over the
reference (> 1: ours faster). --quick swaps in tiny towers and sizes (and
a 256^3 matmul), compiles with XLA's optimisations off and times each thing
once: it checks that the suite runs, not speed. The targets
of issue 7 are checked at the end of the report.
"""
import argparse
import functools
import os
import time

import numpy as np

from benchmarks import cache_throughput
from benchmarks import common
from benchmarks import embed_throughput
from benchmarks import eval_throughput
from benchmarks import input_throughput
from benchmarks import retrieval_throughput
from benchmarks import score_throughput
from benchmarks import train_throughput

DEFAULT_JSON = os.path.join("benchmarks", "results", "suite.json")
QUICK_ONCE = dict(warmup=1, repeats=1)
QUICK_MATMUL_N = 256


def cache_rows(variant="So400m/14", res=384, groups=64, images=1,
               step_groups=2, repeats=2):
  """The feature-cache row: benchmarks/cache_throughput.py's run, whose
  epochs are extrapolated from per-image forwards and per-group head steps
  and reads (its docstring says how). The ratio is against cold disk reads,
  the case of a cache larger than memory (the paper's)."""
  r = cache_throughput.run(argparse.Namespace(
      variant=variant, res=res, groups=groups, images=images,
      step_groups=step_groups, repeats=repeats, tmp=None, json=None))
  e, d = r["epoch"], r["disk"]
  return [{
      "name": "cache", "config": f"{variant}@{res} tokens ({d['tokens']} x "
      f"{d['width']}, bf16), epoch of {groups} groups extrapolated; warm "
      f"page cache: {e['speedup']:.0f}x", "impl": "head-only epoch from "
      "the token cache (feature_cache reader + train step), cold disk reads",
      "unit": "groups/s", "count": groups,
      "rate": groups / e["cached_cold_s"], "ms": 1e3 * e["cached_cold_s"],
      "ref": "uncached epoch (6 tower forwards + head step per group)",
      "ref_rate": groups / e["uncached_s"], "ratio": e["speedup_cold"],
      "details": r}]


# name: (rows function, its keywords for the full run, for --quick). The
# full run's repeats are what fits 10-20 minutes on 2 cores: the big towers
# take seconds to a minute per call. The demo's steps are timed 5 to a call,
# as the training loop runs them (train_throughput's docstring).
BENCHMARKS = {
    "train_demo": (functools.partial(train_throughput.rows, "demo"),
                   dict(warmup=2, repeats=20, torch_threads=(1,), steps=5),
                   dict(groups=2, try_compile=False, torch_threads=(1,),
                        steps=2, **QUICK_ONCE)),
    "train_demo_cached": (
        functools.partial(train_throughput.rows, "demo", cached=True),
        dict(warmup=2, repeats=20, torch_threads=(1,), steps=5),
        dict(groups=2, try_compile=False, **QUICK_ONCE)),
    # Calls of seconds: a few milliseconds of spinning threads do not show.
    "train_b16": (functools.partial(train_throughput.rows, "b16"),
                  dict(warmup=1, repeats=2, settle=0, settle_s=0),
                  dict(tower="mu/16@32", try_compile=False, **QUICK_ONCE)),
    "train_so400m": (functools.partial(train_throughput.rows, "so400m"),
                     dict(try_compile=False, settle=0, settle_s=0,
                          **QUICK_ONCE),
                     dict(tower="mu/14@28", try_compile=False, **QUICK_ONCE)),
    "embed": (embed_throughput.rows,
              dict(variant="B/16", res=224, batch=8, warmup=2, repeats=3),
              dict(variant="mu/16", res=32, batch=2, try_compile=False,
                   **QUICK_ONCE)),
    "score": (score_throughput.rows,
              dict(variant="B/16", res=224, images=64, batch=16, warmup=1,
                   repeats=3),
              dict(variant="mu/16", res=32, images=4, hw=(40, 48), batch=2,
                   **QUICK_ONCE)),
    "eval_embed": (eval_throughput.embed_rows, dict(repeats=3),
                   dict(rows=2, repeats=1)),
    "eval_split": (eval_throughput.split_rows, dict(repeats=3),
                   dict(identities=12, rows=2, repeats=1)),
    "scoring": (eval_throughput.scoring_rows, dict(repeats=3),
                dict(rows=40, dim=32, repeats=1)),
    "retrieval": (retrieval_throughput.rows, dict(),
                  dict(gallery=2000, dim=32, queries=16, blocks=(512,),
                       repeats=1)),
    "input_demo": (input_throughput.rows, dict(),
                   dict(identities=12, groups=2, steps=2, batches=2,
                        repeats=1)),
    "cache": (cache_rows, dict(),
              dict(variant="mu/14", res=28, groups=4, step_groups=1,
                   repeats=1)),
}

# Issue 7's targets: (row name, what, key in the row, threshold). The So400m
# one twice: by wall clock, and by CPU time, which a loaded machine barely
# moves (its wall-clock peak is the best of a few short matmuls).
TARGETS = (
    ("train_demo", "demo train step through the tower, JAX / PyTorch "
     "images/s", "ratio", 2.0),
    ("train_demo_cached", "demo train step on cached tokens (what the demo "
     "trains with), JAX / PyTorch images/s", "ratio", 2.0),
    ("train_so400m", "So400m/14@384 forward, % of the matmul peak (lower "
     "bound: the whole train step's time)", "pct_peak", 50.0),
    ("train_so400m", "the same by CPU time", "pct_peak_cpu", 50.0),
    ("cache", "head-only epoch from the cache vs uncached, speed-up",
     "ratio", 20.0),
)


def _num(x, unit=""):
  return "" if x is None else f"{x:,.4g}{unit}"


def table(rows):
  """The suite's markdown table."""
  header = ["name", "config", "ours", "rate", "ms/call", "GFLOP/s",
            "% of matmul peak (wall / CPU)", "reference", "ref rate",
            "ratio (wall / CPU)"]
  cells = []
  for r in rows:
    pct = (f"{r['pct_peak']:.0f} / {r['pct_peak_cpu']:.0f}"
           if "pct_peak" in r else "")
    ratio = f"**{r['ratio']:.2f}x**" if "ratio" in r else ""
    if "ratio_cpu" in r:
      ratio += f" / {r['ratio_cpu']:.2f}x"
    cells.append([r["name"], r["config"], r["impl"],
                  _num(r["rate"], " " + r["unit"]), _num(r["ms"]),
                  _num(r.get("gflops")), pct, r.get("ref", ""),
                  _num(r.get("ref_rate")), ratio])
  return common.markdown_table(header, cells)


def check_targets(rows):
  """[{target, value, met}] for the targets whose row was measured."""
  by_name = {r["name"]: r for r in rows}
  out = []
  for name, what, key, threshold in TARGETS:
    if name in by_name:
      value = by_name[name].get(key)
      out.append({"row": name, "target": f"{what} >= {threshold:g}",
                  "value": value,
                  "met": value is not None and value >= threshold})
  return out


def run(names, quick):
  """Runs the named benchmarks in order -> their rows (with details)."""
  rows = []
  for name in names:
    fn, full, small = BENCHMARKS[name]
    print(f"\n######## {name}{' (--quick)' if quick else ''}", flush=True)
    start = time.perf_counter()
    new = fn(**(small if quick else full))
    for r in new:
      r["seconds_total"] = round(time.perf_counter() - start, 1)
    rows += new
  return rows


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true",
                      help="tiny shapes, one call each: checks that the "
                           "suite runs (about a minute), measures nothing")
  parser.add_argument("--only", default="",
                      help=f"comma-separated subset of {','.join(BENCHMARKS)}")
  parser.add_argument("--json", default=DEFAULT_JSON,
                      help="where the rows and details go (default: "
                           "%(default)s)")
  args = parser.parse_args()
  names = [n for n in args.only.split(",") if n] or list(BENCHMARKS)
  unknown = [n for n in names if n not in BENCHMARKS]
  if unknown:
    parser.error(f"--only: unknown {unknown}; choose from "
                 f"{','.join(BENCHMARKS)}")

  if args.quick:
    common.quick_compiles()
    common.MATMUL_N = QUICK_MATMUL_N
  common.set_torch_threads()
  load_before = os.getloadavg()
  start = time.perf_counter()
  rows = run(names, args.quick)
  notes = common.thread_notes()
  load_after = os.getloadavg()
  targets = check_targets(rows)

  quick = " --quick (sizes not meaningful)" if args.quick else ""
  print(f"\n######## suite{quick}: {time.perf_counter() - start:.0f} s; "
        f"CPU: {notes['cpu']}, {notes['cores']} cores; jax {notes['jax']} "
        f"({notes['jax_backend']}), torch {notes['torch']} "
        f"({notes['torch_threads']} threads); load average (1, 5, 15 min) "
        f"before {np.round(load_before, 2).tolist()}, "
        f"after {np.round(load_after, 2).tolist()}\n")
  print(table(rows))
  print()
  for t in targets:
    print(f"target {t['target']}: {_num(t['value']) or 'not measured'} -> "
          f"{'met' if t['met'] else 'NOT met'}")
  common.write_json(args.json, {
      "quick": args.quick, "names": names, "threads": notes,
      "load_avg_before": load_before, "load_avg_after": load_after,
      "seconds": round(time.perf_counter() - start, 1), "targets": targets,
      "rows": rows})
  print(f"\nwrote {args.json}")


if __name__ == "__main__":
  main()
