"""Embedding throughput: our jitted JAX forward vs transformers' PyTorch model.

Run from the repository root, e.g.

  .venv/bin/python -m benchmarks.embed_throughput --variant B/16 --res 224 \
      --batch 8 --dtype float32 [--json out.json]

Both models hold the same random weights: `model_lib.random_tower` written
as a big_vision .npz and read with `NearID.load`, then exported with
`NearID.export(format="hf-siglip")` and read with
`transformers.SiglipVisionModel.from_pretrained`. Both get the same
preprocessed input in [-1, 1] (NHWC for JAX, NCHW for torch), so the timings
are the forward pass alone: `model._forward(params, x)` and
`SiglipVisionModel(pixel_values=x)` under `torch.inference_mode()`, eager and,
unless --no-compile, `torch.compile`d. Achieved FLOP/s (common.forward_flops) are
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
from nearid_jax import model as model_lib
from nearid_jax import vit
from nearid_jax.formats import bigvision
from nearid_jax.model import NearID

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
SCAN = {"default": None, "scanned": True, "unrolled": False}


def build_models(arch, dtype, scan, workdir):
  """Same random weights in our NearID and a transformers SiglipVisionModel."""
  npz = os.path.join(workdir, "tower.npz")
  bigvision.save(npz, model_lib.random_tower(arch), two_tower=False)
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


def print_report(r):
  """The settings, the markdown table, every timing and the ratios."""
  a, notes, peak, peak_cpu = (r["args"], r["threads"], r["peak_flops"],
                              r["peak_flops_per_cpu_s"])
  print(f"\n{a['variant']}@{a['res']}, batch {a['batch']}, {a['dtype']}; "
        f"{r['flops_per_batch'] / a['batch'] / 1e9:.2f} GFLOP per image "
        "(analytic)")
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
  print(f"torch.compile: {r['torch_compile']}")
  print(f"max |JAX - PyTorch| over the embeddings: {r['max_abs_diff']:.2e}")
  print(f"best of {a['repeats']} interleaved calls each, after {a['warmup']} "
        "warm-up calls\n")
  results = r["results"]
  print(common.markdown_table(
      ["impl", "images/s", "ms/batch", "GFLOP/s", "% of peak",
       "% of peak by CPU time"],
      [[r["impls"][k], f"{s['images_per_s']:.2f}",
        f"{1e3 * s['best_wall_s']:.0f}", f"{s['gflops_per_s']:.1f}",
        f"{s['pct_of_peak']:.0f}", f"{s['pct_of_peak_cpu']:.0f}"]
       for k, s in results.items()]))
  print()
  for k, s in results.items():
    print(f"{k}: wall s/batch {s['all_wall_s']} (median "
          f"{s['median_wall_s']:.3f}); "
          f"CPU s/batch best {s['best_cpu_s']:.3f}")
  for k, v in r["ratios"].items():
    print(f"ratio {k}: {v:.2f}x")


def measure(variant="B/16", res=224, batch=8, dtype="float32", scan="default",
            warmup=2, repeats=5, try_compile=True):
  """Builds both models, checks they agree, times them -> a results dict."""
  args = dict(variant=variant, res=res, batch=batch, dtype=dtype, scan=scan,
              warmup=warmup, repeats=repeats, compile=try_compile)
  arch = vit.Arch.from_variant(variant, res)
  flops = common.forward_flops(arch, batch)
  with tempfile.TemporaryDirectory() as workdir:
    ours, theirs = build_models(arch, dtype, SCAN[scan], workdir)
  shape = (batch, arch.image_size, arch.image_size, 3)
  x = np.random.default_rng(0).uniform(-1, 1, shape).astype(np.float32)
  x_jax = jax.device_put(x)
  x_torch = torch.from_numpy(x.transpose(0, 3, 1, 2).copy()).to(
      TORCH_DTYPES[dtype])
  forward = ours._forward  # pylint: disable=protected-access

  with torch.inference_mode():
    # Same weights, same input: else the two timings would not compare. These
    # are also the first warm-up call of each (compile's first call is its).
    emb = np.asarray(forward(ours.params, x_jax))
    ref = theirs(pixel_values=x_torch).pooler_output.float()
    max_diff = float(np.abs(
        emb - torch.nn.functional.normalize(ref, dim=-1).numpy()).max())
    calls, labels, compile_note = torch_calls(theirs, x_torch, try_compile)
    calls = {"jax": lambda: forward(ours.params, x_jax).block_until_ready(),
             **calls}
    labels["jax"] = (f"JAX nearid_jax (jit, "
                     f"{'scanned' if ours.scan else 'unrolled'} blocks)")
    times, (peak, peak_cpu) = common.time_with_peak(
        calls, warmup=max(warmup - 1, 0), repeats=repeats)

  results = {}
  for name in calls:
    s = common.summarize(times[name])
    s.update(images_per_s=batch / s["best_wall_s"],
             gflops_per_s=flops / s["best_wall_s"] / 1e9,
             pct_of_peak=100 * flops / s["best_wall_s"] / peak["peak"],
             pct_of_peak_cpu=100 * flops / s["best_cpu_s"] / peak_cpu["peak"])
    results[name] = s
  ratios = {}
  for k, s in results.items():
    if k != "jax":
      ratios[f"JAX/{k} images/s"] = (results["jax"]["images_per_s"] /
                                     s["images_per_s"])
      ratios[f"JAX/{k} by CPU time"] = s["best_cpu_s"] / results["jax"][
          "best_cpu_s"]
  return {"args": args, "arch": dataclasses.asdict(arch),
          "flops_per_batch": flops, "peak_flops": peak,
          "peak_flops_per_cpu_s": peak_cpu, "threads": common.thread_notes(),
          "torch_compile": compile_note, "impls": labels,
          "max_abs_diff": max_diff, "results": results, "ratios": ratios}


def rows(name="embed", **kw):
  """measure(**kw) as one suite row: JAX vs PyTorch's faster variant."""
  r = measure(**kw)
  a, results = r["args"], r["results"]
  ref = common.best_of(results, [k for k in results if k != "jax"])
  return [common.suite_row(
      name, f"{a['variant']}@{a['res']}, batch {a['batch']}, {a['dtype']}",
      r["impls"]["jax"], "img/s", a["batch"], results["jax"],
      flops=r["flops_per_batch"],
      peaks=(r["peak_flops"], r["peak_flops_per_cpu_s"]),
      ref=results[ref], ref_impl=r["impls"][ref], details=r)]


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
  common.add_timing_flags(parser, "model")
  args = parser.parse_args()

  common.set_torch_threads()
  r = measure(args.variant, args.res, args.batch, args.dtype, args.scan,
              args.warmup, args.repeats, not args.no_compile)
  print_report(r)
  if args.json:
    common.write_json(args.json, r)


if __name__ == "__main__":
  main()
