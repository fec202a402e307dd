"""Evaluation driver: the scores of several heads on one frozen tower.

Every evaluation scores two heads: the trained head and the baseline (the
checkpoint's original MAP head); the tower runs once per image and both
heads read its tokens (embed.py).

  make_evaluator(config, mesh, baseline_head)
      the `evaluate(model, step) -> scalars` that training calls
  run(config, workdir_or_checkpoint, out_dir)
      `launch.py --mode eval`: report.json, report.md and plots (report.py)
"""
import dataclasses
import os
import time

import jax

from nearid_jax import sharding
from nearid_jax import signals
from nearid_jax import workdir as workdir_lib
from nearid_jax.evaluators import embed as embed_lib
from nearid_jax.evaluators import mtg as mtg_lib
from nearid_jax.evaluators import nearid as nearid_lib
from nearid_jax.evaluators import report
from nearid_jax.model import NearID
from nearid_jax.model import resolve_resize


def scalars(scores, prefix):
  """One head's {"nearid", "mtg"} scores -> flat {prefix/...: float}.

  prefix/nearid/{ssr,pa} (pooled), prefix/nearid/<source>/{ssr,pa},
  prefix/retrieval/{r@1,r@5,r@10,map}, prefix/mtg/{ssr,pa,mo,mo_pair}.
  """
  out = {}
  if "nearid" in scores:
    n = scores["nearid"]
    for k in ("ssr", "pa"):
      if "pooled" in n:
        out[f"{prefix}/nearid/{k}"] = n["pooled"][k]
      for s, r in n["sources"].items():
        out[f"{prefix}/nearid/{s.lower()}/{k}"] = r[k]
    out.update({f"{prefix}/retrieval/{k}": v
                for k, v in n["retrieval"].items() if k != "n_queries"})
  if "mtg" in scores:
    out.update({f"{prefix}/mtg/{k}": v for k, v in scores["mtg"].items()
                if k != "n_samples"})
  return out


def evaluate_heads(model, heads, config, mesh, split=None, tokens=None):
  """NearID (+ MTG when config.eval.mtg and MTG is prepared), head-major.

  tokens: {"nearid": SplitTokens, "mtg": SplitTokens} kept between calls
  (make_evaluator's), or None.
  -> ({head: {"nearid": ..., "mtg": ...}}, the NearID Embedded).
  """
  ev, cfg = config.eval, config.input
  tokens = tokens or {}
  emb = embed_lib.embed_split(model, heads, cfg, split or ev.split, None,
                              mesh, ev.batch_size, tokens=tokens.get("nearid"))
  scores = {h: {"nearid": r}
            for h, r in nearid_lib.nearid_scores(emb, mesh).items()}
  if ev.mtg and mtg_lib.mtg_prepared(cfg):
    for h, r in mtg_lib.mtg(model, heads, cfg, mesh, ev.batch_size,
                            tokens=tokens.get("mtg")).items():
      scores[h]["mtg"] = r
  return scores, emb


def make_evaluator(config, mesh, baseline_head):
  """The `evaluate(model, step) -> scalars` of train.train_and_evaluate.

  Scores the model's head ("eval/...") on config.eval.split and, on its first
  call only, the baseline head ("baseline/..."): the frozen head never
  changes, so its scores are cached and repeated in every later result.
  With config.eval.cache_tokens the frozen tower's tokens of the split are
  kept from the first call too (SplitTokens: later calls run only the head;
  `model`'s tower must then stay the same, as in training).
  """
  # On the host: the train step donates the state's buffers, which may be
  # these very arrays.
  baseline_head = jax.device_get(baseline_head)
  baseline = {}
  tokens = ({"nearid": embed_lib.SplitTokens(),
             "mtg": embed_lib.SplitTokens()}
            if config.eval.cache_tokens else None)

  def evaluate(model, step):
    del step
    start = time.time()
    heads = {"trained": model.params["head"]}
    if not baseline:
      heads["baseline"] = baseline_head
    scores, _ = evaluate_heads(model, heads, config, mesh, tokens=tokens)
    if "baseline" in scores:
      baseline.update(scalars(scores["baseline"], "baseline"))
    return {**scalars(scores["trained"], "eval"), **baseline,
            "perf/eval_s": time.time() - start}

  return evaluate


# --- standalone ---


def _baseline(config, path, model, baseline):
  """-> (baseline head params, where it comes from)."""
  if baseline:
    return (NearID.from_config(config, init=baseline).params["head"],
            os.fspath(baseline))
  if workdir_lib.is_workdir(path):
    wd_config = workdir_lib.read_config(path)
    init = wd_config.model.init or f"random, seed {wd_config.seed}"
    # The run's config without its workdir: the head it started from.
    return (NearID.from_config(wd_config).params["head"],
            f"the run's starting head ({init})")
  init = config.model.init
  if init and os.path.abspath(init) != os.path.abspath(path):
    return NearID.from_config(config).params["head"], f"{init} (model.init)"
  return model.params["head"], f"{path} (its own head)"


def run(config, path, out_dir, baseline=None, split=None):
  """Evaluates a training workdir or any checkpoint; writes the report.

  Args:
    config: a training config (input, eval, mesh, model fields).
    path: a training workdir (its latest head) or a checkpoint NearID.load
      takes.
    out_dir: where report.json, report.md and the plots go.
    baseline: a checkpoint whose head is the baseline. Default: for a workdir
      the head its run started from; else config.model.init when set; else
      the checkpoint's own head (baseline and trained rows then agree).
    split: default config.eval.split.

  Returns:
    the report dict (report.json's content).
  """
  path = os.fspath(path)
  resolve_resize(config, path)  # the images are read as the model reads them
  mesh = sharding.make_mesh(config.mesh)
  model = NearID.from_config(config, init=path)
  head, source = _baseline(config, path, model, baseline)
  embed_lib.check_head(model, head, f"baseline head from {source}")
  scores, emb = evaluate_heads(
      model, {"baseline": head, "trained": model.params["head"]}, config,
      mesh, split)
  meta = {"checkpoint": path, "step": getattr(model, "step", None),
          "baseline": source, "split": emb.split, "sources": list(emb.sources),
          "rows": int(len(emb.index)), "arch": dataclasses.asdict(model.arch),
          "embedding_width": emb.width}
  curve = os.path.join(path, "metrics.jsonl")
  with signals.deferred():  # the report's files together, never half of them
    return report.write(out_dir, meta, scores, emb,
                        curve if os.path.isfile(curve) else None)

