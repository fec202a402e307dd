"""The train step's collectives on 8 simulated devices, read from its HLO.

`data` must communicate only the head's gradients and the loss's global
batch; `data x fsdp` additionally all-gathers each layer's frozen weights
where the layer runs, and never reduces an activation. How the HLO is read:
benchmarks/scaling.py's docstring.
"""
import jax
from jax.sharding import PartitionSpec as P
import numpy as np
import pytest

from benchmarks import scaling
from nearid_jax import sharding
from nearid_jax.model import NearID

# A scanned tower of depth 2 (pico), 36 tokens per image: one image's tokens
# (36 x 64 floats) are 6x one embedding, so a collective of activations
# cannot hide under the embedding-sized bound below.
VARIANT, RES, GROUPS = "pico/8", 48, 8


def _bytes(tree):
  return sum(x.nbytes for x in jax.tree.leaves(tree))


def _totals(found, in_layer):
  """{op: (count per step, bytes per step)} of the collectives in/outside
  the scanned layer."""
  return {op: v for (op, where), v in scaling.table(found).items()
          if (where == "layer") == in_layer}


@pytest.fixture(scope="module")
def step_setup():
  config = scaling.config_for(VARIANT, RES, GROUPS)
  model = NearID.from_config(config)
  img = model.params["img"]
  sizes = {"head": _bytes(model.params["head"]),
           "head_leaves": len(jax.tree.leaves(model.params["head"])),
           "stack": _bytes(img["Transformer"]["encoderblock"]),
           "stack_leaves": len(jax.tree.leaves(
               img["Transformer"]["encoderblock"])),
           "tower": _bytes(img),
           # The loss sees the global batch, so per-row values (embeddings,
           # logits rows) may be gathered: at most this much.
           "embeddings": GROUPS * 6 * model.arch.width * 4}
  assert model.scan and model.arch.depth > 1
  return config, model.arch, sizes


def _compiled(config, spec):
  return scaling.collectives(
      scaling.compiled_step_hlo(config, sharding.make_mesh(spec)))


@pytest.mark.slow  # compiles two meshes' train steps
def test_data_parallel_step_reduces_only_the_head(step_setup):
  config, _, sizes = step_setup
  found = _compiled(config, [("data", 8)])
  assert not _totals(found, in_layer=True)
  outside = _totals(found, in_layer=False)
  # Gradients of the replicated head: summed over devices once per step.
  # (XLA may reduce a smaller cotangent in place of a gradient, so this is a
  # bound, not an equality.)
  count, nbytes = outside.pop("all-reduce")
  assert 0 < nbytes <= sizes["head"] + sizes["embeddings"]
  # At most one per head leaf and a few for the loss's global sums, whatever
  # the depth (XLA combines them further).
  assert count <= sizes["head_leaves"] + 4
  for op, (_, nbytes) in outside.items():
    assert nbytes <= sizes["embeddings"], op


@pytest.mark.slow
def test_fsdp_step_gathers_weights_per_layer_and_reduces_no_activation(
    step_setup):
  config, arch, sizes = step_setup
  found = _compiled(config, [("data", 2), ("fsdp", 4)])
  layer = _totals(found, in_layer=True)
  # Inside the scanned layer: each block's weights all-gathered once per
  # layer, whole (the stack's bytes, every leaf), and nothing else.
  assert set(layer) == {"all-gather"}
  assert layer["all-gather"] == (sizes["stack_leaves"] * arch.depth,
                                 sizes["stack"])
  outside = _totals(found, in_layer=False)
  assert outside.pop("all-reduce")[1] <= sizes["head"] + sizes["embeddings"]
  # The unscanned tower weights (patch embedding, positions, final norm)
  # are gathered once per step.
  assert outside.pop("all-gather")[1] <= (sizes["tower"] - sizes["stack"]
                                          + sizes["embeddings"])
  for op, (_, nbytes) in outside.items():
    assert nbytes <= sizes["embeddings"], op


def test_weight_shardings_split_fsdp_never_the_depth_axis():
  mesh = sharding.make_mesh([("data", 2), ("fsdp", 4)])
  params = {"Transformer": {"encoderblock": {"k": np.zeros((8, 4, 12))},
                            "norm": np.zeros((8,))},
            "odd": np.zeros((3, 5))}
  specs = jax.tree.map(lambda s: s.spec,
                       sharding.weight_shardings(mesh, params))
  # depth 8 is the largest axis that 4 divides, but it is the scan's
  assert specs["Transformer"]["encoderblock"]["k"] == P(None, None, "fsdp")
  assert specs["Transformer"]["norm"] == P("fsdp")
  assert specs["odd"] == P()  # nothing divides: replicated
  data_only = sharding.make_mesh([("data", 8)])
  assert all(s.spec == P() for s in jax.tree.leaves(
      sharding.weight_shardings(data_only, params)))


