"""Embedding throughput: our jitted JAX forward vs transformers' PyTorch model.

Run from the repository root, e.g.

  .venv/bin/python -m benchmarks.embed_throughput --variant B/16 --res 224 \
      --batch 8 --dtype float32 [--json out.json]

Both models hold the same random weights: `random_init.random_tower` written
as a big_vision .npz and read with `NearID.load`, then exported with
`NearID.export(format="hf-siglip")` and read with
`transformers.SiglipVisionModel.from_pretrained`. Both get the same
preprocessed input in [-1, 1] (NHWC for JAX, NCHW for torch), so the timings
are the forward pass alone: `model._forward(params, x)` and
`SiglipVisionModel(pixel_values=x)` under `torch.inference_mode()`, eager and,
unless --no-compile, `torch.compile`d. Achieved FLOP/s (forward_flops) are
against the float32 matmul peak of jnp.dot and torch.mm timed between the
models' calls in the same run; the last column does the same per CPU-second,
which holds still on a machine shared with other jobs. torch gets one thread
per usable core; XLA:CPU does so by default. `taskset -c 0 ...` runs both on
one core.
"""
import argparse
import dataclasses
import os
import tempfile
import time

import jax
import numpy as np
import torch
import transformers

from benchmarks import common
from nearid_jax import random_init
from nearid_jax import vit
from nearid_jax.formats import bigvision
from nearid_jax.model import NearID

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
SCAN = {"default": None, "scanned": True, "unrolled": False}


def forward_flops(arch, batch):
  """Analytic FLOPs of one forward pass (tower + MAP head) on `batch` images.

  A multiply-add counts 2 FLOPs; only matmul-like work is counted (LayerNorm,
  softmax, GELU, biases and residual adds are a few percent and left out).
  With N = patches, D = width, M = MLP width, p = patch size, per image:

    patch embedding (a stride-p conv = a matmul): 2 * N * (3 p^2) * D
    each of the `depth` blocks:
      q, k, v and out projections:  4 * 2 * N * D^2
      scores q k^T (all heads):     2 * N^2 * D
      weighted sum of values:       2 * N^2 * D
      MLP (D -> M -> D):            2 * 2 * N * D * M
    MAP head (one probe query attending over the N tokens):
      q and out projections of the probe:  2 * 2 * D^2
      k and v projections of the tokens:   2 * 2 * N * D^2
      scores and weighted sum:             2 * 2 * N * D
      MLP on the probe:                    2 * 2 * D * M
  """
  n, d, m, p = arch.num_patches, arch.width, arch.mlp_dim, arch.patch_size
  embed = 2 * n * 3 * p * p * d
  block = 8 * n * d * d + 4 * n * n * d + 4 * n * d * m
  head = 4 * d * d + 4 * n * d * d + 4 * n * d + 4 * d * m
  return batch * (embed + arch.depth * block + head)


def build_models(arch, dtype, scan, workdir):
  """Same random weights in our NearID and a transformers SiglipVisionModel."""
  npz = os.path.join(workdir, "tower.npz")
  bigvision.save(npz, random_init.random_tower(arch), two_tower=False)
  ours = NearID.load(npz, dtype=dtype, scan=scan)
  hf_dir = ours.export(os.path.join(workdir, "hf"), format="hf-siglip")
  theirs = transformers.SiglipVisionModel.from_pretrained(hf_dir).eval()
  return ours, theirs.to(TORCH_DTYPES[dtype])


def torch_calls(model, x, try_compile):
  """{name: call} for eager (and compiled) torch, their labels, compile note."""
  calls = {"torch": lambda: model(pixel_values=x)}
  attn = model.config._attn_implementation  # pylint: disable=protected-access
  labels = {"torch": f"PyTorch SiglipVisionModel (eager, attn={attn})"}
  if not try_compile:
    return calls, labels, "not tried (--no-compile)"
  compiled = torch.compile(model)
  try:
    start = time.perf_counter()
    compiled(pixel_values=x)  # compiles
    note = f"used (inductor); first call {time.perf_counter() - start:.0f} s"
  except Exception as e:  # pylint: disable=broad-except
    first_line = str(e).splitlines()[0] if str(e) else ""
    return calls, labels, f"failed: {type(e).__name__}: {first_line}"
  calls["torch_compile"] = lambda: compiled(pixel_values=x)
  labels["torch_compile"] = "PyTorch SiglipVisionModel (torch.compile)"
  return calls, labels, note


