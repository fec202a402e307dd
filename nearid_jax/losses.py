"""Training losses on identity embeddings (SPEC.md §3).

NearID's two-tier contrastive loss, and the alternatives the release offers for
ablations: plain multi-positive InfoNCE (Tier 1 alone) and the extended SigLIP
sigmoid loss. All share one call,

    loss, aux = fn(anchor, positives, negatives, pos_mask, neg_mask, **hparams)

anchor (B, D), positives (B, P, D) (other views of the anchor's object),
negatives (B, K, D) (NearID distractors), bool masks (B, P) / (B, K) with None
meaning all valid; aux is a dict of scalar monitors. B is the *global* batch:
the loss runs inside the jitted, sharded train step on global arrays, so every
positive of every device sits in every denominator (Q = all B*P positives).
Inputs need not be normalised: they are L2-normalised here. Each loss takes its
own hyperparameters as keywords, so one the selected loss does not know is a
TypeError rather than silently ignored. `LOSSES` selects a loss by config name.

A masked-out (invalid) positive or distractor counts nowhere: not as a target,
not in any denominator or random pool, not in any mean or monitor; its slot may
hold anything (zeros, NaN) and gets a zero gradient.
"""
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

# Stands in for -inf in masked logits: exp(_NEG - x) is exactly 0 next to any
# real logit, yet every intermediate stays finite (a fully masked row would
# otherwise give -inf - -inf = NaN before its mask drops it), so no NaN can
# reach a value or a gradient.
_NEG = -1e9


class _Sims(NamedTuple):
  """Cosines of every anchor with the batch's embeddings, and which count."""
  pool: jax.Array        # (B, B*P) anchor b vs every positive of the batch
  pool_valid: jax.Array  # (B, B*P) that positive is valid
  own: jax.Array         # (B, B*P) that positive is one of b's own
  target: jax.Array      # (B, P) column of b's p-th positive in `pool`
  pos_valid: jax.Array   # (B, P)
  dist: jax.Array        # (B, K) anchor b vs its own distractors
  dist_valid: jax.Array  # (B, K)


def _check_shapes(anchor, positives, negatives, pos_mask, neg_mask):
  if anchor.ndim != 2:
    raise ValueError(f"anchor must be (B, D), got shape {anchor.shape}")
  b, d = anchor.shape
  for name, x in (("positives", positives), ("negatives", negatives)):
    if x.ndim != 3 or x.shape[0] != b or x.shape[2] != d:
      raise ValueError(f"{name} must be (B, n, D) = ({b}, n, {d}) to match "
                       f"anchor, got shape {x.shape}")
  for name, m, x in (("pos_mask", pos_mask, positives),
                     ("neg_mask", neg_mask, negatives)):
    if m is not None and np.shape(m) != x.shape[:2]:
      raise ValueError(f"{name} must have shape {x.shape[:2]}, got "
                       f"{np.shape(m)}")


def _normalize(x, valid):
  # Invalid slots are zeroed first, so whatever padding holds (even NaN) never
  # reaches a value or a gradient; the clamp keeps zero vectors' grads finite.
  x = jnp.where(valid[..., None], x, 0)
  sq = jnp.sum(x * x, axis=-1, keepdims=True)
  return x * jax.lax.rsqrt(jnp.maximum(sq, 1e-12))


