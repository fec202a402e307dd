"""Feature cache: head-only epochs from the cache vs uncached epochs.

Run from the repository root, e.g.

  .venv/bin/python -m benchmarks.cache_throughput [--groups 64] [--json F]

At So400m/14@384 token shapes (729 tokens x 1152), on this machine, with a
random tower (configs/nearid_r7.py, model.init = ""). Timed with
common.time_calls (best call):
  forward    the frozen tower on --images images (the jit feature_cache.write
             and an uncached train step run: tower_tokens), per image;
  head step  the train step as training builds it (train.setup), on a cached
             batch of --step-groups groups, tokens bfloat16 (g, 6, 729, 1152),
             per group;
  read       feature_cache.train_iterator (grain + GroupMaker + token lookup)
             over a cache of such tokens written to --tmp, per group, page
             cache warm, records read from the file (as in a cache bigger
             than feature_cache.IN_MEMORY_BYTES); and apart, the disk: each
             record read once after its file's pages were dropped (6
             records per group).
An epoch of --groups groups is extrapolated from these: uncached = groups x
(6 forwards + head step), cached = groups x (read + head step) (+ the cold
disk reads, for an epoch whose tokens are not in memory); the image
decode of the uncached pipeline is not counted (that favours uncached). The
tower runs in float32, XLA:CPU's fastest (bfloat16 is emulated here), so the
uncached side is as fast as this CPU makes it.

Disk: N x D x 2 bytes per image. The paper's training images (SPEC.md §4, §6,
R7 = the 7 non-FluxC sources, train split): views <= 3 per train row
(n_images is 2 or 3; the upper bound is used), distractors = the 316,505 of
all 9 sources x 7/9 x 18,786/19,386 train rows (equal-size sources and splits
assumed). MTG train rows (4 images each, cached once whatever the x4 repeat)
are not counted: their number is not in SPEC.md.

Break-even: writing the cache costs one forward + one record write per cached
image; an uncached epoch forwards 6 images per group. With S sources a row
holds up to 3 + 3S images, so the write is (3 + 3S) / 6 uncached epochs of
forwards (4 with the paper's 7 sources, 1 with one source), and the cache
pays once the epochs saved cover it.
"""
import argparse
import json
import os
import tempfile
import time

import jax
import numpy as np

import configs.nearid_r7
from array_record.python import array_record_module
from benchmarks import common
from nearid_jax.training import feature_cache
from nearid_jax import sharding
from nearid_jax.training import train
from nearid_jax.model import tower_tokens

SLOTS = 6
TRAIN_ROWS, ALL_ROWS = 18786, 19386          # SPEC.md §4
DISTRACTORS, ALL_SOURCES, R7_SOURCES = 316505, 9, 7
R7_EPOCHS = 11                               # SPEC.md §6


def make_config(step_groups, variant, res):
  config = configs.nearid_r7.get_config("")  # "": a random tower
  config.model.variant, config.model.res = variant, res
  config.model.dtype = "float32"
  config.input.update(batch_size=step_groups, sources=("Flux",),
                      mtg_repeat=0, num_threads=2, prefetch=2)
  return config


def fake_cache(path, config, model, rows, seed=0):
  """A cache of random bf16 tokens for `rows` rows of one source.

  The layout feature_cache.write leaves, without a tower forward per image.
  Returns the shard's path and the seconds per record written (and synced).
  """
  n, d = model.arch.num_patches, model.arch.width
  rng = np.random.default_rng(seed)
  # One record per slot, and the black image's last.
  records = [rng.standard_normal((n, d), np.float32).astype(
      feature_cache.DTYPE).tobytes() for _ in range(rows * SLOTS + 1)]
  name = "tokens-00000-of-00001.array_record"
  t0 = time.perf_counter()
  writer = array_record_module.ArrayRecordWriter(
      os.path.join(path, name), "group_size:1,uncompressed")
  for record in records:
    writer.write(record)
  writer.close()
  with open(os.path.join(path, name), "rb") as f:
    os.fsync(f.fileno())
  write_s = time.perf_counter() - t0
  # No prepared data: the fingerprint without it (training then takes the
  # cache's rows as they are).
  meta = {**feature_cache.fingerprint(config, model, data=False),
          "token_shape": [n, d], "shards": [name],
          "shard_records": [len(records)], "nearid_rows": list(range(rows)),
          "mtg_rows": [], "images": rows * SLOTS, "empty": 0, "corrupt": 0}
  with open(os.path.join(path, feature_cache.METADATA), "w") as f:
    json.dump(meta, f)
  return os.path.join(path, name), write_s / (rows * SLOTS)


