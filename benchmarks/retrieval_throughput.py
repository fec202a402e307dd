"""Exact top-k retrieval throughput: our blocked kernel vs numpy vs faiss-cpu.

Run from the repository root, e.g.

  .venv/bin/python -m benchmarks.retrieval_throughput [--gallery 100000 \
      --dim 1152 --queries 256 --k 10 --blocks 2048,4096] [--json out.json]

All do exact maximum-inner-product search over the same L2-normalised
float32 gallery with the same queries, in one process, interleaved:
- `retrieval.topk` (jitted lax.scan over gallery blocks: a bf16 screen,
  then float32 rescoring of its candidates), one row per --blocks value,
  on a `retrieval.prepare_gallery` made once, outside the timing, as
  faiss's index is; the gallery is already on the device;
- the same on the plain array (the screen's gallery bounds computed in
  every call);
- its reference kernel (`candidates=0`: every score in float32, running
  top-k), block 1024;
- numpy: float32 matmul per gallery block (BLAS) + argpartition, merged;
- faiss `IndexFlatIP.search` (the index built once, outside the timing).
Queries/s (and the score matmul's GFLOP/s) are from each method's best call
of --repeats, after one warm-up call (which also compiles ours). The id
agreement column is the fraction of top-k ids equal to faiss's (exact
searches agree up to ties and float rounding of near-equal scores). The
matmul peak is timed between them, as in the other benchmarks.
"""
import argparse

import faiss
import jax
import numpy as np

from benchmarks import common
from nearid_jax import retrieval

OURS = "nearid_jax topk"
RAW = "nearid_jax topk on the plain array"
REFERENCE = "nearid_jax reference kernel, all float32 (block 1024)"
NUMPY = "numpy matmul + argpartition"
FAISS = "faiss-cpu IndexFlatIP"


def numpy_topk(queries, gallery, k, block=16384):
  """Blocked matmul + argpartition: the plain-numpy exact search."""
  best_s = np.full((len(queries), 0), -np.inf, np.float32)
  best_i = np.zeros((len(queries), 0), np.int64)
  for start in range(0, len(gallery), block):
    scores = queries @ gallery[start:start + block].T
    cand = np.argpartition(-scores, min(k, scores.shape[1] - 1), 1)[:, :k]
    best_s = np.concatenate([best_s, np.take_along_axis(scores, cand, 1)], 1)
    best_i = np.concatenate([best_i, cand + start], 1)
    keep = np.argpartition(-best_s, min(k, best_s.shape[1] - 1), 1)[:, :k]
    best_s = np.take_along_axis(best_s, keep, 1)
    best_i = np.take_along_axis(best_i, keep, 1)
  order = np.argsort(-best_s, 1, kind="stable")
  return np.take_along_axis(best_s, order, 1), np.take_along_axis(best_i,
                                                                  order, 1)


def measure(gallery=100_000, dim=1152, queries=256, k=10,
            blocks=(2048, 4096), repeats=3):
  """Times the three searches on one random gallery -> a results dict."""
  rng = np.random.default_rng(0)
  items = rng.standard_normal((gallery, dim), np.float32)
  items /= np.linalg.norm(items, axis=1, keepdims=True)
  # Queries near gallery items, as in identity retrieval.
  qs = items[rng.choice(gallery, queries)]
  qs = qs + 0.05 * rng.standard_normal(qs.shape, np.float32)
  qs /= np.linalg.norm(qs, axis=1, keepdims=True)

  device_items = jax.device_put(items)
  prepared = retrieval.prepare_gallery(device_items)
  device_qs = jax.device_put(qs)
  index = faiss.IndexFlatIP(dim)
  index.add(items)

  def ours(g, **kw):
    return lambda: jax.block_until_ready(retrieval.topk(device_qs, g, k,
                                                        **kw))

  fns = {f"{OURS} (block {b})": ours(prepared, block=b) for b in blocks}
  fns[RAW] = ours(device_items, block=blocks[0])
  fns[REFERENCE] = ours(device_items, block=1024, candidates=0)
  fns[NUMPY] = lambda: numpy_topk(qs, items, k)
  fns[FAISS] = lambda: index.search(qs, k)
  times, peaks = common.time_with_peak(fns, warmup=1, repeats=repeats)

  _, faiss_ids = index.search(qs, k)
  flops = 2 * queries * gallery * dim  # the score matmul
  results = {}
  for name, fn in fns.items():
    ids = np.asarray(fn()[1])
    summary = common.summarize(times[name])
    summary["queries_per_s"] = queries / summary["best_wall_s"]
    summary["gflops"] = flops / summary["best_wall_s"] / 1e9
    summary["pct_of_peak"] = 100 * flops / summary["best_wall_s"] / peaks[0][
        "peak"]
    summary["id_agreement"] = float(np.mean(ids == faiss_ids))
    results[name] = summary
  notes = common.thread_notes()
  notes.update(faiss=faiss.__version__,
               faiss_threads=faiss.omp_get_max_threads())
  return {"args": dict(gallery=gallery, dim=dim, queries=queries, k=k,
                       blocks=list(blocks), repeats=repeats),
          "flops": flops, "peaks": peaks, "notes": notes, "results": results}


def rows(**kw):
  """measure(**kw) as one suite row: our fastest block size vs faiss."""
  r = measure(**kw)
  a, results = r["args"], r["results"]
  best = common.best_of(results, [k for k in results
                                  if k.startswith(f"{OURS} (block")])
  return [common.suite_row(
      "retrieval", f"exact top-{a['k']}, {a['queries']} queries vs "
      f"{a['gallery']:,} x {a['dim']} float32", best, "q/s", a["queries"],
      results[best], flops=r["flops"], peaks=r["peaks"], ref=results[FAISS],
      ref_impl=FAISS, details=r)]


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--gallery", type=int, default=100_000)
  parser.add_argument("--dim", type=int, default=1152)
  parser.add_argument("--queries", type=int, default=256)
  parser.add_argument("--k", type=int, default=10)
  parser.add_argument("--blocks", default="2048,4096",
                      help="comma-separated gallery block sizes of our kernel")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--json", help="also write the results here")
  args = parser.parse_args()

  r = measure(args.gallery, args.dim, args.queries, args.k,
              [int(b) for b in args.blocks.split(",")], args.repeats)
  notes = r["notes"]
  print(f"Exact top-{args.k} of {args.queries} queries against a "
        f"{args.gallery:,} x {args.dim} float32 gallery; {notes['cpu']}, "
        f"{notes['cores']} cores, load {notes['load_avg_1m']}; jax "
        f"{notes['jax']}, faiss-cpu {notes['faiss']} "
        f"({notes['faiss_threads']} threads); matmul peak "
        f"{r['peaks'][0]['peak'] / 1e9:.1f} GFLOP/s.\n")
  print(common.markdown_table(
      ["method", "queries/s", "matmul GFLOP/s", "% of peak", "best s",
       "median s", "id agreement"],
      [[name, f"{s['queries_per_s']:.1f}", f"{s['gflops']:.1f}",
        f"{s['pct_of_peak']:.0f}", f"{s['best_wall_s']:.3f}",
        f"{s['median_wall_s']:.3f}", f"{s['id_agreement']:.4f}"]
       for name, s in r["results"].items()]))
  if args.json:
    common.write_json(args.json, {**r, "args": vars(args)})


if __name__ == "__main__":
  main()
