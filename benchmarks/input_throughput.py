"""Input throughput: training groups/s and images/s of the grain pipeline.

Run from the repository root, e.g.

  .venv/bin/python -m benchmarks.input_throughput --res 384 --workers 0,2 \
      [--train_groups_per_s 3.1] [--json out.json]

It writes a synthetic NearID-format dataset (PNG images at --gen_res, so each
image is decoded and squash-resized to --res as real 512-1024 px images are),
prepares it with the TFDS builder, then times `input_pipeline.train_iterator`
(global batch --batch, one process, MTG mixed in) for each worker count:
the first batch (worker start-up) is left out, then --batches batches are
timed as one stretch. images/s counts the valid views and distractors
delivered (up to 6 per group). With --train_groups_per_s (from the training
benchmark, same machine) it says whether input or compute bounds training.

For benchmarks.suite, `rows` answers that question directly for the demo:
the demo's train step fed by the demo's input config batch by batch, as
train.py's loop feeds it (`sharding.global_batch(next(it))`, no host sync
until the last step), against the same step on one batch already on the
device. A ratio near 1 means the pipeline keeps up. A second row does the
same for the step the demo trains with, fed by its feature cache (written
for the config's random tower).
"""
import argparse
import os
import tempfile
import time

import jax
import tensorflow_datasets as tfds

from benchmarks import common
import configs.demo
import input_pipeline
from input_pipeline import synthetic
from nearid_jax.training import feature_cache
from nearid_jax import sharding
from nearid_jax.training import train


def measure(cfg, batches):
  it = input_pipeline.train_iterator(cfg, 0, 1)
  start = time.perf_counter()
  next(it)
  startup = time.perf_counter() - start
  images = 0
  start = time.perf_counter()
  for _ in range(batches):
    b = next(it)
    images += int(b["view_mask"].sum() + b["distractor_mask"].sum())
  seconds = time.perf_counter() - start
  if hasattr(it, "close"):
    it.close()
  return {"workers": cfg.num_workers, "threads": cfg.num_threads,
          "startup_s": round(startup, 2), "seconds": round(seconds, 3),
          "groups_per_s": batches * cfg.batch_size / seconds,
          "images_per_s": images / seconds}


