"""Exact top-k retrieval throughput: our blocked kernel vs numpy vs faiss-cpu.

Run from the repository root, e.g.

  .venv/bin/python -m benchmarks.retrieval_throughput [--gallery 100000 \
      --dim 1152 --queries 256 --k 10 --blocks 1024,4096] [--json out.json]

All three do exact maximum-inner-product search over the same L2-normalised
float32 gallery with the same queries, in one process, interleaved:
- `retrieval.topk` (jitted lax.scan over gallery blocks, running top-k), one
  row per --blocks value; the gallery is already on the device;
- numpy: float32 matmul per gallery block (BLAS) + argpartition, merged;
- faiss `IndexFlatIP.search` (the index built once, outside the timing).
Queries/s (and the score matmul's GFLOP/s) are from each method's best call
of --repeats, after one warm-up call (which also compiles ours). The id
agreement column is the fraction of top-k ids equal to faiss's (exact
searches agree up to ties and float rounding of near-equal scores).
"""
import argparse

import faiss
import jax
import numpy as np

from benchmarks import common
from nearid_jax import retrieval


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


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--gallery", type=int, default=100_000)
  parser.add_argument("--dim", type=int, default=1152)
  parser.add_argument("--queries", type=int, default=256)
  parser.add_argument("--k", type=int, default=10)
  parser.add_argument("--blocks", default="1024,4096",
                      help="comma-separated gallery block sizes of our kernel")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--json", help="also write the results here")
  args = parser.parse_args()

  rng = np.random.default_rng(0)
  gallery = rng.standard_normal((args.gallery, args.dim), np.float32)
  gallery /= np.linalg.norm(gallery, axis=1, keepdims=True)
  # Queries near gallery items, as in identity retrieval.
  queries = gallery[rng.choice(args.gallery, args.queries)]
  queries = queries + 0.05 * rng.standard_normal(queries.shape, np.float32)
  queries /= np.linalg.norm(queries, axis=1, keepdims=True)

  device_gallery = jax.device_put(gallery)
  device_queries = jax.device_put(queries)
  index = faiss.IndexFlatIP(args.dim)
  index.add(gallery)

  def ours(block):
    return lambda: jax.block_until_ready(retrieval.topk(
        device_queries, device_gallery, args.k, block=block))

  fns = {f"nearid_jax topk (block {b})": ours(b)
         for b in map(int, args.blocks.split(","))}
  fns["numpy matmul + argpartition"] = lambda: numpy_topk(queries, gallery,
                                                          args.k)
  fns["faiss-cpu IndexFlatIP"] = lambda: index.search(queries, args.k)
  times = common.time_calls(fns, warmup=1, repeats=args.repeats)

  _, faiss_ids = index.search(queries, args.k)
  flops = 2 * args.queries * args.gallery * args.dim  # the score matmul
  results, rows = {}, []
  for name, fn in fns.items():
    ids = np.asarray(fn()[1])
    summary = common.summarize(times[name])
    summary["queries_per_s"] = args.queries / summary["best_wall_s"]
    summary["gflops"] = flops / summary["best_wall_s"] / 1e9
    summary["id_agreement"] = float(np.mean(ids == faiss_ids))
    results[name] = summary
    rows.append([name, f"{summary['queries_per_s']:.1f}",
                 f"{summary['gflops']:.1f}", f"{summary['best_wall_s']:.3f}",
                 f"{summary['median_wall_s']:.3f}",
                 f"{summary['id_agreement']:.4f}"])
  notes = common.thread_notes()
  notes.update(faiss=faiss.__version__,
               faiss_threads=faiss.omp_get_max_threads())
  print(f"Exact top-{args.k} of {args.queries} queries against a "
        f"{args.gallery:,} x {args.dim} float32 gallery; {notes['cpu']}, "
        f"{notes['cores']} cores, load {notes['load_avg_1m']}; jax "
        f"{notes['jax']}, faiss-cpu {notes['faiss']} "
        f"({notes['faiss_threads']} threads).\n")
  print(common.markdown_table(
      ["method", "queries/s", "matmul GFLOP/s", "best s", "median s",
       "id agreement"], rows))
  if args.json:
    common.write_json(args.json, {"args": vars(args), "notes": notes,
                                  "results": results})


if __name__ == "__main__":
  main()