def _similarities(anchor, positives, negatives, pos_mask, neg_mask):
  anchor, positives, negatives = map(jnp.asarray,
                                     (anchor, positives, negatives))
  _check_shapes(anchor, positives, negatives, pos_mask, neg_mask)
  b, p = positives.shape[:2]
  pos_valid = (jnp.ones((b, p), bool) if pos_mask is None
               else jnp.asarray(pos_mask, bool))
  dist_valid = (jnp.ones(negatives.shape[:2], bool) if neg_mask is None
                else jnp.asarray(neg_mask, bool))
  # At least float32: bf16 cosines divided by tau = 0.07 are too coarse.
  dtype = jnp.result_type(anchor, positives, negatives, jnp.float32)
  a = _normalize(anchor.astype(dtype), jnp.ones((b,), bool))
  q = _normalize(positives.astype(dtype), pos_valid).reshape(b * p, -1)
  n = _normalize(negatives.astype(dtype), dist_valid)
  # Full precision: TPU/GPU default f32 matmuls round to bf16/tf32, and the
  # cosines get amplified by 1/tau; this matmul is tiny next to the model.
  hi = jax.lax.Precision.HIGHEST
  return _Sims(
      pool=jnp.einsum("bd,qd->bq", a, q, precision=hi),
      pool_valid=jnp.broadcast_to(pos_valid.reshape(1, b * p), (b, b * p)),
      own=jnp.repeat(jnp.eye(b, dtype=bool), p, axis=1),
      target=jnp.arange(b)[:, None] * p + jnp.arange(p)[None, :],
      pos_valid=pos_valid,
      dist=jnp.einsum("bd,bkd->bk", a, n, precision=hi),
      dist_valid=dist_valid)


def _masked_mean(x, mask):
  """Mean of x over mask; 0 (with zero gradient) when mask is all False."""
  return jnp.sum(jnp.where(mask, x, 0)) / jnp.maximum(jnp.sum(mask), 1)


def _masked_logsumexp(x, mask):
  return jax.nn.logsumexp(jnp.where(mask, x, _NEG), axis=-1)


def _tier1(s, temperature):
  """Multi-positive InfoNCE over Q ++ own distractors -> (loss, top-1 acc)."""
  logits = jnp.concatenate([
      jnp.where(s.pool_valid, s.pool / temperature, _NEG),
      jnp.where(s.dist_valid, s.dist / temperature, _NEG)], axis=1)
  # Each (b, p) is a softmax cross-entropy over row b with target column
  # target[b, p]; all positives of b share the row's normaliser.
  lse = jax.nn.logsumexp(logits, axis=1)
  nll = lse[:, None] - jnp.take_along_axis(logits, s.target, axis=1)
  hit = jnp.argmax(logits, axis=1)[:, None] == s.target
  return _masked_mean(nll, s.pos_valid), _masked_mean(hit, s.pos_valid)


def _tier2(s, temperature):
  """Each distractor vs the random pool of b -> (loss, accuracy)."""
  # LSE_b over the valid positives of the *other* samples.
  lse = _masked_logsumexp(s.pool / temperature, s.pool_valid & ~s.own)
  h = s.dist / temperature
  # -h + logaddexp(h, LSE_b) = softplus(LSE_b - h), without the cancellation
  # when h >> LSE_b. An empty pool (LSE_b ~ _NEG) gives exactly 0.
  nll = jax.nn.softplus(lse[:, None] - h)
  hit = h > lse[:, None]  # nll < log 2
  return _masked_mean(nll, s.dist_valid), _masked_mean(hit, s.dist_valid)


def _cosines(s):
  """Mean cosine of the anchor with its positives, distractors, random pool."""
  return {
      "cos_pos": _masked_mean(
          jnp.take_along_axis(s.pool, s.target, axis=1), s.pos_valid),
      "cos_distractor": _masked_mean(s.dist, s.dist_valid),
      "cos_random": _masked_mean(s.pool, s.pool_valid & ~s.own),
  }


