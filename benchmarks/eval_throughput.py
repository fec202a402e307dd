"""Evaluation throughput: embedding images/s and the time to score a split.

Run from the repository root, e.g.

  .venv/bin/python -m benchmarks.eval_throughput [--b16_rows 2] \
      [--skip_b16] [--json out.json]

Embedding (one device mesh, data axis = all devices): the jitted, sharded
embed function of nearid_jax.evaluate on a batch of eval rows' view slots,
uint8 (rows, 3, R, R, 3) -> float32 (rows, 3, D), timed as
- "both heads, one tower pass": what every evaluation runs (baseline and
  trained MAP heads reading the same tower tokens);
- "trained head only": later training evals (the baseline is cached);
- "two full forwards": NearID's own jitted forward once per head, i.e. what
  sharing the tower saves.
for the demo tower (configs/demo.py: pico/8 at its res, eval.batch_size
rows) and SigLIP2 B/16@224 (random weights; --b16_rows rows per batch,
reduced from configs' eval.batch_size 64 to fit a 2-core CPU; the table says
how many). Each is the best of --repeats calls after a warm-up call.
End to end, the demo tower also embeds a prepared synthetic split
(embed.embed_split, the trained head as in a training evaluation after
the first): from the images (grain decode + resize + tower + head) and from
the tower tokens a first evaluation kept (embed.SplitTokens); images/s
count every image slot embedded (padding included).

Scoring (numpy/JAX on host embeddings, the paper's sizes): 500 test rows x 7
pooled sources at D = 1152 (So400m), random unit embeddings with 2-3 views:
per-source + pooled SSR/PA (nearid_eval.nearid_scores without retrieval) and
identity retrieval (1,500 view queries vs 12,000 views + distractors).
embed_rows, split_rows and scoring_rows give benchmarks.suite its rows.
"""
import argparse
import os
import tempfile

import jax
import numpy as np

from benchmarks import common
from configs import demo as demo_config
import input_pipeline
from input_pipeline import synthetic
from nearid_jax.evaluators import embed
from nearid_jax.evaluators import nearid as nearid_eval
from nearid_jax import metrics
from input_pipeline import preprocess
from nearid_jax import model as model_lib
from nearid_jax import sharding
from nearid_jax import vit
from nearid_jax.model import NearID
from nearid_jax.model import split_params

SSR_PA = "SSR/PA per source + pooled"
RETRIEVAL = "identity retrieval (R@1/5/10, mAP)"


def build_model(arch, seed=0):
  """A random tower with two different random heads (baseline, trained)."""
  flat = model_lib.random_tower(arch, seed)
  model = NearID(arch, split_params(flat, arch, scan=arch.depth > 12))
  rng = np.random.default_rng(seed + 1)
  other = jax.tree.map(
      lambda x: np.asarray(x) + 0.02 * rng.standard_normal(x.shape).astype(
          np.float32), model.params["head"])
  return model, {"baseline": model.params["head"], "trained": other}


def time_embed(model, heads, rows, mesh, repeats):
  """Times the three ways to embed `rows` eval rows' view slots.

  -> ({impl: summary with images_per_s}, peaks of common.time_with_peak).
  """
  res = model.arch.image_size
  images = np.random.default_rng(0).integers(0, 256, (rows, 3, res, res, 3),
                                             np.uint8)
  both = embed.Embedder(model, heads, mesh)
  one = embed.Embedder(model, {"trained": heads["trained"]}, mesh)
  params = {h: {"img": model.params["img"], "head": p}
            for h, p in heads.items()}
  x = jax.device_put(preprocess.scale(
      images.reshape((-1, res, res, 3))))
  block = jax.block_until_ready
  fns = {
      "both heads, one tower pass": lambda: block(both(images)),
      "trained head only": lambda: block(one(images)),
      "two full forwards": lambda: block(
          [model._forward(p, x) for p in params.values()]),  # pylint: disable=protected-access
  }
  times, peaks = common.time_with_peak(fns, warmup=1, repeats=repeats)
  n = rows * 3
  out = {k: common.summarize(times[k]) for k in fns}
  for s in out.values():
    s.update(images=n, images_per_s=n / s["best_wall_s"])
  return out, peaks