def drop_pages(path):
  """Evicts a file's clean pages from the page cache: the next read is cold."""
  fd = os.open(path, os.O_RDONLY)
  try:
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
  finally:
    os.close(fd)


def paper_images():
  views = 3 * TRAIN_ROWS
  distractors = round(DISTRACTORS * R7_SOURCES / ALL_SOURCES
                      * TRAIN_ROWS / ALL_ROWS)
  return views, distractors


def run(args):
  config = make_config(args.step_groups, args.variant, args.res)
  mesh = sharding.make_mesh(config.mesh)
  t0 = time.perf_counter()
  model, frozen, state, step = train.setup(config, mesh)
  setup_s = time.perf_counter() - t0
  n, d = model.arch.num_patches, model.arch.width
  res = model.arch.image_size

  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (args.images, res, res, 3), np.uint8)
  forward = jax.jit(lambda p, x: tower_tokens(model.tower, p, x),
                    compiler_options=model.compiler_options)

  with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
    config.input.data_dir = tmp  # no prepared data: the cache alone
    rows = 2 * args.step_groups
    shard, write_s = fake_cache(tmp, config, model, rows)
    # The disk alone: every record once, its pages dropped first.
    records = feature_cache.TokenLookup(feature_cache.Cache(tmp)).records
    drop_pages(shard)
    t0 = time.perf_counter()
    for i in range(rows * SLOTS):
      records[i]  # pylint: disable=pointless-statement
    disk_s = (time.perf_counter() - t0) / rows
    # The paper's cache (hundreds of GB) is read from disk, not memory.
    it = feature_cache.train_iterator(config, 0, 1, cache_dir=tmp,
                                      model=model, in_memory_bytes=0)
    batch = next(it)
    assert batch["tokens"].shape == (args.step_groups, SLOTS, n, d)

    def head_step():
      nonlocal state
      state, metrics = step(frozen, state,
                            sharding.global_batch(batch, mesh))
      jax.block_until_ready(metrics)

    times = common.time_calls(
        {"forward": lambda: forward(frozen, images).block_until_ready(),
         "head step": head_step,
         "read": lambda: next(it)},
        warmup=1, repeats=args.repeats)
  best = {k: min(v["wall_s"]) for k, v in times.items()}
  cpu = {k: min(v["cpu_s"]) for k, v in times.items()}
  per = {"forward": best["forward"] / args.images,
         "head step": best["head step"] / args.step_groups,
         "read": best["read"] / args.step_groups, "disk read": disk_s,
         "write": write_s}
  # CPU time barely moves with the neighbours' load: a steadier ratio.
  per_cpu = {"forward": cpu["forward"] / args.images,
             "head step": cpu["head step"] / args.step_groups,
             "read": cpu["read"] / args.step_groups}
  speedup_cpu = ((SLOTS * per_cpu["forward"] + per_cpu["head step"])
                 / (per_cpu["read"] + per_cpu["head step"]))
  uncached = SLOTS * per["forward"] + per["head step"]
  cached = per["read"] + per["head step"]
  cached_cold = cached + per["disk read"]  # a cold epoch pays both

  views, distractors = paper_images()
  image_bytes = n * d * 2
  paper = views + distractors
  write_all = paper * (per["forward"] + per["write"])
  epoch_u, epoch_c = TRAIN_ROWS * uncached, TRAIN_ROWS * cached_cold
  return {
      "args": vars(args), "setup_s": setup_s, "per": per, "per_cpu": per_cpu,
      "times": {k: common.summarize(v) for k, v in times.items()},
      "epoch": {"groups": args.groups, "uncached_s": args.groups * uncached,
                "cached_s": args.groups * cached,
                "cached_cold_s": args.groups * cached_cold,
                "speedup": uncached / cached,
                "speedup_cold": uncached / cached_cold,
                "speedup_cpu": speedup_cpu},
      "disk": {"tokens": n, "width": d, "bytes_per_image": image_bytes,
               "paper_views": views, "paper_distractors": distractors,
               "paper_images": paper, "paper_bytes": paper * image_bytes,
               "per_row_images": paper / TRAIN_ROWS},
      "paper": {"write_s": write_all, "epoch_uncached_s": epoch_u,
                "epoch_cached_s": epoch_c,
                "break_even_epochs": (write_all / (epoch_u - epoch_c)
                                      if epoch_u > epoch_c else None),
                "r7_uncached_s": R7_EPOCHS * epoch_u,
                "r7_cached_s": write_all + R7_EPOCHS * epoch_c},
      "threads": common.thread_notes(),
  }