def two_tier_contrastive(anchor, positives, negatives, pos_mask=None,
                         neg_mask=None, temperature=0.07, alpha=0.5):
  """NearID's loss L1 + alpha * L2 (SPEC.md §3) -> (loss, aux).

  Tier 1: for each valid positive (b, p), softmax cross-entropy of the logits
  [a_b . q / tau for valid q in Q] ++ [a_b . n_{b,k} / tau for valid k], target
  p's own column; L1 = mean over valid (b, p). b's other positives stay in the
  denominator (as in the release). Tier 2: LSE_b = logsumexp of a_b . q / tau
  over the valid q in Q that are not b's own; for each valid distractor,
  nll = -h + logaddexp(h, LSE_b) with h = a_b . n_{b,k} / tau; L2 = mean over
  valid (b, k). A mean over nothing is 0.

  Differences from the release, all about masks (identical when everything is
  valid): the release leaves padded distractors and other samples' invalid
  positives in the Tier-1 denominator and the Tier-2 pool; we drop them. It
  also averages Tier 1 per positive slot and then over slots; we average over
  valid (b, p) as SPEC says.

  aux (scalars): tier1, tier2 (L1, L2); tier1_acc, the fraction of valid
  (b, p) whose target is the argmax of its Tier-1 logits row (the row is
  shared by b's positives, so with P valid positives each the ceiling is 1/P);
  tier2_acc, the fraction of valid distractors above their random pool
  (h > LSE_b, i.e. nll < log 2); cos_pos, cos_distractor, cos_random: mean
  cosine of the anchor with its valid positives, its valid distractors and the
  valid positives of the other samples.
  """
  s = _similarities(anchor, positives, negatives, pos_mask, neg_mask)
  l1, acc1 = _tier1(s, temperature)
  l2, acc2 = _tier2(s, temperature)
  aux = {"tier1": l1, "tier2": l2, "tier1_acc": acc1, "tier2_acc": acc2,
         **_cosines(s)}
  return l1 + alpha * l2, aux


def info_nce(anchor, positives, negatives, pos_mask=None, neg_mask=None,
             temperature=0.07):
  """Plain multi-positive InfoNCE: Tier 1 of two_tier_contrastive alone.

  The distractors are extra negatives in the denominator, nothing more.
  aux: tier1, tier1_acc and the cosines, as in two_tier_contrastive.
  """
  s = _similarities(anchor, positives, negatives, pos_mask, neg_mask)
  l1, acc1 = _tier1(s, temperature)
  return l1, {"tier1": l1, "tier1_acc": acc1, **_cosines(s)}


def sigmoid_ext(anchor, positives, negatives, pos_mask=None, neg_mask=None,
                temperature=0.07, bias=-10.0, alpha=0.5):
  """The release's extended SigLIP sigmoid loss -> (loss, aux).

  Logits are x = cos / temperature + bias. main: binary cross-entropy of
  anchor b against every valid q in Q, label 1 for b's own positives and 0
  otherwise, averaged over the B x |valid Q| pairs. distractor: binary
  cross-entropy with label 0 of each valid distractor's logit, averaged over
  valid (b, k). tier: -log sigmoid(x_{b,k} - logsumexp of x over b's random
  pool), averaged over valid (b, k); the bias cancels, so this is exactly
  two_tier_contrastive's Tier 2. Loss = main + distractor + alpha * tier.

  aux: sigmoid (main), sigmoid_distractor, tier2, tier2_acc and the cosines,
  as in two_tier_contrastive.
  """
  s = _similarities(anchor, positives, negatives, pos_mask, neg_mask)
  x = s.pool / temperature + bias
  # BCE with logits: label 1 -> softplus(-x), label 0 -> softplus(x).
  bce = jax.nn.softplus(jnp.where(s.own, -x, x))
  main = _masked_mean(bce, s.pool_valid)
  dist = _masked_mean(jax.nn.softplus(s.dist / temperature + bias),
                      s.dist_valid)
  tier, acc2 = _tier2(s, temperature)
  aux = {"sigmoid": main, "sigmoid_distractor": dist, "tier2": tier,
         "tier2_acc": acc2, **_cosines(s)}
  return main + dist + alpha * tier, aux


LOSSES = {
    "two_tier": two_tier_contrastive,
    "info_nce": info_nce,
    "sigmoid_ext": sigmoid_ext,
}
