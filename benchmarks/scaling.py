"""The R7 train step at scale, on paper, from its compiled program.

Run from the repository root, e.g.

  .venv/bin/python -m benchmarks.scaling [--variant So400m/14 --res 384 \
      --batch 128 --dtype bfloat16]

For each mesh of MESHES (8 and 32 simulated CPU devices, data-parallel and
with the tower's weights sharded 4 ways over `fsdp`) it compiles
`train.setup`'s step (random tower) in a process of its own per device
count (XLA reads the count once: `--devices N` is that process) and prints:

- per step and device, XLA's cost analysis of the compiled program (FLOPs,
  bytes accessed), taken from the unrolled tower: XLA counts a `while`
  body once, not once per trip;
- every kind of collective with its count and bytes per device per step,
  from the scanned tower's HLO, split into those inside the scanned layer
  (run once per layer) and those outside it;
- the projected step time and the whole recipe on the accelerators of
  HARDWARE (`project`; docs/scaling.md states the model), and the feature
  cache's size, write time and the epoch from which it pays (`cache_plan`).

How the HLO is read: the text is split into computations (`%name (...) ->
... {` up to the closing `}`, the entry one marked `ENTRY`). A `while`
instruction names its `body=%...` and, for a scan, carries its trip count
(`"known_trip_count":{"n":"27"}`). A collective is inside the layer when its
computation is the while body or one the body reaches through `calls=`,
`to_apply=`, `body=`, `condition=` or `branch_computations=`; it then runs
trip-count times per step. Its bytes are the sizes of its result shapes (all
of a tuple's), i.e. what lands on each device.
"""
import argparse
import collections
import json
import math
import os
import re
import subprocess
import sys

# Before JAX starts its backend: 8 simulated devices, unless the caller's
# XLA_FLAGS chose a count (tests/conftest.py does).
_DEVICES_FLAG = "--xla_force_host_platform_device_count"
_flags = os.environ.get("XLA_FLAGS", "")
if _DEVICES_FLAG not in _flags:
  os.environ["XLA_FLAGS"] = f"{_flags} {_DEVICES_FLAG}=8".strip()

# pylint: disable=g-import-not-at-top
import jax
import numpy as np

from configs.common import training_config
from nearid_jax import sharding
from nearid_jax import vit
from nearid_jax.model import NearID
from nearid_jax.training import train
# pylint: enable=g-import-not-at-top

# {device count: meshes}: data-parallel, and the tower's weights 4 ways.
MESHES = {8: ((("data", 8),), (("data", 2), ("fsdp", 4))),
          32: ((("data", 32),), (("data", 8), ("fsdp", 4)))}
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all",
               "collective-permute")
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2,
                "bf16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8,
                "f64": 8}