def embed_rows(rows=0, repeats=3):
  """The demo tower's eval embedding as a suite row: one tower pass for both
  heads vs two full forwards. rows: eval rows per batch (0 = the demo's)."""
  dc = demo_config.get_config()
  rows = rows or dc.eval.batch_size
  arch = vit.Arch.from_variant(dc.model.variant, dc.model.res)
  model, heads = build_model(arch)
  mesh = sharding.make_mesh([(sharding.DATA, -1)])
  r, peaks = time_embed(model, heads, rows, mesh, repeats)
  ours, ref = "both heads, one tower pass", "two full forwards"
  return [common.suite_row(
      "eval_embed", f"demo {dc.model.variant}@{dc.model.res}, {rows} rows x "
      f"3 views, baseline + trained head", f"JAX embed.Embedder ({ours})",
      "img/s", rows * 3, r[ours], flops=common.forward_flops(arch, rows * 3, heads=2),
      peaks=peaks, ref=r[ref], ref_impl=f"JAX, {ref} (one per head)",
      details=r)]


def time_split(model, heads, mesh, rows_per_batch, identities, workdir,
               repeats=1):
  """embed.embed_split of a prepared synthetic split, the trained head
  alone (a training evaluation after the first): from the images (grain
  decode + resize + tower + head) and from the tower tokens a first call
  kept (embed.SplitTokens: the head alone)."""
  cfg = input_pipeline.default_config()
  cfg.manual_dir = os.path.join(workdir, "hf")
  cfg.data_dir = os.path.join(workdir, "tfds")
  cfg.sources = cfg.eval_sources = ("Flux", "Qwen", "SDXL")
  cfg.res, cfg.mtg_repeat = model.arch.image_size, 0
  synthetic.generate(cfg.manual_dir, identities, 64, 0, cfg.sources)
  input_pipeline.prepare(cfg)
  kept = embed.SplitTokens()
  run = lambda tokens=None: embed.embed_split(
      model, {"trained": heads["trained"]}, cfg, "train", None, mesh,
      rows_per_batch, tokens=tokens)
  emb = run()  # compiles the tower + head jit
  run(kept)  # keeps the tokens; compiles the tower and the head alone
  run(kept)  # untimed once from the kept tokens, as the images above
  times = common.time_calls({"images": run, "kept": lambda: run(kept)},
                            warmup=0, repeats=repeats)
  slots = -(-len(emb.index) // rows_per_batch) * rows_per_batch * (
      3 + 3 * len(cfg.sources))
  out = {"rows": len(emb.index), "slots": slots,
         "valid_images": int(emb.view_mask.sum() + emb.distractor_mask.sum()),
         "kept_bytes": kept.nbytes()}
  for k, t in times.items():
    out[k] = common.summarize(t)
    out[k]["images_per_s"] = slots / out[k]["best_wall_s"]
  return out


def split_rows(identities=120, rows=0, repeats=3):
  """A later training evaluation of the demo tower as a suite row: the
  trained head on the kept tokens vs from the split's images."""
  dc = demo_config.get_config()
  rows = rows or dc.eval.batch_size
  arch = vit.Arch.from_variant(dc.model.variant, dc.model.res)
  model, heads = build_model(arch)
  mesh = sharding.make_mesh([(sharding.DATA, -1)])
  with tempfile.TemporaryDirectory() as workdir:
    r = time_split(model, heads, mesh, rows, identities, workdir, repeats)
  return [common.suite_row(
      "eval_split", f"demo {dc.model.variant}@{dc.model.res}, a synthetic "
      f"split of {r['rows']} rows x (3 views + 3 x 3 sources), {rows} rows "
      f"per batch, trained head ({r['kept_bytes'] / 2 ** 20:.0f} MiB kept)",
      "embed.embed_split from kept tokens (SplitTokens)", "img/s",
      r["slots"], r["kept"], ref=r["images"],
      ref_impl="the same from the images (decode, tower, head)", details=r)]