def test_batch_is_split_over_every_batch_axis():
  mesh = sharding.make_mesh([("data", 2), ("fsdp", 4)])
  assert sharding.batch_axes(mesh) == ("data", "fsdp")
  assert sharding.batch_shards(mesh) == 8
  x = sharding.global_batch(np.arange(16.0), mesh)
  assert len({tuple(s.data.tolist()) for s in x.addressable_shards}) == 8


# A hand-written HLO module: one while loop (trip count 3) whose body calls
# a computation holding an all-gather, and a tuple all-reduce outside.
_HLO = """HloModule m

%inner (p: f32[4]) -> f32[8] {
  %p = f32[4]{0} parameter(0)
  ROOT %ag = f32[8]{0} all-gather(%p), dimensions={0}
}

%body (t: (s32[], f32[4])) -> (s32[], f32[4]) {
  %t = (s32[], f32[4]{0}) parameter(0)
  %c = f32[8]{0} call(%x), to_apply=%inner
  ROOT %r = (s32[], f32[4]{0}) tuple(%i, %y)
}

%cond (t: (s32[], f32[4])) -> pred[] {
  ROOT %b = pred[] constant(true)
}

ENTRY %main (a: f32[4]) -> f32[4] {
  %w = (s32[], f32[4]{0}) while(%init), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"3"}}
  %ar = (f32[2,3]{1,0}, bf16[5]{0}) all-reduce(%u, %v), to_apply=%add
  %ag2 = f32[16]{0} all-gather-start(%a), dimensions={0}
  ROOT %o = f32[4]{0} copy(%a)
}
"""


def test_hlo_reading_on_a_hand_written_module():
  assert scaling.table(scaling.collectives(_HLO)) == {
      ("all-gather", "layer"): (3, 3 * 8 * 4),
      ("all-gather", "outside"): (1, 16 * 4),
      ("all-reduce", "outside"): (1, 2 * 3 * 4 + 5 * 2),
  }


def _mesh_costs(spec, devices, flops, nbytes, reduce_bytes):
  return {"mesh": spec, "devices": devices, "flops": flops, "bytes": nbytes,
          "collectives": [["all-reduce", "outside", 6, reduce_bytes],
                          ["all-gather", "layer", 27, 3 * reduce_bytes]]}


def test_projection_arithmetic():
  # Per device: 1 TFLOP replicated + 64 TFLOP split over the devices; bytes
  # 2 GB + 80 GB split; 1 MB all-reduced and 3 MB gathered whatever the count.
  measured = [_mesh_costs([["data", n]], n, 1e12 + 64e12 / n,
                          2e9 + 80e9 / n, 1e6) for n in (8, 32)]
  measured += [_mesh_costs([["data", n // 4], ["fsdp", 4]], n,
                           1e12 + 64e12 / n, 2e9 + 80e9 / n, 1e6)
               for n in (8, 32)]
  rows = {(r["hardware"], r["layout"]): r
          for r in scaling.project(measured, steps=3600, mfu=0.5)}
  # One A100 has no fsdp axis; every other accelerator runs both layouts.
  assert set(rows) == {(h, lay) for h in scaling.HARDWARE
                       for lay in ("data", "data x fsdp")} - {
                           ("1x A100 SXM", "data x fsdp")}
  v5e = rows[("TPU v5e-16", "data")]  # 16 chips: 5 TFLOP, 7 GB a chip
  assert v5e["compute"] == pytest.approx(5e12 / (0.5 * 197e12))
  assert v5e["hbm"] == pytest.approx(7e9 / 819e9)
  # Ring bytes: 2 x 1 MB all-reduced + 1 x 3 MB gathered, at 200 GB/s.
  assert v5e["comm"] == pytest.approx(5e6 / 200e9)
  assert v5e["step"] == pytest.approx(max(v5e["compute"], v5e["hbm"])
                                      + v5e["comm"])
  assert v5e["hours"] == pytest.approx(v5e["step"])  # 3,600 steps
  assert v5e["chip_hours"] == pytest.approx(16 * v5e["step"])
  a100 = rows[("1x A100 SXM", "data")]  # one chip: all of it, no network
  assert a100["compute"] == pytest.approx(65e12 / (0.5 * 312e12))
  assert a100["hbm"] == pytest.approx(82e9 / 2.039e12)
  assert a100["comm"] == 0
  # The cache: one forward = a step's FLOPs over its images.
  plan, pays = scaling.cache_plan(768e12, 768, 3300, token_bytes=1000)
  h100 = next(r for r in plan if r["hardware"] == "8x H100 SXM")
  assert h100["rate"] == pytest.approx(8 * 989e12 * 0.5 / 1e12)
  assert h100["write_hours"] == pytest.approx(
      scaling.CACHE_IMAGES / h100["rate"] / 3600)
  assert h100["epoch_hours"] == pytest.approx(
      768 * 300 / h100["rate"] / 3600)  # 3,300 steps = 11 epochs of 300
  assert h100["break_even_gbs"] == pytest.approx(h100["rate"] * 1000 / 1e9)
  assert pays == -(-scaling.CACHE_IMAGES // (768 * 300))
