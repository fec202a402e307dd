"""Accelerator benchmark: the R7 recipe's compute on one chip, against the
chip's bf16 peak and against PyTorch on the same chip, in one run.

Run from the repository root:

  .venv/bin/python -m benchmarks.accelerator [--out F] [--parts forward,train]
  .venv/bin/python -m benchmarks.accelerator --quick --out /tmp/x.json

It prints a table and writes benchmarks/results/<device kind>.json (--out),
rewritten after every part, so that a part that fails or a run cut short
keeps what was measured. Each part runs on the first device, with a random
So400m/14@384 tower in bf16 (configs/nearid_r7.py with model.init = ""):

  forward       frozen forward, tower + MAP head, --batch uint8 images
                (model.forward): images/s and MFU
  train         the R7 train step (train.make_train_step, jitted as
                training jits it) on --groups groups x 6 images, the
                gradient on the head only: images/s and MFU
  cached_step   the same step on the groups' tower tokens in bf16, as the
                feature cache serves them: groups/s
  cache_write   feature_cache.write's work per batch of --write_batch
                images, without decoding them: the jitted tower to bf16
                tokens, their copy to the host and one ArrayRecord record
                per image (to a temporary file): images/s
  retrieval     exact top-10 (retrieval.topk) of --queries queries over a
                --gallery x 1152 float32 gallery on the device
                (retrieval.prepare_gallery, made once), for each of
                --blocks: queries/s of the best block
  torch_forward transformers' SiglipVisionModel, same weights (NearID
                .export), bf16, SDPA attention, under inference_mode
  torch_train   the release-style step: the tower under torch.no_grad,
                MAP head + two-tier loss in float32, AdamW
                (train_throughput.torch_steps, eager)

Sizes that do not fit (out of memory) are halved until they do; the JSON
says which ran. MFU = FLOPs per call / best call / the device's dense bf16
peak (PEAK_TFLOPS; blank for a device not in it). The FLOPs are XLA's cost
analysis of the same program written with the plain attention (the
model's FLOPs, whatever kernel runs them: XLA does not count inside
cuDNN's custom calls), or else the analytic forward count
(common.forward_flops); the JSON says which.

On a GPU, JAX needs its CUDA build: `pip install "jax[cuda12]==0.10.2"`
in .venv. The PyTorch parts need a CUDA build of torch==2.13.0 (PyTorch's
own wheel index, https://download.pytorch.org/whl/); with the CPU build of
requirements-test.txt they are skipped, saying so. --quick runs tiny sizes
on any backend (tests/test_benchmarks.py runs it on the CPU): its numbers
mean nothing.
"""
import argparse
import gc
import os
import re
import tempfile
import time

from array_record.python import array_record_module
import jax
import jax.numpy as jnp
import numpy as np

import configs.nearid_r7
from benchmarks import common
from nearid_jax import kernels
from nearid_jax import model as model_lib
from nearid_jax import retrieval
from nearid_jax import sharding
from nearid_jax import vit
from nearid_jax.training import feature_cache
from nearid_jax.training import train

SLOTS = 6  # images per group
# Dense (no sparsity) bf16 peaks in TFLOP/s, from the vendors' datasheets:
# (what device_kind contains, lower case; a name; the peak). First match.
PEAK_TFLOPS = (
    (("h100", "pcie"), "H100 PCIe", 756),
    (("h100", "nvl"), "H100 NVL", 835),
    (("h100",), "H100 SXM", 989),
    (("h200",), "H200", 989),
    (("a100",), "A100", 312),
    (("tpu v4",), "TPU v4", 275),
    (("tpu v5 lite",), "TPU v5e", 197),
    (("tpu v5e",), "TPU v5e", 197),
    (("tpu v5",), "TPU v5p", 459),
    (("tpu v6",), "TPU v6e", 918),
)
PARTS = ("torch_forward", "torch_train", "forward", "train", "cached_step",
         "cache_write", "retrieval")
