"""Evaluation driver: embeds NearID / MTG splits on a mesh and scores them.

Every evaluation scores two heads on the same frozen tower: the trained head
and the baseline (the checkpoint's original MAP head). The tower runs once per
image and both heads read its tokens. Rows of a split arrive in padded,
fixed-shape batches (input_pipeline.eval_batches); the batch is split over the
mesh's "data" axis, the tower's weights as in training (weight_shardings).

  nearid(model, heads, cfg_input, split, sources, mesh)
      {head: per-source and pooled SSR/PA, identity retrieval}
  mtg(model, heads, cfg_input, mesh)      {head: MTG SSR, PA, M-O, M-O_pair}
  make_evaluator(config, mesh, baseline_head)
      the `evaluate(model, step) -> scalars` that train.py calls
  run(config, workdir_or_checkpoint, out_dir)
      `launch.py --mode eval`: report.json, report.md and plots (report.py)
  dreambench(model, pairs, human_dir, out_dir, method)
      DreamBench++ scores {key: 100 * cos} in the human files' key order
"""
import dataclasses
import functools
import os
import time

import jax
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np
from PIL import Image

from nearid_jax import metrics
from nearid_jax import preprocess
from nearid_jax import report
from nearid_jax import retrieval
from nearid_jax import sharding
from nearid_jax import vit
from nearid_jax import workdir as workdir_lib
from nearid_jax import xla_flags
from nearid_jax.model import NearID

# The sources SPEC.md §5 pools (FluxC and FluxC_1024 are left out).
POOLED_SOURCES = ("Flux", "Flux_1024", "Qwen", "Qwen_1328", "PowerPaint",
                  "SDXL", "SDXL_1024")
MTG_SPLIT = "test"  # MTG has train and test only
# A distractor's identity in retrieval: no query has it (rows are >= 0).
DISTRACTOR_ID = -1


@dataclasses.dataclass
class Embedded:
  """One split's embeddings per head; rows in stored order, padding dropped.

  For MTG, sources is ("mtg",), views are [I1, I2, -] and distractors
  [[I1', I2', -]], and oracle holds [o1, o2, 0] per row.
  """
  split: str
  sources: tuple
  index: np.ndarray            # (N,) dataset row = identity
  view_mask: np.ndarray        # (N, 3) bool
  distractor_mask: np.ndarray  # (N, S, 3) bool
  views: dict                  # head -> (N, 3, D) float32, unit norm
  distractors: dict            # head -> (N, S, 3, D)
  oracle: np.ndarray = None    # (N, 3) float32, MTG only

  @property
  def width(self):
    return next(iter(self.views.values())).shape[-1]


# --- the sharded embed function ---


def head_module(arch, head_params):
  """The NearIDHead that `head_params` fit (with or without a projection)."""
  proj = head_params.get("proj")
  return vit.NearIDHead(arch, proj["kernel"].shape[1] if proj else None)


def _tokens(tower, tower_params, images):
  """uint8 (..., R, R, 3) -> the tower's tokens (..., N, D)."""
  lead = images.shape[:-3]
  x = preprocess.scale(images.reshape((-1,) + images.shape[-3:]))
  t = tower.apply({"params": tower_params}, x.astype(tower.dtype))
  return t.reshape(lead + t.shape[-2:])


def _pool(arch, mesh, heads, tokens):
  """(..., N, D) tokens -> {head: (..., D)}, replicated so that every process
  reads every row."""
  lead = tokens.shape[:-2]
  t = tokens.reshape((-1,) + tokens.shape[-2:])
  out = {name: head_module(arch, h).apply({"params": h}, t)
         for name, h in heads.items()}
  return jax.lax.with_sharding_constraint(
      {k: v.reshape(lead + v.shape[-1:]) for k, v in out.items()},
      NamedSharding(mesh, P()))


# The jitted functions of one tower on one mesh (compiled per input shape).
@functools.lru_cache
def _embed_fn(tower, arch, mesh):
  return jax.jit(lambda p, heads, images: _pool(arch, mesh, heads,
                                                _tokens(tower, p, images)),
                 compiler_options=xla_flags.tower_options(arch))