def _h(seconds):
  return f"{seconds / 3600:.1f} h"


def print_report(r):
  a, per, e, dk, pp = r["args"], r["per"], r["epoch"], r["disk"], r["paper"]
  notes = r["threads"]
  print(f"\n{a['variant']}@{a['res']} tokens ({dk['tokens']} x "
        f"{dk['width']}), float32 "
        f"tower; CPU: {notes['cpu']}, {notes['cores']} cores, 1-min load avg "
        f"{notes['load_avg_1m']}; best of {a['repeats']} interleaved calls "
        f"after 1 warm-up; forward on {a['images']} image(s), head step and "
        f"read on batches of {a['step_groups']} groups")
  pc = r["per_cpu"]
  print(common.markdown_table(
      ["what", "wall s", "CPU s", "per"],
      [["tower forward", f"{per['forward']:.2f}", f"{pc['forward']:.2f}",
        "image"],
       ["head train step (cached batch)", f"{per['head step']:.3f}",
        f"{pc['head step']:.3f}", "group"],
       ["cache reader (train_iterator), page cache warm",
        f"{per['read']:.4f}", f"{pc['read']:.4f}", "group"],
       ["disk read of a group's 6 records, cold", f"{per['disk read']:.4f}",
        "", "group"],
       ["cache record write (disk only)", f"{per['write']:.4f}", "",
        "image"]]))
  print()
  print(common.markdown_table(
      [f"epoch of {e['groups']} groups", "seconds", "speedup"],
      [["uncached (6 forwards + head step per group)",
        f"{e['uncached_s']:.1f}", "1x"],
       ["cached (reader + head step per group)", f"{e['cached_s']:.1f}",
        f"{e['speedup']:.0f}x"],
       ["cached, + cold disk reads", f"{e['cached_cold_s']:.1f}",
        f"{e['speedup_cold']:.0f}x"]]))
  print(f"by CPU time (reader + head step vs 6 forwards + head step): "
        f"{e['speedup_cpu']:.0f}x; epoch extrapolated from the per-image and "
        "per-group timings above")
  print()
  print(common.markdown_table(
      ["disk", "value"],
      [["per image (N x D x 2 bytes)", f"{dk['bytes_per_image']:,} B "
        f"({dk['bytes_per_image'] / 2**20:.2f} MiB)"],
       ["paper train images (views <= 3/row + 7 sources' distractors)",
        f"{dk['paper_views']:,} + {dk['paper_distractors']:,} = "
        f"{dk['paper_images']:,} ({dk['per_row_images']:.1f} per row)"],
       ["paper cache size", f"{dk['paper_bytes'] / 1e9:.0f} GB "
        f"({dk['paper_bytes'] / 2**30:.0f} GiB)"]]))
  print()
  print(common.markdown_table(
      ["paper data on this CPU (18,786 groups/epoch, MTG left out)", "time"],
      [["cache write (forward + record per image)", _h(pp["write_s"])],
       ["uncached epoch", _h(pp["epoch_uncached_s"])],
       ["cached epoch (cold reads)", _h(pp["epoch_cached_s"])],
       ["break-even", "never" if pp["break_even_epochs"] is None else
        f"{pp['break_even_epochs']:.1f} epochs"],
       [f"R7, {R7_EPOCHS} epochs, uncached", _h(pp["r7_uncached_s"])],
       [f"R7, {R7_EPOCHS} epochs, write + cached", _h(pp["r7_cached_s"])]]))


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--variant", default="So400m/14",
                      help="tower shape (a smaller one for a smoke run)")
  parser.add_argument("--res", type=int, default=384)
  parser.add_argument("--groups", type=int, default=64,
                      help="groups in the reduced epoch")
  parser.add_argument("--images", type=int, default=1,
                      help="images per timed tower forward")
  parser.add_argument("--step-groups", type=int, default=2,
                      help="groups per timed head step and read")
  parser.add_argument("--repeats", type=int, default=2)
  parser.add_argument("--tmp", default=None,
                      help="where the timed cache is written (default $TMPDIR)")
  parser.add_argument("--json", default=None, help="also write results here")
  args = parser.parse_args()
  r = run(args)
  print_report(r)
  if args.json:
    common.write_json(args.json, r)


if __name__ == "__main__":
  main()