# The targets on one H100: (part, key, threshold, what).
TARGETS = (("forward", "mfu", 0.55, "frozen forward, bf16 MFU"),
           ("train", "ratio", 1.3, "train step, images/s over PyTorch's"))
FULL = dict(variant="So400m/14", res=384, batch=256, groups=128,
            write_batch=256, gallery=1_000_000, dim=1152, queries=1024,
            blocks="4096,32768", warmup=2, repeats=5)
QUICK = dict(variant="mu/14", res=28, batch=4, groups=2, write_batch=4,
             gallery=2000, dim=32, queries=16, blocks="512", warmup=1,
             repeats=1)


def peak(device_kind):
  """(name, dense bf16 TFLOP/s) of a jax device_kind, or (None, None)."""
  kind = device_kind.lower()
  for words, name, tflops in PEAK_TFLOPS:
    if all(w in kind for w in words):
      return name, tflops
  return None, None


def slug(device_kind):
  """"NVIDIA H100 80GB HBM3" -> "nvidia-h100-80gb-hbm3"."""
  return re.sub(r"[^a-z0-9]+", "-", device_kind.lower()).strip("-")


def _first_line(e):
  return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"


def _oom(e):
  text = str(e)
  return "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower()


def fit(run, size, what):
  """run(size) -> its result with "size", halving size on out-of-memory."""
  while True:
    try:
      return {**run(size), "size": size}
    except Exception as e:  # pylint: disable=broad-except
      if size <= 1 or not _oom(e):
        raise
      print(f"{what}: {size} does not fit ({_first_line(e)[:200]}); "
            f"trying {size // 2}", flush=True)
      size //= 2
      gc.collect()


def timed(fn, count, warmup, repeats, sync=None):
  """common.time_calls of fn -> summary + "rate" (count per best second)."""
  call = fn if sync is None else lambda: (fn(), sync())
  s = common.summarize(common.time_calls({"f": call}, warmup=warmup,
                                         repeats=repeats)["f"])
  return {"rate": count / s["best_wall_s"], "ms": 1e3 * s["best_wall_s"],
          "median_ms": 1e3 * s["median_wall_s"], "all_wall_s": s[
              "all_wall_s"]}


def compile_(jitted, *args):
  """jitted.lower(*args).compile() -> (compiled, seconds)."""
  start = time.perf_counter()
  compiled = jitted.lower(*args).compile()
  return compiled, time.perf_counter() - start


def xla_flops(jitted, *args):
  """FLOPs of jitted(*args) by XLA's cost analysis of its lowering."""
  cost = jitted.lower(*args).cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost["flops"])