def fake_split(rows=500, dim=1152, n_sources=7, seed=0):
  rng = np.random.default_rng(seed)
  unit = lambda x: (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(
      np.float32)
  view_mask = np.ones((rows, 3), bool)
  view_mask[rng.uniform(size=rows) < 0.3, 2] = False
  dmask = np.broadcast_to(view_mask[:, None], (rows, n_sources, 3)).copy()
  return embed.Embedded(
      "test", nearid_eval.POOLED_SOURCES[:n_sources], np.arange(rows),
      view_mask, dmask, {"trained": unit(rng.standard_normal((rows, 3, dim)))},
      {"trained": unit(rng.standard_normal((rows, n_sources, 3, dim)))})


def time_scoring(repeats, rows=500, dim=1152):
  """Times SSR/PA, identity retrieval and both on a fake `rows`-row split.

  -> ({computation: summary}, retrieval queries, gallery items).
  """
  emb = fake_split(rows, dim)

  def ssr_pa():
    margins = [metrics.nearid_margins(
        emb.views["trained"], emb.view_mask, emb.distractors["trained"][:, s],
        emb.distractor_mask[:, s]) for s in range(len(emb.sources))]
    for m in margins:
      metrics.ssr_from_margins(*m)
    metrics.ssr_from_margins(*(np.concatenate(x) for x in zip(*margins)))

  fns = {SSR_PA: ssr_pa,
         RETRIEVAL: lambda: nearid_eval.identity_retrieval(emb, "trained"),
         "nearid_eval.nearid_scores (both of the above)":
             lambda: nearid_eval.nearid_scores(emb)}
  times = common.time_calls(fns, warmup=1, repeats=repeats)
  q = int(emb.view_mask.sum())
  g = q + int(emb.distractor_mask.sum())
  return {k: common.summarize(t) for k, t in times.items()}, q, g


def scoring_rows(repeats=3, rows=500, dim=1152):
  """Scoring as suite rows: SSR/PA (test rows/s), identity retrieval (q/s)."""
  r, q, g = time_scoring(repeats, rows, dim)
  config = f"{rows} test rows x 7 sources, D={dim}, 2-3 views"
  return [common.suite_row("ssr", config, f"numpy metrics: {SSR_PA}",
                           "rows/s", rows, r[SSR_PA], details=r),
          common.suite_row("eval_retrieval", f"{config}: {q} queries vs {g}",
                           f"evaluate.{RETRIEVAL}", "q/s", q, r[RETRIEVAL])]


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--b16_rows", type=int, default=2,
                      help="eval rows per batch for B/16@224 (x3 images)")
  parser.add_argument("--skip_b16", action="store_true")
  parser.add_argument("--identities", type=int, default=120,
                      help="synthetic identities for the end-to-end run")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--json", help="also write the results here")
  args = parser.parse_args()

  mesh = sharding.make_mesh([(sharding.DATA, -1)])
  dc = demo_config.get_config()
  towers = [("demo " + f"{dc.model.variant}@{dc.model.res}",
             vit.Arch.from_variant(dc.model.variant, dc.model.res),
             dc.eval.batch_size)]
  if not args.skip_b16:
    towers.append(("B/16@224", vit.Arch.from_variant("B/16", 224),
                   args.b16_rows))
  results = {"embed": {}, "threads": common.thread_notes()}
  rows = []
  for name, arch, n in towers:
    model, heads = build_model(arch)
    r, _ = time_embed(model, heads, n, mesh, args.repeats)
    results["embed"][name] = r
    for impl, s in r.items():
      rows.append([name, f"{n} rows x 3 = {s['images']}", impl,
                   f"{s['images_per_s']:.1f}", f"{1e3 * s['best_wall_s']:.1f}",
                   f"{1e3 * s['best_cpu_s']:.1f}"])
    if name.startswith("demo"):
      with tempfile.TemporaryDirectory() as workdir:
        e2e = time_split(model, heads, mesh, n, args.identities, workdir,
                         args.repeats)
      results["end_to_end"] = e2e
      for k, what in (("images", "decode + tower + head"),
                      ("kept", "kept tokens + head")):
        s = e2e[k]
        rows.append([name, f"{e2e['rows']} rows, {n} per batch",
                     f"embed_split, trained head ({what})",
                     f"{s['images_per_s']:.1f}",
                     f"{1e3 * s['best_wall_s']:.0f} (whole split)",
                     f"{1e3 * s['best_cpu_s']:.0f}"])

  scoring, q, g = time_scoring(args.repeats)
  results["scoring"] = scoring
  notes = results["threads"]
  print(f"\nCPU: {notes['cpu']}, {notes['cores']} cores, load avg "
        f"{notes['load_avg_1m']}; jax {notes['jax']} on "
        f"{notes['jax_backend']}, {len(jax.devices())} device(s), mesh "
        f"{dict(mesh.shape)}")
  print(f"best of {args.repeats} calls after warm-up (wall clock; CPU time "
        "counts all threads of this process); random weights\n")
  print(common.markdown_table(
      ["tower", "batch", "embed", "images/s", "wall ms per call",
       "CPU ms per call"], rows))
  print(f"\nScoring on host embeddings: 500 rows x 7 sources, D=1152; "
        f"retrieval {q} queries vs {g} gallery items\n")
  print(common.markdown_table(
      ["computation", "best wall ms", "median wall ms", "best CPU ms"],
      [[k, f"{1e3 * s['best_wall_s']:.1f}", f"{1e3 * s['median_wall_s']:.1f}",
        f"{1e3 * s['best_cpu_s']:.1f}"] for k, s in scoring.items()]))
  if args.json:
    common.write_json(args.json, results)


if __name__ == "__main__":
  main()
