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
"""
import argparse
import os
import tempfile
import time

import tensorflow_datasets as tfds

from benchmarks import common
import input_pipeline
from input_pipeline import synthetic


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
  tfds.disable_progress_bar()

  workdir = args.workdir or tempfile.mkdtemp(prefix="input_bench_")
  manual = os.path.join(workdir, "hf")
  if not os.path.exists(manual):
    start = time.perf_counter()
    synthetic.generate(manual, args.identities, args.gen_res, seed=0,
                       sources=("Flux", "Qwen"),
                       mtg=max(5, args.identities // 4))
    print(f"generated {args.identities} identities at {args.gen_res} px in "
          f"{time.perf_counter() - start:.1f} s")
  cfg = input_pipeline.default_config()
  cfg.manual_dir, cfg.data_dir = manual, os.path.join(workdir, "tfds")
  cfg.sources = cfg.eval_sources = ("Flux", "Qwen")
  cfg.res, cfg.batch_size, cfg.mtg_repeat = args.res, args.batch, 4
  cfg.num_threads = args.threads
  input_pipeline.prepare(cfg)

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