class Bench:
  """The run's model, device, settings and results."""

  def __init__(self, args):
    self.args = args
    self.device = jax.devices()[0]
    self.mesh = sharding.make_mesh((("data", 1),), [self.device])
    self.backend = jax.default_backend()
    self.config = configs.nearid_r7.get_config("")  # a random tower
    m = self.config.model
    m.variant, m.res, m.kernels = args.variant, args.res, args.kernels
    self.attention = self._attention()
    start = time.perf_counter()
    self.model = model_lib.NearID.from_config(self.config)
    # The same model with the plain attention: the FLOPs to count.
    self.plain = model_lib.NearID(
        self.model.arch, self.model.params, dtype=m.dtype,
        scan=self.model.scan, kernels="plain")
    put = lambda x: jax.device_put(x, sharding.replicated(self.mesh))
    self.params = put(self.model.params)
    self.frozen = self.params["img"]
    self.setup_s = time.perf_counter() - start
    self.peak_name, self.peak_tflops = peak(self.device.device_kind)
    self.results = {}

  def _attention(self):
    """Says which attention runs; on a GPU, falls back to the plain math
    (config.model.kernels) when cuDNN's refuses So400m's shapes."""
    m = self.config.model
    if kernels.choose(m.kernels, self.backend) != "gpu":
      return {"kernels": kernels.choose(m.kernels, self.backend)}
    arch = vit.Arch.from_variant(m.variant, m.res)
    dtype = model_lib.DTYPES[m.dtype]
    q = jnp.zeros((1, arch.num_patches, arch.num_heads, arch.head_dim), dtype)
    if not kernels.cudnn_takes(q):
      return {"kernels": "gpu", "impl": "xla",
              "why": f"no cuDNN flash attention for {m.dtype}, head dim "
                     f"{arch.head_dim} on {self.backend}"}
    try:
      jax.block_until_ready(jax.jit(kernels.gpu_attention)(q, q, q))
    except Exception as e:  # pylint: disable=broad-except
      m.kernels = "plain"
      print(f"cuDNN attention failed ({_first_line(e)}): plain attention",
            flush=True)
      return {"kernels": "plain", "why": _first_line(e)}
    return {"kernels": "gpu", "impl": "cudnn"}

  def flops(self, what, count, program, *args):
    """(FLOPs per call, how they were counted)."""
    try:
      return xla_flops(program, *args), "XLA cost analysis (plain attention)"
    except Exception as e:  # pylint: disable=broad-except
      print(f"{what}: no XLA cost analysis ({_first_line(e)}); analytic "
            "FLOPs", flush=True)
      return (common.forward_flops(self.model.arch, count),
              "analytic (common.forward_flops: forward only)")

  def mfu(self, r, flops, source):
    r.update(flops_per_call=flops, flops_source=source,
             tflops_per_s=flops / r["ms"] * 1e3 / 1e12)
    r["mfu"] = (r["tflops_per_s"] / self.peak_tflops if self.peak_tflops
                else None)
    return r

  def images(self, n, seed=0):
    res = self.model.arch.image_size
    x = jax.random.randint(jax.random.PRNGKey(seed), (n, res, res, 3), 0, 256)
    return jax.device_put(x.astype(jnp.uint8), self.device)

  def _state(self, config):
    state, tx = train.create_train_state(config, self.model.params["head"])
    return jax.device_put(state, sharding.replicated(self.mesh)), tx

  # --- the parts: each size -> results

  def forward(self, batch):
    m, a = self.model, self.args
    fwd = lambda mod: jax.jit(
        lambda p, x: model_lib.forward(mod.tower, mod.head, p, x),
        compiler_options=mod.compiler_options)
    x = self.images(batch)
    compiled, compile_s = compile_(fwd(m), self.params, x)
    r = timed(lambda: compiled(self.params, x).block_until_ready(), batch,
              a.warmup, a.repeats)
    r.update(unit="images/s", compile_s=compile_s)
    return self.mfu(r, *self.flops("forward", batch, fwd(self.plain),
                                   self.params, x))

  def _step(self, groups, batch, cached):
    config = self.config.copy_and_resolve_references()
    config.input.batch_size = groups
    state, tx = self._state(config)
    step = lambda mod: train.jit_train_step(
        train.make_train_step(mod, tx, config, self.mesh), self.mesh,
        self.frozen, mod)
    compiled, compile_s = compile_(step(self.model), self.frozen, state,
                                   batch)

    def call():
      nonlocal state
      state, metrics = compiled(self.frozen, state, batch)
      jax.block_until_ready(metrics)

    a = self.args
    r = timed(call, groups, a.warmup, a.repeats)
    r.update(compile_s=compile_s, groups=groups, images=groups * SLOTS)
    if cached:
      return {**r, "unit": "groups/s"}
    r["rate"] *= SLOTS
    r["unit"] = "images/s"
    return self.mfu(r, *self.flops("train", groups * SLOTS, step(self.plain),
                                   self.frozen, state, batch))

  def train(self, groups):
    res = self.model.arch.image_size
    batch = sharding.global_batch(common.random_batch(groups, res), self.mesh)
    return self._step(groups, batch, cached=False)

  def cached_step(self, groups):
    a = self.model.arch
    masks = common.random_batch(groups, 1)
    tokens = jax.random.normal(jax.random.PRNGKey(1),
                               (groups, SLOTS, a.num_patches, a.width),
                               jnp.bfloat16)
    batch = {"tokens": jax.device_put(tokens,
                                      sharding.batch_sharding(self.mesh)),
             **sharding.global_batch(
                 {k: masks[k] for k in ("view_mask", "distractor_mask")},
                 self.mesh)}
    return self._step(groups, batch, cached=True)

  def cache_write(self, batch):
    m = self.model
    forward = jax.jit(lambda p, x: model_lib.tower_tokens(
        m.tower, p, x).astype(jnp.bfloat16),
                      compiler_options=m.compiler_options)
    x = self.images(batch)
    compiled, compile_s = compile_(forward, self.frozen, x)
    options = feature_cache._WRITER_OPTIONS  # pylint: disable=protected-access
    with tempfile.TemporaryDirectory(prefix="accelerator_cache_") as tmp:
      path = os.path.join(tmp, "tokens.array_record")

      def call():
        tokens = np.asarray(compiled(self.frozen, x))
        writer = array_record_module.ArrayRecordWriter(path, options)
        for t in tokens:
          writer.write(t.tobytes())
        writer.close()

      a = self.args
      r = timed(call, batch, a.warmup, min(a.repeats, 3))
    return {**r, "unit": "images/s", "compile_s": compile_s,
            "bytes_per_image": m.arch.num_patches * m.arch.width * 2}

  def retrieval(self, gallery):
    a = self.args
    keys = jax.random.split(jax.random.PRNGKey(2), 2)
    items = retrieval.l2_normalize(
        jax.random.normal(keys[0], (gallery, a.dim), jnp.float32))
    # Queries near their own gallery items: each one's top hit is itself.
    queries = retrieval.l2_normalize(items[:a.queries] + 0.05 * (
        jax.random.normal(keys[1], (a.queries, a.dim), jnp.float32)))
    # The screen's gallery bounds once, outside the timing (as an index).
    prepared = retrieval.prepare_gallery(items)
    blocks = {}
    for block in (int(b) for b in a.blocks.split(",")):
      search = lambda b=block: jax.block_until_ready(
          retrieval.topk(queries, prepared, 10, block=b))
      blocks[block] = timed(search, a.queries, 1, min(a.repeats, 3))
      ids = np.asarray(search()[1])
      blocks[block]["self_hits"] = float(np.mean(
          ids[:, 0] == np.arange(a.queries)))
    best = max(blocks, key=lambda b: blocks[b]["rate"])
    return {**blocks[best], "unit": "queries/s", "block": best, "k": 10,
            "dim": a.dim, "queries": a.queries,
            "blocks": {str(b): r for b, r in blocks.items()}}

  # --- PyTorch on the same device

  def torch_device(self):
    """(torch, transformers, device) or a string: why there is none."""
    try:
      import torch  # pylint: disable=import-outside-toplevel
      import transformers  # pylint: disable=import-outside-toplevel
    except ImportError as e:
      return f"PyTorch reference skipped: {_first_line(e)}"
    if self.backend == "gpu":
      if not torch.cuda.is_available():
        return (f"PyTorch reference skipped: torch {torch.__version__} sees "
                "no CUDA device (a CPU build? see this module's docstring)")
      return torch, transformers, "cuda"
    if self.backend == "cpu":
      return torch, transformers, "cpu"
    return f"PyTorch reference skipped: no PyTorch on {self.backend}"

  def torch_model(self):
    """transformers' SiglipVisionModel with our weights, on the device in
    the tower's dtype with SDPA attention, or a string: why not."""
    found = self.torch_device()
    if isinstance(found, str):
      return found
    torch, transformers, device = found
    with tempfile.TemporaryDirectory(prefix="accelerator_hf_") as tmp:
      hf_dir = self.model.export(os.path.join(tmp, "hf"), format="hf-siglip")
      vision = transformers.SiglipVisionModel.from_pretrained(
          hf_dir, attn_implementation="sdpa").eval()
    dtype = getattr(torch, self.config.model.dtype)
    sync = torch.cuda.synchronize if device == "cuda" else None
    return torch, vision.to(device, dtype), sync

  def torch_forward(self, batch, found):
    torch, vision, sync = found
    p = next(vision.parameters())
    res = self.model.arch.image_size
    x = torch.rand(batch, 3, res, res, device=p.device).mul(2).sub(1).to(
        p.dtype)

    def call():
      with torch.inference_mode():
        vision(pixel_values=x)

    try:
      r = timed(call, batch, self.args.warmup, self.args.repeats, sync)
    except Exception:
      if p.device.type == "cuda":
        torch.cuda.empty_cache()
      raise
    return {**r, "unit": "images/s",
            "impl": "transformers SiglipVisionModel, "
                    f"{vision.config._attn_implementation}"}  # pylint: disable=protected-access

  def torch_train(self, groups, found):
    from benchmarks import train_throughput  # pylint: disable=import-outside-toplevel
    torch, vision, sync = found
    vision.head.float()  # the head trains in float32, as ours
    batch = common.random_batch(groups, self.model.arch.image_size)
    calls, labels, _ = train_throughput.torch_steps(vision, self.config,
                                                    batch, try_compile=False)
    try:
      r = timed(calls["torch"], groups * SLOTS, max(self.args.warmup - 1, 1),
                min(self.args.repeats, 3), sync)
    except Exception:
      if next(vision.parameters()).device.type == "cuda":
        torch.cuda.empty_cache()
      raise
    return {**r, "unit": "images/s", "groups": groups,
            "images": groups * SLOTS, "impl": labels["torch"]}