_HEADER = re.compile(r"^(?:ENTRY )?%([\w.\-]+) .*\{$")
_INSTR = re.compile(r"^\s*(?:ROOT )?%[\w.\-]+ = (.+?) ([a-z\-]+)\(")
_CALLEE = re.compile(r"(?:calls|to_apply|body|condition)=%([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_SHAPE = re.compile(r"\b([a-z]+\d*)\[([\d,]*)\]")


def _computations(hlo):
  """HLO text -> {computation name: [instruction lines]}."""
  comps, name = {}, None
  for line in hlo.splitlines():
    head = _HEADER.match(line)
    if head:
      name = head.group(1)
      comps[name] = []
    elif line == "}":
      name = None
    elif name is not None:
      comps[name].append(line)
  return comps


def _callees(line):
  names = _CALLEE.findall(line)
  for group in _BRANCHES.findall(line):
    names += [n.strip().lstrip("%") for n in group.split(",")]
  return names


def _reach(comps, root):
  seen, todo = set(), [root]
  while todo:
    c = todo.pop()
    if c not in seen and c in comps:
      seen.add(c)
      todo += [n for line in comps[c] for n in _callees(line)]
  return seen


def shape_bytes(result_type):
  """`f32[24,16]{1,0}` or a tuple of such -> bytes of all its arrays."""
  return sum(_DTYPE_BYTES[dtype] * math.prod(int(d) for d in dims.split(",")
                                             if d)
             for dtype, dims in _SHAPE.findall(result_type))


def collectives(hlo):
  """Compiled HLO text -> [{"op", "bytes", "in_layer", "times"}], one entry
  per collective instruction; `times` is how often one step runs it (the
  trip count of the layer loop it is in, else 1). `-start` forms count as
  their op (their `-done` halves are not counted again)."""
  comps = _computations(hlo)
  layer = {}  # computation -> trip count of the while loop that runs it
  for lines in comps.values():
    for line in lines:
      body = re.search(r" while\(.*body=%([\w.\-]+)", line)
      if body:
        trips = re.search(r'"known_trip_count":\{"n":"(\d+)"\}', line)
        for c in _reach(comps, body.group(1)):
          layer[c] = int(trips.group(1)) if trips else 1
  found = []
  for name, lines in comps.items():
    for line in lines:
      m = _INSTR.match(line)
      if not m:
        continue
      op = m.group(2).removesuffix("-start")
      if op in COLLECTIVES:
        found.append({"op": op, "bytes": shape_bytes(m.group(1)),
                      "in_layer": name in layer,
                      "times": layer.get(name, 1)})
  return found


def table(found):
  """-> {(op, "layer" | "outside"): (count per step, bytes per step)}."""
  out = collections.defaultdict(lambda: [0, 0])
  for c in found:
    row = out[(c["op"], "layer" if c["in_layer"] else "outside")]
    row[0] += c["times"]
    row[1] += c["times"] * c["bytes"]
  return {k: tuple(v) for k, v in sorted(out.items())}


def config_for(variant, res, batch, dtype="float32"):
  c = training_config()
  c.model.variant, c.model.res, c.model.scan = variant, res, True
  c.model.dtype = dtype
  c.input.batch_size = batch
  return c


def compiled_step(config, mesh):
  """train.setup's step compiled for `mesh`, from its arguments' shapes:
  nothing is placed on the devices (32 copies of So400m would not fit)."""
  model = NearID.from_config(config)
  state, tx = train.create_train_state(config, model.params["head"])
  frozen = model.params["img"]
  step = train.jit_train_step(train.make_train_step(model, tx, config, mesh),
                              mesh, frozen, model)
  frozen, state = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), (frozen, state))
  b, r = config.input.batch_size, config.model.res
  images = jax.ShapeDtypeStruct((b, 3, r, r, 3), np.uint8,
                                sharding=sharding.batch_sharding(mesh))
  masks = jax.ShapeDtypeStruct((b, 3), np.bool_,
                               sharding=sharding.batch_sharding(mesh))
  batch = {"views": images, "distractors": images, "view_mask": masks,
           "distractor_mask": masks}
  return step.lower(frozen, state, batch).compile()


def compiled_step_hlo(config, mesh):
  """train.setup's step compiled for `mesh` -> its HLO text."""
  return compiled_step(config, mesh).as_text()


def cost(compiled):
  """-> (FLOPs, bytes accessed) per device of a compiled program."""
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):  # one entry per program
    analysis = analysis[0]
  return analysis["flops"], analysis["bytes accessed"]


def measure(config, spec):
  """One mesh: cost per device (unrolled tower) and collectives (scanned)."""
  mesh = sharding.make_mesh(spec)
  config = config.copy_and_resolve_references()
  config.model.scan = False
  flops, nbytes = cost(compiled_step(config, mesh))
  config.model.scan = True
  rows = table(collectives(compiled_step_hlo(config, mesh)))
  return {"mesh": [list(a) for a in spec], "devices": mesh.size,
          "flops": flops, "bytes": nbytes,
          "collectives": [[op, where, n, b] for (op, where), (n, b)
                          in rows.items()]}


# --- projection (docs/scaling.md states the model)

# Per chip: peak dense bf16 FLOP/s, HBM bytes/s, and interconnect bytes/s one
# way (what a ring moves through each chip). Sources in docs/scaling.md.
Hardware = collections.namedtuple("Hardware", "chips peak hbm link")
HARDWARE = {
    "TPU v5e-16": Hardware(16, 197e12, 819e9, 200e9),
    "TPU v4-32": Hardware(16, 275e12, 1200e9, 200e9),  # 32 TensorCores
    "8x H100 SXM": Hardware(8, 989e12, 3.35e12, 450e9),
    "1x A100 SXM": Hardware(1, 312e12, 2.039e12, 0.),
}
RELEASE_A100_HOURS = 6.5  # SPEC.md §6: one A100, fp16
MFU = 0.5  # assumed fraction of peak FLOP/s the step reaches
# Bytes each device sends (= receives) per byte of a collective's result,
# ring algorithms at their large-group bound: an all-reduce reduce-scatters
# then all-gathers (2x); an all-gather or all-to-all moves its result once.
RING = {"all-reduce": 2., "all-gather": 1., "all-to-all": 1.,
        "collective-permute": 1.}
