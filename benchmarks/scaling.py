"""Per-step collectives of the R7 train step on a simulated mesh, from its HLO.

Run from the repository root, e.g.

  .venv/bin/python -m benchmarks.scaling [--variant So400m/14 --res 384 \
      --batch 16]

Compiles `train.setup`'s step (random tower, scanned) for each mesh of
MESHES on 8 simulated CPU devices (the XLA flag is added unless XLA_FLAGS
already sets a device count) and prints, from the compiled HLO, every
kind of collective with its count and bytes per device per step, split into
those inside the scanned layer (run once per layer) and those outside it.

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
import math
import os
import re

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
from nearid_jax.training import train
# pylint: enable=g-import-not-at-top

MESHES = ((("data", 8),), (("data", 2), ("fsdp", 4)))
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


def config_for(variant, res, batch):
  c = training_config()
  c.model.variant, c.model.res, c.model.scan = variant, res, True
  c.input.batch_size = batch
  return c


def compiled_step_hlo(config, mesh):
  """train.setup's step compiled for `mesh` -> its HLO text."""
  _, frozen, state, step = train.setup(config, mesh)
  b, r = config.input.batch_size, config.model.res
  images = jax.ShapeDtypeStruct((b, 3, r, r, 3), np.uint8,
                                sharding=sharding.batch_sharding(mesh))
  masks = jax.ShapeDtypeStruct((b, 3), np.bool_,
                               sharding=sharding.batch_sharding(mesh))
  batch = {"views": images, "distractors": images, "view_mask": masks,
           "distractor_mask": masks}
  return step.lower(frozen, state, batch).compile().as_text()


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--variant", default="So400m/14")
  parser.add_argument("--res", type=int, default=384)
  parser.add_argument("--batch", type=int, default=16, help="groups of 6")
  args = parser.parse_args(argv)
  config = config_for(args.variant, args.res, args.batch)
  print(f"{args.variant}@{args.res}, global batch {args.batch} groups x 6 "
        f"images, {len(jax.devices())} devices\n")
  print("| mesh | collective | where | per step | MiB per device per step |")
  print("|---|---|---|---|---|")
  for spec in MESHES:
    hlo = compiled_step_hlo(config, sharding.make_mesh(spec))
    for (op, where), (count, nbytes) in table(collectives(hlo)).items():
      print(f"| `{spec}` | {op} | {where} | {count} | "
            f"{nbytes / 2**20:,.2f} |")


if __name__ == "__main__":
  main()