def run(bench, parts, write):
  """Runs `parts` in PARTS' order, each guarded; write() after each."""
  a, res = bench.args, bench.results
  sizes = {"forward": a.batch, "train": a.groups, "cached_step": a.groups,
           "cache_write": a.write_batch, "retrieval": a.gallery,
           "torch_forward": a.batch, "torch_train": a.groups}
  found = None
  for part in (p for p in PARTS if p in parts):
    print(f"\n#### {part}", flush=True)
    start = time.perf_counter()
    if not part.startswith("torch_") and found is not None:
      # PyTorch's parts run first; their memory goes before ours run.
      found = None
      gc.collect()
      _torch_empty_cache()
    try:
      if part.startswith("torch_"):
        if found is None:
          found = bench.torch_model()
        if isinstance(found, str):
          print(found, flush=True)
          res[part] = {"skipped": found}
          continue
        fn = lambda n, p=part: getattr(bench, p)(n, found)
      else:
        fn = getattr(bench, part)
      res[part] = fit(fn, sizes[part], part)
      print(", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                      for k, v in res[part].items()
                      if not isinstance(v, (dict, list))), flush=True)
    except Exception as e:  # pylint: disable=broad-except
      print(f"{part} failed: {_first_line(e)}", flush=True)
      res[part] = {"error": _first_line(e)}
    res[part]["seconds"] = round(time.perf_counter() - start, 1)
    write()