# R7's data (SPEC.md §4, docs/benchmarks.md): the training split's views and
# the 7 sources' distractors; MTG's train rows x 4 images (views, edits),
# about 4,900 rows as the recipe's 11 epochs of 3,300 steps x 128 groups
# imply (18,786 + 4 x MTG rows = 38,400 groups an epoch).
CACHE_IMAGES = 56_358 + 238_552 + 4 * 4_900
EPOCHS = 11


def ring_bytes(found_rows):
  """[[op, where, count, bytes]] -> bytes each device sends per step."""
  unknown = {r[0] for r in found_rows} - set(RING)
  if unknown:
    raise ValueError(f"no ring factor for {sorted(unknown)} (RING)")
  return sum(RING[op] * b for op, _, _, b in found_rows)


def per_device(values, n):
  """{devices: per-device value} at two counts -> a + b / n at n devices.

  A per-device cost is a replicated part (the head's update, the weights
  each device reads) plus a part split over the batch; two counts fix both.
  """
  (n1, v1), (n2, v2) = sorted(values.items())
  b = (v1 - v2) / (1 / n1 - 1 / n2)
  return v1 - b / n1 + b / n


def step_time(flops, nbytes, comm, hw, mfu=MFU):
  """Seconds of one step on `hw` from per-chip FLOPs, HBM bytes and bytes
  sent in collectives: max(compute, HBM) + collectives (not overlapped)."""
  t = {"compute": flops / (hw.peak * mfu), "hbm": nbytes / hw.hbm,
       "comm": comm / hw.link if hw.chips > 1 else 0.}
  t["step"] = max(t["compute"], t["hbm"]) + t["comm"]
  t["step_compute"] = t["compute"] + t["comm"]  # were HBM never the bound
  return t


def layout(spec):
  return "data x fsdp" if any(a == "fsdp" for a, _ in spec) else "data"


def project(measured, steps, mfu=MFU):
  """Measured meshes -> [{hardware, layout, step times, recipe hours}]."""
  by_layout = collections.defaultdict(dict)
  for m in measured:
    by_layout[layout(m["mesh"])][m["devices"]] = m
  out = []
  for name, hw in HARDWARE.items():
    for lay, ms in sorted(by_layout.items()):
      fsdp = math.prod(n for a, n in next(iter(ms.values()))["mesh"]
                       if a == "fsdp")
      if hw.chips < fsdp:
        continue  # one chip has no fsdp axis
      at = lambda key, ms=ms: per_device(
          {n: key(m) for n, m in ms.items()}, hw.chips)
      t = step_time(at(lambda m: m["flops"]), at(lambda m: m["bytes"]),
                    at(lambda m: ring_bytes(m["collectives"])), hw, mfu)
      hours = steps * t["step"] / 3600
      out.append({"hardware": name, "chips": hw.chips, "layout": lay, **t,
                  "hours": hours, "chip_hours": hours * hw.chips,
                  "hours_compute": steps * t["step_compute"] / 3600})
  return out


def cache_plan(step_flops, images_per_step, steps, token_bytes, mfu=MFU):
  """The feature cache on each accelerator, data-parallel.

  step_flops: one step's FLOPs over all devices; a forward is costed at
  step_flops / images_per_step (the head's share included). token_bytes:
  one image's tokens on disk. Returns [{hardware, forward images/s, write
  hours, uncached epoch hours, read GB/s at which a cached epoch is as fast
  as an uncached one}] and the epoch from which the cache pays.
  """
  forward = step_flops / images_per_step
  epoch_images = images_per_step * steps / EPOCHS
  rows = []
  for name, hw in HARDWARE.items():
    rate = hw.chips * hw.peak * mfu / forward
    rows.append({"hardware": name, "rate": rate,
                 "write_hours": CACHE_IMAGES / rate / 3600,
                 "epoch_hours": epoch_images / rate / 3600,
                 "break_even_gbs": rate * token_bytes / 1e9})
  # The head's work is the same cached or not, so the tower's forwards
  # decide: the cache costs CACHE_IMAGES of them, an epoch epoch_images.
  return rows, math.ceil(CACHE_IMAGES / epoch_images)


def _run_counts(args):
  """Each device count of MESHES measured in a process of its own."""
  out = []
  for n in MESHES:
    flags = re.sub(rf"{_DEVICES_FLAG}=\d+", "", os.environ.get("XLA_FLAGS",
                                                                ""))
    env = {**os.environ, "XLA_FLAGS": f"{flags} {_DEVICES_FLAG}={n}".strip()}
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.scaling", "--devices", str(n),
         "--variant", args.variant, "--res", str(args.res), "--batch",
         str(args.batch), "--dtype", args.dtype], env=env, check=True,
        stdout=subprocess.PIPE, text=True)
    out += json.loads(proc.stdout.splitlines()[-1])
  return out


