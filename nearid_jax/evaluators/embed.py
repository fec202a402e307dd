"""The one evaluation pass: a split's images through the frozen tower once,
every head reading its tokens.

Rows of a split arrive in padded, fixed-shape batches
(input_pipeline.eval_batches); the batch is split over the mesh's "data"
axis, the tower's weights as in training (weight_shardings). The tokens of a
split can be kept between evaluations (SplitTokens): the tower is frozen.

  embed_split(model, heads, cfg_input, split, ...) -> Embedded
  Embedder(model, heads, mesh)   tokens, pool, or both for one batch
"""
import dataclasses
import functools

import jax
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np

import input_pipeline
from nearid_jax import sharding
from nearid_jax import vit
from nearid_jax.cpu import xla_flags
from nearid_jax.model import tower_tokens


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


def head_module(arch, kernels, head_params):
  """The NearIDHead that `head_params` fit (with or without a projection)."""
  proj = head_params.get("proj")
  return vit.NearIDHead(arch, proj["kernel"].shape[1] if proj else None,
                        kernels=kernels)


def _pool(arch, kernels, mesh, heads, tokens):
  """(..., N, D) tokens -> {head: (..., D)}, replicated so that every process
  reads every row."""
  lead = tokens.shape[:-2]
  t = tokens.reshape((-1,) + tokens.shape[-2:])
  out = {name: head_module(arch, kernels, h).apply({"params": h}, t)
         for name, h in heads.items()}
  return jax.lax.with_sharding_constraint(
      {k: v.reshape(lead + v.shape[-1:]) for k, v in out.items()},
      NamedSharding(mesh, P()))


# The jitted functions of one tower on one mesh (compiled per input shape).
@functools.lru_cache
def _embed_fn(tower, mesh):
  placed = sharding.fsdp_tower(tower, mesh)
  return jax.jit(
      lambda p, heads, images: _pool(tower.arch, tower.kernels, mesh, heads,
                                     tower_tokens(placed, p, images)),
      compiler_options=xla_flags.tower_options(tower.arch))


@functools.lru_cache
def _tower_fn(tower, mesh):
  return jax.jit(functools.partial(tower_tokens,
                                   sharding.fsdp_tower(tower, mesh)),
                 out_shardings=sharding.batch_sharding(mesh),
                 compiler_options=xla_flags.tower_options(tower.arch))


@functools.lru_cache
def _heads_fn(arch, kernels, mesh):
  return jax.jit(functools.partial(_pool, arch, kernels, mesh))


class Embedder:
  """Embeds uint8 image batches with several heads on one tower pass.

  The tower's params are placed once (weight_shardings over the mesh's
  "fsdp" axis, a no-op when training already placed them so), the heads
  replicated; each call's images are this process's share of a global batch,
  split over the batch axes (sharding.batch_axes). Compiled once per (tower,
  image shape, head structure), shared by every Embedder of an equal tower
  on the same mesh. `tokens` and `pool` are the two halves of a call, for
  tokens kept between calls.
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
    return _embed_fn(self.model.tower, self.mesh)(self.tower_params,
                                                  self.heads, images)

  def tokens(self, images):
    """uint8 (b, ..., R, R, 3) -> this process's tokens (b, ..., N, D), host."""
    images = sharding.global_batch(np.asarray(images), self.mesh)
    tokens = _tower_fn(self.model.tower, self.mesh)(self.tower_params, images)
    return np.asarray(multihost_utils.global_array_to_host_local_array(
        tokens, self.mesh, sharding.batch_spec(self.mesh)))

  def pool(self, tokens):
    """`tokens`' output -> {head: (B, ..., D)}, as a call on the images."""
    return _heads_fn(self.model.arch, self.model.kernels, self.mesh)(
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
  """Rounded up to what the batch axes and the processes can split."""
  unit = np.lcm(sharding.batch_shards(mesh), jax.process_count())
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
      a multiple of the batch axes' split and of the process count.
    dataset: "nearid" or "mtg".
    tokens: a SplitTokens: filled with the split's tower tokens by the first
      call, then the images are neither read nor run through the tower
      again (the same split, sources, batch size and tower only).

  Returns:
    an Embedded.
  """
  if not heads:
    raise ValueError("heads is empty: give at least one head to score")
  if cfg.res != model.arch.image_size:
    raise ValueError(f"input.res={cfg.res} but the model runs at "
                     f"{model.arch.image_size} px; set input.res (and "
                     "model.res) to the model's resolution")
  if cfg.resize != model.resize:
    raise ValueError(f"input.resize={cfg.resize!r} but the model resizes "
                     f"with {model.resize!r}; set model.resize (input.resize "
                     "follows it) to the model's")
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

