"""Scoring image files: `python -m nearid_jax.score`'s work vs transformers.

Run from the repository root, e.g.

  .venv/bin/python -m benchmarks.score_throughput --variant B/16 --res 224 \
      --images 64 --batch 16 [--json out.json]

A random tower is exported as a SiglipVisionModel directory (its
preprocessor_config.json included) and both sides score the same pairs CSV
of JPEG files (each image in two pairs) from that directory:
- ours: nearid_jax.score.score_table, what the command runs between reading
  the CSV and writing its output: threaded decoding and resizing, the jitted
  tower and head on fixed-shape batches, each distinct image once, cosines;
- transformers: the same distinct images in the same batches through
  SiglipImageProcessorPil (what AutoImageProcessor gives without
  torchvision) and SiglipVisionModel under torch.inference_mode, the
  L2-normalised pooler outputs' dot products.
images/s counts distinct images per call. FLOP/s is the towers' forward
count (common.forward_flops), so decoding and resizing show as a
lower share of the matmul peak. torch gets one thread per usable core;
XLA:CPU does so by default.
"""
import argparse
import os
import tempfile

import numpy as np
from PIL import Image
import torch
import transformers

from benchmarks import common
from nearid_jax import model as model_lib
from nearid_jax import score
from nearid_jax import vit
from nearid_jax.formats import bigvision
from nearid_jax.model import NearID


def write_images(folder, n, hw, seed=0):
  """n smooth random JPEGs of size hw and a pairs CSV (image i with i + 1)."""
  rng = np.random.default_rng(seed)
  names = []
  for i in range(n):
    small = rng.integers(0, 256, (hw[0] // 16, hw[1] // 16, 3), np.uint8)
    Image.fromarray(small).resize(hw[::-1], Image.BILINEAR).save(
        os.path.join(folder, f"{i}.jpg"), quality=90)
    names.append(f"{i}.jpg")
  path = os.path.join(folder, "pairs.csv")
  with open(path, "w") as f:
    f.write("a,b\n")
    f.writelines(f"{names[i]},{names[(i + 1) % n]}\n" for i in range(n))
  return path


def transformers_scores(model, processor, table, batch):
  """The reference: cosines of the table's pairs, each image embedded once."""
  paths = list(dict.fromkeys(p for ab in zip(table.a, table.b) for p in ab))
  emb = {}
  with torch.inference_mode():
    for i in range(0, len(paths), batch):
      part = paths[i:i + batch]
      pix = processor(images=[Image.open(p) for p in part],
                      return_tensors="pt")["pixel_values"]
      out = torch.nn.functional.normalize(
          model(pixel_values=pix).pooler_output, dim=-1)
      emb.update(zip(part, out))
  return np.array([float(emb[a] @ emb[b]) for a, b in zip(table.a, table.b)])


def measure(variant="B/16", res=224, images=64, hw=(384, 512), batch=16,
            warmup=1, repeats=3):
  args = dict(variant=variant, res=res, images=images, hw=list(hw),
              batch=batch, warmup=warmup, repeats=repeats)
  arch = vit.Arch.from_variant(variant, res)
  with tempfile.TemporaryDirectory() as tmp:
    npz = os.path.join(tmp, "tower.npz")
    bigvision.save(npz, model_lib.random_tower(arch), two_tower=False)
    hf_dir = NearID.load(npz).export(os.path.join(tmp, "hf"),
                                     format="hf-siglip")
    ours = NearID.load(hf_dir)
    theirs = transformers.SiglipVisionModel.from_pretrained(hf_dir).eval()
    processor = transformers.AutoImageProcessor.from_pretrained(hf_dir)
    table = score.read_pairs(write_images(tmp, images, hw))
    calls = {
        "score": lambda: score.score_table(ours, table, batch),
        "transformers": lambda: transformers_scores(theirs, processor, table,
                                                    batch)}
    # The first calls compile and check that both give the same scores.
    _, rows = calls["score"]()
    max_diff = float(np.abs(np.array([float(r["score"]) for r in rows]) -
                            calls["transformers"]()).max())
    times, peaks = common.time_with_peak(calls, warmup=max(warmup - 1, 0),
                                         repeats=repeats)
  results = {k: common.summarize(times[k]) for k in calls}
  return {"args": args, "flops_per_call": common.forward_flops(arch, images),
          "peaks": peaks, "threads": common.thread_notes(),
          "processor": type(processor).__name__,
          "max_abs_score_diff": max_diff, "results": results}


def rows(name="score", **kw):
  r = measure(**kw)
  a = r["args"]
  return [common.suite_row(
      name, f"{a['variant']}@{a['res']}, {a['images']} JPEGs "
      f"{a['hw'][0]}x{a['hw'][1]} in {a['images']} pairs, batch {a['batch']}",
      "nearid_jax.score (decode, resize, embed, cosine)", "img/s",
      a["images"], r["results"]["score"], flops=r["flops_per_call"],
      peaks=r["peaks"], ref=r["results"]["transformers"],
      ref_impl=f"transformers SiglipVisionModel + {r['processor']}",
      details=r)]


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--variant", default="B/16", help="NAME/PATCH, e.g. B/16")
  parser.add_argument("--res", type=int, default=224)
  parser.add_argument("--images", type=int, default=64)
  parser.add_argument("--batch", type=int, default=16)
  parser.add_argument("--warmup", type=int, default=1)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--json", help="also write the results here")
  args = parser.parse_args()
  common.set_torch_threads()
  row, = rows(variant=args.variant, res=args.res, images=args.images,
              batch=args.batch, warmup=args.warmup, repeats=args.repeats)
  r = row["details"]
  print(f"max |score - transformers' score|: {r['max_abs_score_diff']:.2e}")
  print(common.markdown_table(
      ["impl", "images/s", "s/call (best)", "CPU s/call (best)"],
      [[impl, f"{a['images'] / s['best_wall_s']:.1f}",
        f"{s['best_wall_s']:.2f}", f"{s['best_cpu_s']:.2f}"]
       for impl, s, a in ((row["impl"], r["results"]["score"], r["args"]),
                          (row["ref"], r["results"]["transformers"],
                           r["args"]))]))
  print(f"ratio: {row['ratio']:.2f}x (wall), {row['ratio_cpu']:.2f}x (CPU)")
  if args.json:
    common.write_json(args.json, row)


if __name__ == "__main__":
  main()