def print_report(args, flops, peak, peak_cpu, notes, compile_note, max_diff,
                 labels, results, ratios):
  """The settings, the markdown table, every timing and the ratios."""
  print(f"\n{args.variant}@{args.res}, batch {args.batch}, {args.dtype}; "
        f"{flops / args.batch / 1e9:.2f} GFLOP per image (analytic)")
  print(f"CPU: {notes['cpu']}, {notes['cores']} cores, 1-min load avg "
        f"{notes['load_avg_1m']} at the end; torch threads "
        f"{notes['torch_threads']} (interop {notes['torch_interop_threads']}); "
        f"XLA_FLAGS={notes['XLA_FLAGS']!r} (XLA:CPU: one thread per core)")
  print(f"matmul peak ({common.MATMUL_N}^3 float32, best call, timed between "
        f"the models' calls): jnp.dot {peak['jnp.dot'] / 1e9:.1f} GFLOP/s, "
        f"torch.mm {peak['torch.mm'] / 1e9:.1f} GFLOP/s -> peak "
        f"{peak['peak'] / 1e9:.1f} GFLOP/s")
  print(f"the same per CPU-second (all threads): {peak_cpu['peak'] / 1e9:.1f} "
        "GFLOP/CPU-s, the reference of the last column, which a busy "
        "machine barely moves")
  print(f"torch.compile: {compile_note}")
  print(f"max |JAX - PyTorch| over the embeddings: {max_diff:.2e}")
  print(f"best of {args.repeats} interleaved calls each, after {args.warmup} "
        "warm-up calls\n")
  print(common.markdown_table(
      ["impl", "images/s", "ms/batch", "GFLOP/s", "% of peak",
       "% of peak by CPU time"],
      [[labels[k], f"{r['images_per_s']:.2f}", f"{1e3 * r['best_wall_s']:.0f}",
        f"{r['gflops_per_s']:.1f}", f"{r['pct_of_peak']:.0f}",
        f"{r['pct_of_peak_cpu']:.0f}"] for k, r in results.items()]))
  print()
  for k, r in results.items():
    print(f"{k}: wall s/batch {r['all_wall_s']} (median "
          f"{r['median_wall_s']:.3f}); "
          f"CPU s/batch best {r['best_cpu_s']:.3f}")
  for k, v in ratios.items():
    print(f"ratio {k}: {v:.2f}x")


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--variant", default="B/16", help="NAME/PATCH, e.g. B/16")
  parser.add_argument("--res", type=int, default=224)
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--dtype", default="float32",
                      choices=sorted(TORCH_DTYPES),
                      help="compute dtype of both models")
  parser.add_argument("--scan", choices=sorted(SCAN), default="default",
                      help="block layout of our tower (default: NearID.load's)")
  parser.add_argument("--warmup", type=int, default=2,
                      help="untimed calls of each model first (at least 1)")
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--no-compile", action="store_true",
                      help="skip the torch.compile run")
  parser.add_argument("--json", help="also write the results here")
  args = parser.parse_args()

  common.set_torch_threads()
  arch = vit.Arch.from_variant(args.variant, args.res)
  flops = forward_flops(arch, args.batch)
  with tempfile.TemporaryDirectory() as workdir:
    ours, theirs = build_models(arch, args.dtype, SCAN[args.scan], workdir)
  shape = (args.batch, arch.image_size, arch.image_size, 3)
  x = np.random.default_rng(0).uniform(-1, 1, shape).astype(np.float32)
  x_jax = jax.device_put(x)
  x_torch = torch.from_numpy(x.transpose(0, 3, 1, 2).copy()).to(
      TORCH_DTYPES[args.dtype])
  forward = ours._forward  # pylint: disable=protected-access

  with torch.inference_mode():
    # Same weights, same input: else the two timings would not compare. These
    # are also the first warm-up call of each (compile's first call is its).
    emb = np.asarray(forward(ours.params, x_jax))
    ref = theirs(pixel_values=x_torch).pooler_output.float()
    max_diff = float(np.abs(
        emb - torch.nn.functional.normalize(ref, dim=-1).numpy()).max())
    calls, labels, compile_note = torch_calls(theirs, x_torch,
                                              not args.no_compile)
    calls = {"jax": lambda: forward(ours.params, x_jax).block_until_ready(),
             **calls}
    labels["jax"] = (f"JAX nearid_jax (jit, "
                     f"{'scanned' if ours.scan else 'unrolled'} blocks)")
    matmuls = common.matmul_calls()
    for call in matmuls.values():  # their warm-up call; the models had theirs
      call()
    times = common.time_calls({**calls, **matmuls},
                              warmup=max(args.warmup - 1, 0),
                              repeats=args.repeats)
  peak = common.peak_flops(times)
  peak_cpu = common.peak_flops(times, "cpu_s")

  results = {}
  for name in calls:
    r = common.summarize(times[name])
    r.update(images_per_s=args.batch / r["best_wall_s"],
             gflops_per_s=flops / r["best_wall_s"] / 1e9,
             pct_of_peak=100 * flops / r["best_wall_s"] / peak["peak"],
             pct_of_peak_cpu=100 * flops / r["best_cpu_s"] / peak_cpu["peak"])
    results[name] = r
  ratios = {}
  for k, r in results.items():
    if k != "jax":
      ratios[f"JAX/{k} images/s"] = (results["jax"]["images_per_s"] /
                                     r["images_per_s"])
      ratios[f"JAX/{k} by CPU time"] = r["best_cpu_s"] / results["jax"][
          "best_cpu_s"]
  notes = common.thread_notes()
  print_report(args, flops, peak, peak_cpu, notes, compile_note, max_diff,
               labels, results, ratios)
  if args.json:
    common.write_json(args.json, {
        "args": vars(args), "arch": dataclasses.asdict(arch),
        "flops_per_batch": flops, "peak_flops": peak,
        "peak_flops_per_cpu_s": peak_cpu, "threads": notes,
        "torch_compile": compile_note, "impls": labels,
        "max_abs_diff": max_diff, "results": results, "ratios": ratios})


if __name__ == "__main__":
  main()