@functools.lru_cache
def _tower_fn(tower, arch, mesh):
  return jax.jit(functools.partial(_tokens, tower),
                 out_shardings=sharding.batch_sharding(mesh),
                 compiler_options=xla_flags.tower_options(arch))


@functools.lru_cache
def _heads_fn(arch, mesh):
  return jax.jit(functools.partial(_pool, arch, mesh))


class Embedder:
  """Embeds uint8 image batches with several heads on one tower pass.

  The tower's params are placed once (weight_shardings over the mesh's
  weight axis, a no-op when training already placed them so), the heads
  replicated; each call's images are this process's share of a global batch,
  split over "data". Compiled once per (tower, image shape, head structure),
  shared by every Embedder of an equal tower on the same mesh. `tokens` and
  `pool` are the two halves of a call, for tokens kept between calls.
  """

  def __init__(self, model, heads, mesh):
    for name, h in heads.items():
      check_head(model, h, f"head {name!r}")
    self.model, self.mesh = model, mesh
    self.tower_params = jax.device_put(
        model.params["img"], sharding.weight_shardings(mesh,
                                                       model.params["img"]))
    self.heads = jax.device_put(dict(heads), sharding.replicated(mesh))

  def __call__(self, images):
    """uint8 (b, ..., R, R, 3), b this process's rows -> {head: (B, ..., D)}.

    Returns device arrays of the global batch B (all processes' rows).
    """
    images = sharding.global_batch(np.asarray(images), self.mesh)
    return _embed_fn(self.model.tower, self.model.arch, self.mesh)(
        self.tower_params, self.heads, images)

  def tokens(self, images):
    """uint8 (b, ..., R, R, 3) -> this process's tokens (b, ..., N, D), host."""
    images = sharding.global_batch(np.asarray(images), self.mesh)
    tokens = _tower_fn(self.model.tower, self.model.arch, self.mesh)(
        self.tower_params, images)
    return np.asarray(multihost_utils.global_array_to_host_local_array(
        tokens, self.mesh, P(sharding.DATA)))

  def pool(self, tokens):
    """`tokens`' output -> {head: (B, ..., D)}, as a call on the images."""
    return _heads_fn(self.model.arch, self.mesh)(
        self.heads, sharding.global_batch(tokens, self.mesh))


class SplitTokens:
  """One split's tower tokens, kept for later evaluations of other heads.

  The tower is frozen during training, so its tokens of the evaluation split
  never change: embed_split fills this on its first call (this process's
  rows, on the host, in the tower's dtype) and later calls run only the
  heads. Host memory: rows x (3 + 3 S) slots x N x D x dtype bytes, padding
  rows included (the paper's test split, 512 rows x 7 sources, and MTG's
  128 x 6 slots, at So400m/14@384 in bfloat16: about 22 GB; 29 MB in the
  demo).
  """

  def __init__(self):
    self.key = self.batches = None

  def nbytes(self):
    return sum(t.nbytes for _, slots in self.batches or () for t in slots)


def check_head(model, head_params, what):
  """A head must read tokens of the tower's width."""
  probe = head_params.get("MAPHead_0", {}).get("probe")
  if probe is None:
    raise ValueError(f"{what}: not a NearID head (no MAPHead_0/probe; has "
                     f"{sorted(head_params)})")
  if probe.shape[-1] != model.arch.width:
    raise ValueError(f"{what} is {probe.shape[-1]} wide but the model's tower "
                     f"is {model.arch.width} wide ({model.arch}): the head "
                     "comes from another architecture")


# --- embedding a split ---


def _gather(local):
  """This process's rows -> all processes' rows, in global order."""
  if jax.process_count() == 1:
    return local
  return multihost_utils.process_allgather(local, tiled=True)