def _torch_empty_cache():
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError:
    return
  if torch.cuda.is_available():
    torch.cuda.empty_cache()


def ratios(results):
  """ours / PyTorch's rate of the parts both measured."""
  out = {}
  for ours, theirs in (("forward", "torch_forward"), ("train", "torch_train")):
    if "rate" in results.get(ours, {}) and "rate" in results.get(theirs, {}):
      out[ours] = results[ours]["rate"] / results[theirs]["rate"]
      results[ours]["ratio"] = out[ours]
  return out


def targets(results):
  out = []
  for part, key, threshold, what in TARGETS:
    value = results.get(part, {}).get(key)
    out.append({"target": f"{what} >= {threshold:g}", "value": value,
                "met": value is not None and value >= threshold})
  return out


def table(results):
  cells = []
  for part, r in results.items():
    if "rate" not in r:
      cells.append([part, "", "", "", "", "", "", r.get("skipped")
                    or r.get("error", "")])
      continue
    mfu = r.get("mfu")
    cells.append([
        part, f"{r['rate']:,.4g} {r['unit']}", r["size"], f"{r['ms']:.1f}",
        "" if mfu is None else f"{100 * mfu:.1f}%",
        f"{r['ratio']:.2f}x" if "ratio" in r else "",
        f"{r['compile_s']:.0f}" if "compile_s" in r else "",
        r.get("impl", r.get("flops_source", ""))])
  return common.markdown_table(
      ["part", "rate", "size", "ms/call (best)", "MFU", "ours/PyTorch",
       "compile s", "notes"], cells)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true",
                      help="tiny sizes, one timed call each: a smoke run "
                           "whose numbers mean nothing")
  parser.add_argument("--out", default="",
                      help="the JSON (default benchmarks/results/<device "
                           "kind>.json)")
  parser.add_argument("--parts", default=",".join(PARTS),
                      help="comma-separated subset of %(default)s")
  parser.add_argument("--kernels", default="auto", choices=kernels.KERNELS,
                      help="config.model.kernels (nearid_jax/kernels.py)")
  for name, value in FULL.items():
    parser.add_argument(f"--{name}", type=type(value), default=None,
                        help=f"default {value} ({QUICK[name]} with --quick)")
  args = parser.parse_args()
  for name, value in (QUICK if args.quick else FULL).items():
    if getattr(args, name) is None:
      setattr(args, name, value)
  parts = [p for p in args.parts.split(",") if p]
  unknown = sorted(set(parts) - set(PARTS))
  if unknown:
    parser.error(f"--parts: unknown {unknown}; choose from {','.join(PARTS)}")

  # Read when JAX starts its backend, below. On a GPU, JAX takes memory as
  # it needs it, leaving the rest to PyTorch's parts.
  os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
  if args.quick:
    common.quick_compiles()
  if common.torch is not None:
    common.set_torch_threads()
  start = time.perf_counter()
  bench = Bench(args)
  kind = bench.device.device_kind
  out = args.out or os.path.join("benchmarks", "results",
                                 f"{slug(kind)}.json")
  print(f"device: {kind} ({bench.backend}, {jax.device_count()} device(s); "
        f"the first runs everything); bf16 peak: "
        f"{bench.peak_tflops or 'unknown'} TFLOP/s ({bench.peak_name}); "
        f"model {args.variant}@{args.res} {bench.config.model.dtype}, "
        f"attention {bench.attention}; setup {bench.setup_s:.0f} s",
        flush=True)
  notes = common.thread_notes()

  def write():
    rs = ratios(bench.results)
    common.write_json(out, {
        "quick": args.quick, "args": vars(args),
        "device": {"kind": kind, "backend": bench.backend,
                   "count": jax.device_count(), "peak_name": bench.peak_name,
                   "peak_bf16_tflops": bench.peak_tflops},
        "model": f"{args.variant}@{args.res}",
        "dtype": bench.config.model.dtype, "attention": bench.attention,
        "setup_s": bench.setup_s, "notes": notes, "parts": bench.results,
        "ratios": rs, "targets": targets(bench.results),
        "seconds": round(time.perf_counter() - start, 1)})

  run(bench, parts, write)
  write()
  quick = " --quick: sizes not meaningful" if args.quick else ""
  print(f"\n#### {kind}, {args.variant}@{args.res} "
        f"{bench.config.model.dtype}{quick}; "
        f"{time.perf_counter() - start:.0f} s in all\n")
  print(table(bench.results))
  print()
  for t in targets(bench.results):
    value = "not measured" if t["value"] is None else f"{t['value']:.3g}"
    print(f"target {t['target']}: {value} -> "
          f"{'met' if t['met'] else 'NOT met'}")
  print(f"\nwrote {out}")


if __name__ == "__main__":
  main()
