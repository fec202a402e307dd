"""The benchmark suite runs end to end, its FLOP count is XLA's and its
timer settles each call as asked."""
import json
import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import pytest

from benchmarks import accelerator
from benchmarks import common
from benchmarks.common import forward_flops
from nearid_jax import vit

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROWS = {"train_demo", "train_demo_cached", "train_b16", "train_so400m",
        "embed", "score", "eval_embed", "eval_split", "ssr", "eval_retrieval", "retrieval",
        "input_demo", "input_demo_cached", "cache"}


def _run_quick(module, out_flag, out):
  """`python -m module --quick` writing its JSON to `out` -> (that JSON, the
  printed output). The real CPU as one device (conftest fakes 8 for the
  sharding tests)."""
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  proc = subprocess.run(
      [sys.executable, "-m", module, "--quick", out_flag, str(out)],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
      check=False)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  return json.loads(out.read_text()), proc.stdout


@pytest.mark.slow
def test_quick_suite_measures_every_row(tmp_path):
  result, stdout = _run_quick("benchmarks.suite", "--json",
                              tmp_path / "suite.json")
  rows = {r["name"]: r for r in result["rows"]}
  assert set(rows) == ROWS and len(result["rows"]) == len(ROWS)
  for name, r in rows.items():
    assert r["rate"] > 0 and r["ms"] > 0, (name, r["impl"])
    assert r["rate"] == pytest.approx(1e3 * r["count"] / r["ms"])
    assert f"| {name} |" in stdout  # one table row each
    if "ref_rate" in r:
      assert r["ratio"] == pytest.approx(r["rate"] / r["ref_rate"]), name
    if "gflops" in r:
      assert r["peak_gflops"] > 0
      assert r["pct_peak"] == pytest.approx(
          100 * r["gflops"] / r["peak_gflops"]), name
  for name in ("train_demo", "train_demo_cached", "train_b16",
               "train_so400m", "embed"):
    assert "PyTorch" in rows[name]["ref"], name  # measured in the same run
  demo = rows["train_demo"]["details"]  # 2 steps a call in the quick run
  assert demo["steps_per_call"] == 2
  assert rows["train_demo"]["count"] == 2 * demo["images_per_step"]
  assert rows["train_demo"]["gflops"] == pytest.approx(
      2 * demo["forward_flops_per_step"] / demo["jax"]["best_wall_s"] / 1e9)
  assert "gflops" not in rows["train_demo_cached"]  # no tower, no FLOP/s
  assert rows["train_demo_cached"]["details"]["loss_rel_diff"] < 1e-4
  assert {t["row"] for t in result["targets"]} == {
      "train_demo", "train_demo_cached", "train_so400m", "cache"}


@pytest.mark.parametrize("arch", [
    vit.Arch(1152, 2, 4304, 16, 14, 384),  # So400m/14@384, 2 of 27 blocks
    vit.Arch(768, 1, 3072, 12, 16, 224),   # B/16@224, 1 of 12 blocks
], ids=["so400m_shapes", "b16_shapes"])
def test_forward_flops_match_xla_cost_analysis(arch):
  """The analytic count behind every "% of peak" agrees with XLA's own.

  XLA also counts the elementwise work (softmax, GELU, LayerNorm) that the
  analytic count leaves out: a fraction of a percent at these widths, with
  the plain kernels' exp counted as one op (the CPU's fast_exp.exp would add
  its ~20 multiply-adds per logit, 1.1% at So400m). The MAP head's count is
  the textbook one; ours computes it folded, without the 4 N D^2 of the
  tokens' k and v projections (4 N D H instead).
  """
  tower, head = vit.VisionTower(arch, scan=False), vit.NearIDHead(arch)
  x = jnp.zeros((2, arch.image_size, arch.image_size, 3))
  tokens = jnp.zeros((2, arch.num_patches, arch.width))
  key = jax.random.PRNGKey(0)
  params = {"img": jax.eval_shape(tower.init, key, x)["params"],
            "head": jax.eval_shape(head.init, key, tokens)["params"]}
  cost = lambda f, *a: jax.jit(f).lower(*a).cost_analysis()["flops"]
  xla_tower = cost(lambda p, x: tower.apply({"params": p}, x), params["img"],
                   x)
  xla_head = cost(lambda p, t: head.apply({"params": p}, t), params["head"],
                  tokens)
  assert forward_flops(arch, 2, heads=0) == pytest.approx(xla_tower, rel=0.01)
  n, d, h = arch.num_patches, arch.width, arch.num_heads
  textbook = forward_flops(arch, 2) - forward_flops(arch, 2, heads=0)
  folded = textbook - 2 * (4 * n * d * d - 4 * n * d * h)
  assert xla_head == pytest.approx(folded, rel=0.05)
  assert xla_head < textbook / 4


@pytest.mark.parametrize("settle,settle_s,least,most", [(3, 0.0, 3, 3),
                                                        (1, 0.03, 6, 30)])
def test_time_calls_settles_before_each_timed_call(settle, settle_s, least,
                                                   most):
  """`settle` untimed calls at least, and more until `settle_s` has passed."""
  calls = []
  fn = lambda: (calls.append(time.perf_counter()), time.sleep(0.005))
  times = common.time_calls({"f": fn}, warmup=1, repeats=2, settle=settle,
                            settle_s=settle_s)
  assert len(times["f"]["wall_s"]) == 2
  untimed_per_timed = (len(calls) - 1 - 2) / 2
  assert least <= untimed_per_timed <= most


@pytest.mark.slow
def test_quick_accelerator_benchmark_measures_every_part(tmp_path):
  result, stdout = _run_quick("benchmarks.accelerator", "--out",
                              tmp_path / "x.json")
  assert result["quick"] and result["device"]["kind"] == "cpu"
  parts = result["parts"]
  assert set(parts) == set(accelerator.PARTS)
  for name, r in parts.items():
    assert r["rate"] > 0 and r["size"] > 0, (name, r)
    assert f"| {name} |" in stdout  # one table row each
  for name in ("forward", "train"):
    assert parts[name]["flops_per_call"] > 0
    assert parts[name]["flops_source"].startswith("XLA cost analysis")
    assert parts[name]["mfu"] is None  # no peak for a CPU
    assert result["ratios"][name] == pytest.approx(
        parts[name]["rate"] / parts[f"torch_{name}"]["rate"])
  assert parts["retrieval"]["self_hits"] == 1.0
  assert result["attention"] == {"kernels": "cpu"}


@pytest.mark.parametrize("kind,want", [
    ("NVIDIA H100 80GB HBM3", ("H100 SXM", 989)),
    ("NVIDIA H100 PCIe", ("H100 PCIe", 756)),
    ("NVIDIA A100-SXM4-40GB", ("A100", 312)),
    ("TPU v4", ("TPU v4", 275)), ("TPU v5 lite", ("TPU v5e", 197)),
    ("TPU v5p", ("TPU v5p", 459)), ("TPU v6 lite", ("TPU v6e", 918)),
    ("cpu", (None, None))])
def test_accelerator_peaks_by_device_kind(kind, want):
  assert accelerator.peak(kind) == want


def test_accelerator_results_are_named_by_device_kind():
  assert accelerator.slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
  assert accelerator.slug("TPU v5 lite") == "tpu-v5-lite"