def _eval_batch_size(batch_size, mesh):
  """Rounded up to what the data axis and the processes can split."""
  unit = np.lcm(mesh.shape[sharding.DATA], jax.process_count())
  return int(-(-batch_size // unit) * unit)


_ROW_KEYS = ("index", "valid", "view_mask", "distractor_mask", "oracle")


def embed_split(model, heads, cfg, split, sources=None, mesh=None,
                batch_size=None, dataset="nearid", tokens=None):
  """Embeds every view and distractor of a split with each head.

  Args:
    model: a NearID (its tower is used; its head only if in `heads`).
    heads: {name: head params}, e.g. {"baseline": ..., "trained": ...}.
    cfg: the input config (input_pipeline.default_config fields).
    split: "train", "val" or "test".
    sources: distractor sources (default cfg.eval_sources); ignored for MTG.
    mesh: a Mesh with a "data" axis (default: every device on "data").
    batch_size: global rows per batch (default cfg.batch_size), rounded up to
      a multiple of the data axis and of the process count.
    dataset: "nearid" or "mtg".
    tokens: a SplitTokens: filled with the split's tower tokens by the first
      call, then the images are neither read nor run through the tower
      again (the same split, sources, batch size and tower only).

  Returns:
    an Embedded.
  """
  import input_pipeline  # pylint: disable=g-import-not-at-top
  if not heads:
    raise ValueError("heads is empty: give at least one head to score")
  if cfg.res != model.arch.image_size:
    raise ValueError(f"input.res={cfg.res} but the model runs at "
                     f"{model.arch.image_size} px; set input.res (and "
                     "model.res) to the model's resolution")
  if dataset == "nearid":
    sources = tuple(cfg.eval_sources if sources is None else sources)
    if not sources:
      raise ValueError("no distractor source to evaluate (sources / "
                       "input.eval_sources is empty)")
  mesh = mesh or sharding.make_mesh([(sharding.DATA, -1)])
  batch_size = _eval_batch_size(batch_size or cfg.batch_size, mesh)
  embedder = Embedder(model, heads, mesh)

  def from_images():
    """(row metadata of the global batch, this process's images per slot
    group: views, then each source's distractors)."""
    for batch in input_pipeline.eval_batches(cfg, split, sources, batch_size,
                                             dataset):
      meta = {k: _gather(batch[k]) for k in _ROW_KEYS if k in batch}
      d = batch["distractors"]
      # One call per slot group: memory is batch * 3 images whatever S is.
      yield meta, [batch["views"]] + [d[:, k] for k in range(d.shape[1])]

  if tokens is None:
    embedded = ((meta, [embedder(x) for x in slots])
                for meta, slots in from_images())
  else:
    key = (split, sources, dataset, batch_size, model.arch)
    if tokens.batches is None:
      tokens.batches = [(meta, [embedder.tokens(x) for x in slots])
                        for meta, slots in from_images()]
      tokens.key = key
    elif tokens.key != key:
      raise ValueError(f"SplitTokens of {tokens.key} asked for {key}")
    embedded = ((meta, [embedder.pool(t) for t in slots])
                for meta, slots in tokens.batches)
  host = {k: [] for k in _ROW_KEYS}
  views, dists = [], []
  for meta, out in embedded:
    for k, v in meta.items():
      host[k].append(v)
    views.append(out[0])
    dists.append(out[1:])
    views[-1], dists[-1] = jax.device_get((views[-1], dists[-1]))
  if not views:
    what = "MTG" if dataset == "mtg" else f"NearID ({', '.join(sources)})"
    raise ValueError(f"split {split!r} of {what} under {cfg.data_dir} is "
                     "empty: nothing to evaluate")
  host = {k: np.concatenate(v) for k, v in host.items() if v}
  keep = host.pop("valid")
  names = list(heads)
  return Embedded(
      split=split, sources=("mtg",) if dataset == "mtg" else sources,
      index=host["index"][keep], view_mask=host["view_mask"][keep],
      distractor_mask=host["distractor_mask"][keep],
      views={h: np.concatenate([v[h] for v in views])[keep] for h in names},
      distractors={h: np.stack([np.concatenate([d[k][h] for d in dists])
                                for k in range(len(dists[0]))], 1)[keep]
                   for h in names},
      oracle=host["oracle"][keep] if "oracle" in host else None)


# --- scores ---


def identity_retrieval(emb, head, mesh=None):
  """A view as query; its identity's other views positive; all else gallery.

  The gallery holds every valid view and every valid distractor of every
  source; distractors belong to no identity.
  """
  q = emb.views[head][emb.view_mask]
  q_ids = np.broadcast_to(emb.index[:, None], emb.view_mask.shape)[
      emb.view_mask]
  d = emb.distractors[head][emb.distractor_mask]
  gallery = np.concatenate([q, d])
  g_ids = np.concatenate([q_ids, np.full(len(d), DISTRACTOR_ID, q_ids.dtype)])
  # The kernel takes host arrays: across processes, each scores alone.
  if mesh is not None and mesh.is_multi_process:
    mesh = None
  return retrieval.retrieval_metrics(q, q_ids, gallery, g_ids,
                                     np.arange(len(q)), mesh=mesh)


def nearid_scores(emb, mesh=None):
  """{head: {"sources": {s: ssr_pa}, "pooled", "pooled_sources", "retrieval"}}.

  "pooled" pools the margins of the POOLED_SOURCES present (absent when none
  is); "retrieval" is identity_retrieval.
  """
  out = {}
  for head in emb.views:
    per_source, margins = {}, {}
    for s, name in enumerate(emb.sources):
      margins[name] = metrics.nearid_margins(
          emb.views[head], emb.view_mask, emb.distractors[head][:, s],
          emb.distractor_mask[:, s])
      try:
        per_source[name] = metrics.ssr_from_margins(*margins[name])
      except ValueError as e:
        raise ValueError(f"split {emb.split!r} source {name!r}: {e}") from e
    res = {"sources": per_source}
    pooled = [s for s in emb.sources if s in POOLED_SOURCES]
    if pooled:
      res["pooled"] = metrics.ssr_from_margins(
          np.concatenate([margins[s][0] for s in pooled]),
          np.concatenate([margins[s][1] for s in pooled]))
      res["pooled_sources"] = pooled
    res["retrieval"] = identity_retrieval(emb, head, mesh)
    out[head] = res
  return out


def mtg_scores(emb):
  """{head: metrics.mtg(...)} over the rows with both originals and edits."""
  ok = (emb.view_mask[:, 0] & emb.view_mask[:, 1] &
        emb.distractor_mask[:, 0, 0] & emb.distractor_mask[:, 0, 1])
  if not ok.any():
    raise ValueError(f"MTG split {emb.split!r}: no row has both originals and "
                     f"both edits ({len(ok)} rows)")
  out = {}
  for head in emb.views:
    v, d = emb.views[head][ok], emb.distractors[head][ok, 0]
    cos = lambda a, b: np.asarray(metrics.cosine_rows(a, b))
    out[head] = metrics.mtg(
        s_12=cos(v[:, 0], v[:, 1]), s_11p=cos(v[:, 0], d[:, 0]),
        s_22p=cos(v[:, 1], d[:, 1]), s_12p=cos(v[:, 0], d[:, 1]),
        s_21p=cos(v[:, 1], d[:, 0]), o1=emb.oracle[ok, 0],
        o2=emb.oracle[ok, 1])
  return out


def nearid(model, heads, cfg_input, split, sources=None, mesh=None,
           batch_size=None):
  """Per-source and pooled SSR/PA and identity retrieval of each head.

  See embed_split for the arguments and nearid_scores for the result.
  """
  emb = embed_split(model, heads, cfg_input, split, sources, mesh, batch_size)
  return nearid_scores(emb, mesh)


def mtg(model, heads, cfg_input, mesh=None, batch_size=None, split=MTG_SPLIT,
        tokens=None):
  """MTG SSR, PA, M-O and M-O_pair of each head (mtg_scores)."""
  return mtg_scores(embed_split(model, heads, cfg_input, split, None, mesh,
                                batch_size, dataset="mtg", tokens=tokens))


def mtg_prepared(cfg_input):
  """Whether MTG has been prepared under cfg_input.data_dir."""
  from input_pipeline import tfds_builders  # pylint: disable=g-import-not-at-top
  try:
    tfds_builders.load_mtg(cfg_input.data_dir)
  except tfds_builders.DataError:
    return False
  return True


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
  emb = embed_split(model, heads, cfg, split or ev.split, None, mesh,
                    ev.batch_size, tokens=tokens.get("nearid"))
  scores = {h: {"nearid": r} for h, r in nearid_scores(emb, mesh).items()}
  if ev.mtg and mtg_prepared(cfg):
    for h, r in mtg(model, heads, cfg, mesh, ev.batch_size,
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
  tokens = ({"nearid": SplitTokens(), "mtg": SplitTokens()}
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
  from nearid_jax import train  # pylint: disable=g-import-not-at-top
  if baseline:
    return load_model(config, baseline).params["head"], os.fspath(baseline)
  if workdir_lib.is_workdir(path):
    wd_config = workdir_lib.read_config(path)
    init = wd_config.model.init or f"random, seed {wd_config.seed}"
    return (train.load_model(wd_config).params["head"],
            f"the run's starting head ({init})")
  init = config.model.init
  if init and os.path.abspath(init) != os.path.abspath(path):
    return train.load_model(config).params["head"], f"{init} (model.init)"
  return model.params["head"], f"{path} (its own head)"


def load_model(config, path):
  """A workdir, or any checkpoint at config.model's resolution and dtype."""
  path = os.fspath(path)
  if workdir_lib.is_workdir(path):
    return NearID.load(path)
  m = config.model
  return NearID.load(path, image_size=m.res or None, dtype=m.dtype,
                     scan=m.scan, resize=m.resize)


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
  mesh = sharding.make_mesh(config.mesh)
  model = load_model(config, path)
  head, source = _baseline(config, path, model, baseline)
  check_head(model, head, f"baseline head from {source}")
  scores, emb = evaluate_heads(
      model, {"baseline": head, "trained": model.params["head"]}, config,
      mesh, split)
  meta = {"checkpoint": path, "step": getattr(model, "step", None),
          "baseline": source, "split": emb.split, "sources": list(emb.sources),
          "rows": int(len(emb.index)), "arch": dataclasses.asdict(model.arch),
          "embedding_width": emb.width}
  curve = os.path.join(path, "metrics.jsonl")
  return report.write(out_dir, meta, scores, emb,
                      curve if os.path.isfile(curve) else None)


# --- DreamBench++ ---


def _image(x, key, which):
  if isinstance(x, (str, os.PathLike)):
    if not os.path.isfile(x):
      raise FileNotFoundError(f"DreamBench++ key {key!r}: {which} image {x} "
                              "not found")
    with Image.open(x) as im:
      return np.asarray(im.convert("RGB"))
  return x


def dreambench(model, pairs, human_dir, out_dir, method, chunk=256):
  """Scores reference/generated pairs into out_dir/{method}.json.

  Args:
    model: a NearID.
    pairs: {key: (reference, generated)}, keys as in the human rating files,
      images uint8 (H, W, 3) arrays, PIL images or paths.
    human_dir: holds group1/{method}-cp.json (gives the keys and their order).
    out_dir: the scores folder metrics.dreambench_mh reads.
    method: one of metrics.DB_METHODS.
    chunk: images decoded at a time.

  Returns:
    the written path; its JSON is {key: 100 * cos} in the human files' order.
  """
  keys = metrics.dreambench_keys(human_dir, method)
  missing = [k for k in keys if k not in pairs]
  known = set(keys)
  extra = [k for k in pairs if k not in known]
  if missing or extra:
    raise ValueError(
        f"{method}: pairs do not match the keys of "
        f"{os.path.join(human_dir, 'group1', method + '-cp.json')}: "
        f"{len(missing)} missing (first {missing[:3]}), {len(extra)} unknown "
        f"(first {extra[:3]})")
  ref, gen = [], []
  for i in range(0, len(keys), chunk):
    part = keys[i:i + chunk]
    ref.append(model.embed([_image(pairs[k][0], k, "reference")
                            for k in part]))
    gen.append(model.embed([_image(pairs[k][1], k, "generated")
                            for k in part]))
  scores = metrics.dreambench_scores(np.concatenate(ref), np.concatenate(gen),
                                     keys)
  return metrics.write_dreambench_scores(scores, out_dir, method)