def _print_tables(measured, config):
  steps, images = config.total_steps, config.input.batch_size * 6
  print("| devices | mesh | TFLOP per device | GB accessed per device | "
        "TFLOP per step, all devices |\n|---|---|---|---|---|")
  for m in measured:
    print(f"| {m['devices']} | `{tuple(map(tuple, m['mesh']))}` | "
          f"{m['flops'] / 1e12:,.2f} | {m['bytes'] / 1e9:,.1f} | "
          f"{m['flops'] * m['devices'] / 1e12:,.1f} |")
  print("\n| devices | mesh | collective | where | per step | "
        "MiB per device per step |\n|---|---|---|---|---|---|")
  for m in measured:
    for op, where, count, nbytes in m["collectives"]:
      print(f"| {m['devices']} | `{tuple(map(tuple, m['mesh']))}` | {op} | "
            f"{where} | {count} | {nbytes / 2**20:,.2f} |")
  print(f"\nProjection, MFU {MFU:.0%}, {steps:,} steps:\n")
  print("| hardware | chips | layout | compute s | HBM s | collectives s | "
        "step s | recipe h | chip-hours | recipe h, compute-bound |\n"
        "|---|---|---|---|---|---|---|---|---|---|")
  for r in project(measured, steps):
    print(f"| {r['hardware']} | {r['chips']} | {r['layout']} | "
          f"{r['compute']:.3f} | {r['hbm']:.3f} | {r['comm']:.4f} | "
          f"{r['step']:.3f} | {r['hours']:.2f} | {r['chip_hours']:.1f} | "
          f"{r['hours_compute']:.2f} |")
  step_flops = next(m["flops"] * m["devices"] for m in measured
                    if layout(m["mesh"]) == "data")
  release_mfu = step_flops * steps / (
      HARDWARE["1x A100 SXM"].peak * RELEASE_A100_HOURS * 3600)
  print(f"\nRelease: {RELEASE_A100_HOURS} A100-hours for {steps:,} steps of "
        f"{step_flops / 1e12:,.0f} TFLOP = {release_mfu:.0%} of the A100's "
        "bf16/fp16 peak.")
  token_shape = _token_shape(config)
  print(f"\nFeature cache: {CACHE_IMAGES:,} images x {token_shape[0]} "
        f"tokens x {token_shape[1]}")
  for dtype, itemsize in (("bfloat16", 2), ("float8_e4m3fn", 1)):
    size = CACHE_IMAGES * math.prod(token_shape) * itemsize
    print(f"- {dtype}: {size / 1e9:,.0f} GB")
  rows, pays = cache_plan(step_flops, images, steps, math.prod(token_shape) * 2)
  print(f"- pays from epoch {pays} on every accelerator\n")
  print("| hardware | forwards/s | write h | uncached epoch h (tower) | "
        "read GB/s to break even, bf16 / float8 |\n|---|---|---|---|---|")
  for r in rows:
    print(f"| {r['hardware']} | {r['rate']:,.0f} | {r['write_hours']:.2f} | "
          f"{r['epoch_hours']:.2f} | {r['break_even_gbs']:.1f} / "
          f"{r['break_even_gbs'] / 2:.1f} |")


def _token_shape(config):
  arch = vit.Arch.from_variant(config.model.variant, config.model.res)
  return arch.num_patches, arch.width


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--variant", default="So400m/14")
  parser.add_argument("--res", type=int, default=384)
  parser.add_argument("--batch", type=int, default=128, help="groups of 6")
  parser.add_argument("--dtype", default="bfloat16",
                      help="the frozen tower's compute dtype (R7's)")
  parser.add_argument("--devices", type=int, default=0,
                      help="measure this count's meshes (XLA_FLAGS must "
                      "set it) and print them as JSON")
  args = parser.parse_args(argv)
  config = config_for(args.variant, args.res, args.batch, args.dtype)
  if args.devices:
    if len(jax.devices()) != args.devices:
      raise ValueError(f"--devices {args.devices}: JAX sees "
                       f"{len(jax.devices())} (set {_DEVICES_FLAG})")
    print(json.dumps([measure(config, spec)
                      for spec in MESHES[args.devices]]))
    return
  print(f"{args.variant}@{args.res}, global batch {args.batch} groups x 6 "
        f"images, tower in {args.dtype}\n")
  _print_tables(_run_counts(args), config)


if __name__ == "__main__":
  main()