def prepare_data(cfg, workdir, identities, gen_res):
  """Generates (once) and prepares a synthetic dataset for input config cfg.

  Images at gen_res px, so each is decoded and squash-resized to cfg.res as
  real 512-1024 px images are; the sources are cfg's.
  """
  cfg.manual_dir, cfg.data_dir = (os.path.join(workdir, "hf"),
                                  os.path.join(workdir, "tfds"))
  if not os.path.exists(cfg.manual_dir):
    start = time.perf_counter()
    synthetic.generate(cfg.manual_dir, identities, gen_res, seed=0,
                       sources=tuple(cfg.sources),
                       mtg=max(5, identities // 4))
    print(f"generated {identities} identities at {gen_res} px in "
          f"{time.perf_counter() - start:.1f} s", flush=True)
  tfds.disable_progress_bar()
  input_pipeline.prepare(cfg)


def time_fed_step(config, steps, repeats, cache_dir=""):
  """`steps` train steps fed by config.input's pipeline (from the feature
  cache in cache_dir if given) vs on one resident batch, interleaved ->
  {"fed": summary, "resident": summary}."""
  mesh = sharding.make_mesh(config.mesh)
  model, frozen, state, step = train.setup(config, mesh)
  it = (feature_cache.train_iterator(config, 0, 1, cache_dir=cache_dir,
                                     model=model) if cache_dir
        else input_pipeline.train_iterator(config.input, 0, 1))
  resident = sharding.global_batch(next(it), mesh)

  def run(feed):
    nonlocal state
    for _ in range(steps):
      batch = sharding.global_batch(next(it), mesh) if feed else resident
      state, metrics = step(frozen, state, batch)
    jax.block_until_ready(metrics)

  times = common.time_calls({"fed": lambda: run(True),
                             "resident": lambda: run(False)},
                            warmup=1, repeats=repeats)
  return {k: common.summarize(t) for k, t in times.items()}


def rows(identities=300, groups=0, steps=50, batches=20, repeats=3):
  """The demo's train step fed by its input pipeline as a suite row.

  The demo config's model and input settings (groups: 0 = its batch) on
  synthetic images made at the demo's image_res; details also hold the
  pipeline's rate alone (measure, `batches` batches). `steps` per timed
  call: the first batch of a call is read before any step runs, as in a
  training loop's first step only (with 10 the cached row read 0.66-0.68x
  where 50 read 0.81x, same machine).
  """
  config = configs.demo.get_config()
  cfg = config.input
  if groups:
    cfg.batch_size = groups
  with tempfile.TemporaryDirectory(prefix="input_bench_") as workdir:
    prepare_data(cfg, workdir, identities, config.demo.image_res)
    alone = measure(cfg, batches)
    r = time_fed_step(config, steps, repeats)
    cache_dir = os.path.join(workdir, "cache")
    feature_cache.write(config, cache_dir)  # the config's (random) tower
    cached = time_fed_step(config, steps, repeats, cache_dir)
  where = (f"demo {config.model.variant}@{config.model.res}, "
           f"{cfg.batch_size} groups/step, {steps} steps per call; ")
  return [common.suite_row(
      "input_demo", where + f"input from {config.demo.image_res} px PNG, "
      f"{cfg.num_workers} workers, {cfg.num_threads} threads (the demo's)",
      "train step fed by input_pipeline.train_iterator", "groups/s",
      steps * cfg.batch_size, r["fed"], ref=r["resident"],
      ref_impl="the same step on a batch already on the device",
      details={"steps": r, "input_alone": alone}),
          common.suite_row(
      "input_demo_cached", where + "input from the feature cache (how the "
      "demo trains)", "train step fed by feature_cache.train_iterator",
      "groups/s", steps * cfg.batch_size, cached["fed"],
      ref=cached["resident"],
      ref_impl="the same step on a batch already on the device",
      details={"steps": cached})]


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--res", type=int, default=384)
  parser.add_argument("--gen_res", type=int, default=512)
  parser.add_argument("--identities", type=int, default=48)
  parser.add_argument("--batch", type=int, default=16)
  parser.add_argument("--batches", type=int, default=8)
  parser.add_argument("--workers", default=f"0,{os.cpu_count()}",
                      help="comma-separated worker counts")
  parser.add_argument("--threads", type=int, default=2,
                      help="reader threads per process / worker")
  parser.add_argument("--train_groups_per_s", type=float, default=0.0,
                      help="the train step's consumption, for the verdict")
  parser.add_argument("--workdir", default="",
                      help="keep the data here (default: a temp dir)")
  parser.add_argument("--json", help="also write the results here")
  args = parser.parse_args()

  workdir = args.workdir or tempfile.mkdtemp(prefix="input_bench_")
  cfg = input_pipeline.default_config()
  cfg.sources = cfg.eval_sources = ("Flux", "Qwen")
  cfg.res, cfg.batch_size, cfg.mtg_repeat = args.res, args.batch, 4
  cfg.num_threads = args.threads
  prepare_data(cfg, workdir, args.identities, args.gen_res)

  results = []
  for workers in (int(w) for w in args.workers.split(",")):
    cfg.num_workers = workers
    results.append(measure(cfg, args.batches))

  notes = common.thread_notes()
  print(f"\ninput pipeline at {args.res} px from {args.gen_res} px PNG, batch "
        f"{args.batch} groups, {args.batches} batches timed after the first; "
        f"CPU: {notes['cpu']}, {notes['cores']} cores, load avg "
        f"{notes['load_avg_1m']}")
  header = ["workers", "threads", "groups/s", "images/s", "ms/batch",
            "start-up s"]
  rows = [[r["workers"], r["threads"], f"{r['groups_per_s']:.1f}",
           f"{r['images_per_s']:.0f}",
           f"{1e3 * r['seconds'] / args.batches:.0f}", r["startup_s"]]
          for r in results]
  if args.train_groups_per_s:
    header.append("input / train step")
    for row, r in zip(rows, results):
      row.append(f"{r['groups_per_s'] / args.train_groups_per_s:.2f}x")
  print(common.markdown_table(header, rows))
  if args.train_groups_per_s:
    best = max(r["groups_per_s"] for r in results)
    bound = "input" if best < args.train_groups_per_s else "compute"
    print(f"\nthe train step consumes {args.train_groups_per_s:.1f} groups/s; "
          f"the best input rate is {best:.1f}: {bound} bounds training")
  if args.json:
    common.write_json(args.json, {"args": vars(args), "notes": notes,
                                  "results": results})


if __name__ == "__main__":
  main()
