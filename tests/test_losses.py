"""Losses vs plain-numpy float64 references written from SPEC.md §3."""
import jax
import numpy as np
import pytest

from nearid_jax import losses

TAU, ALPHA, BIAS = 0.07, 0.5, -10.0


# ---------------------------------------------------------------- references
# Loops over samples and slots, straight from the formulas; only valid entries
# are ever looked at.

def _unit(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _lse(v):
  v = np.asarray(v, np.float64)
  if v.size == 0:
    return -np.inf
  m = v.max()
  return m + np.log(np.sum(np.exp(v - m)))


def _mean(v):
  return float(np.mean(v)) if len(v) else 0.0


def _valid_q(pm):
  return [(c, j) for c in range(pm.shape[0]) for j in range(pm.shape[1])
          if pm[c, j]]


def _ref_cosines(a, pos, neg, pm, nm):
  q = _valid_q(pm)
  b_, p_, k_ = pm.shape[0], pm.shape[1], nm.shape[1]
  return {
      "cos_pos": _mean([a[b] @ pos[b, p] for b in range(b_)
                        for p in range(p_) if pm[b, p]]),
      "cos_distractor": _mean([a[b] @ neg[b, k] for b in range(b_)
                               for k in range(k_) if nm[b, k]]),
      "cos_random": _mean([a[b] @ pos[c, j] for b in range(b_)
                           for c, j in q if c != b]),
  }


def _ref_tier1(a, pos, neg, pm, nm, tau):
  q = _valid_q(pm)
  nll, hit = [], []
  for b in range(pm.shape[0]):
    logits = ([a[b] @ pos[c, j] / tau for c, j in q] +
              [a[b] @ neg[b, k] / tau for k in range(nm.shape[1]) if nm[b, k]])
    for p in range(pm.shape[1]):
      if pm[b, p]:
        t = q.index((b, p))
        nll.append(_lse(logits) - logits[t])
        hit.append(np.argmax(logits) == t)
  return _mean(nll), _mean(hit)


def _ref_tier2(a, pos, neg, pm, nm, tau):
  q = _valid_q(pm)
  nll, hit = [], []
  for b in range(pm.shape[0]):
    lse = _lse([a[b] @ pos[c, j] / tau for c, j in q if c != b])
    for k in range(nm.shape[1]):
      if nm[b, k]:
        h = a[b] @ neg[b, k] / tau
        nll.append(-h + np.logaddexp(h, lse))
        hit.append(h > lse)
  return _mean(nll), _mean(hit)


def ref_two_tier(a, pos, neg, pm, nm):
  a, pos, neg = _unit(a), _unit(pos), _unit(neg)
  l1, acc1 = _ref_tier1(a, pos, neg, pm, nm, TAU)
  l2, acc2 = _ref_tier2(a, pos, neg, pm, nm, TAU)
  aux = {"tier1": l1, "tier2": l2, "tier1_acc": acc1, "tier2_acc": acc2,
         **_ref_cosines(a, pos, neg, pm, nm)}
  return l1 + ALPHA * l2, aux


def ref_info_nce(a, pos, neg, pm, nm):
  a, pos, neg = _unit(a), _unit(pos), _unit(neg)
  l1, acc1 = _ref_tier1(a, pos, neg, pm, nm, TAU)
  return l1, {"tier1": l1, "tier1_acc": acc1,
              **_ref_cosines(a, pos, neg, pm, nm)}


def ref_sigmoid_ext(a, pos, neg, pm, nm):
  """The release's formula, bias and all: BCE on x = cos / t + bias."""
  a, pos, neg = _unit(a), _unit(pos), _unit(neg)
  q = _valid_q(pm)
  main, dist, tier, hit = [], [], [], []
  for b in range(pm.shape[0]):
    for c, j in q:
      x = a[b] @ pos[c, j] / TAU + BIAS
      main.append(np.logaddexp(0, -x) if c == b else np.logaddexp(0, x))
    lse = _lse([a[b] @ pos[c, j] / TAU + BIAS for c, j in q if c != b])
    for k in range(nm.shape[1]):
      if nm[b, k]:
        x = a[b] @ neg[b, k] / TAU + BIAS
        dist.append(np.logaddexp(0, x))
        tier.append(np.logaddexp(0, -(x - lse)))  # -log sigmoid(x - lse)
        hit.append(x > lse)
  aux = {"sigmoid": _mean(main), "sigmoid_distractor": _mean(dist),
         "tier2": _mean(tier), "tier2_acc": _mean(hit),
         **_ref_cosines(a, pos, neg, pm, nm)}
  return aux["sigmoid"] + aux["sigmoid_distractor"] + ALPHA * aux["tier2"], aux


REFS = {"two_tier": ref_two_tier, "info_nce": ref_info_nce,
        "sigmoid_ext": ref_sigmoid_ext}
NAMES = sorted(REFS)


# ---------------------------------------------------------------- helpers

HPARAMS = {"two_tier": dict(temperature=TAU, alpha=ALPHA),
           "info_nce": dict(temperature=TAU),
           "sigmoid_ext": dict(temperature=TAU, bias=BIAS, alpha=ALPHA)}


def _loss(name, a, p, n, pm, nm):
  return losses.LOSSES[name](a, p, n, pm, nm, **HPARAMS[name])


# Jitted once per loss (masks are arguments), so tests share compilations.
FNS = {name: jax.jit(lambda *x, name=name: _loss(name, *x)) for name in NAMES}
GRADS = {name: jax.jit(jax.grad(lambda *x, name=name: _loss(name, *x)[0],
                                argnums=(0, 1, 2)))
         for name in NAMES}


def _batch(seed, b=4, p=3, k=3, d=6):
  """Unnormalised embeddings with structure (so accuracies are neither 0
  nor 1) and masks: a sample missing a view, one with no valid view at all,
  one with a single view and no distractor, and a fully valid one."""
  rng = np.random.default_rng(seed)
  a = rng.normal(size=(b, d))
  pos = a[:, None] + rng.normal(size=(b, p, d)) * rng.uniform(0.3, 2, (b, p, 1))
  neg = a[:, None] + rng.normal(size=(b, k, d)) * rng.uniform(0.3, 2, (b, k, 1))
  scale = lambda x: x * rng.uniform(0.1, 10, x.shape[:-1] + (1,))
  pm = np.ones((b, p), bool)
  nm = np.ones((b, k), bool)
  pm[1, 2] = False
  pm[2] = False
  pm[3, 1:] = False
  nm[1, 1] = False
  nm[2, 2] = False
  nm[3] = False
  return scale(a), scale(pos), scale(neg), pm, nm


def _f32(*xs):
  return [np.asarray(x, np.float32) for x in xs]


def _numeric_grad(f, xs, eps=1e-6):
  """Central differences of scalar f(*xs) in float64."""
  grads = []
  for i, x in enumerate(xs):
    g = np.zeros_like(x)
    for idx in np.ndindex(x.shape):
      hi = [y.copy() for y in xs]
      lo = [y.copy() for y in xs]
      hi[i][idx] += eps
      lo[i][idx] -= eps
      g[idx] = (f(*hi) - f(*lo)) / (2 * eps)
    grads.append(g)
  return grads


# ---------------------------------------------------------------- tests

@pytest.mark.parametrize("seed", [0, 12])
@pytest.mark.parametrize("name", NAMES)
def test_loss_and_aux_match_numpy(name, seed):
  a, pos, neg, pm, nm = _batch(seed)
  want, want_aux = REFS[name](a, pos, neg, pm, nm)
  got, aux = FNS[name](*_f32(a, pos, neg), pm, nm)
  assert abs(float(got) - want) <= 1e-5 * abs(want)
  assert set(aux) == set(want_aux)
  for key, v in want_aux.items():
    np.testing.assert_allclose(float(aux[key]), v, rtol=1e-5, atol=1e-6,
                               err_msg=key)
  # The fixture exercises both outcomes of the accuracies.
  for key in ("tier1_acc", "tier2_acc"):
    assert 0 < want_aux.get(key, 0.5) < 1, key


@pytest.mark.parametrize("name", NAMES)
def test_gradient_matches_numpy(name):
  a, pos, neg, pm, nm = _batch(1)
  want = _numeric_grad(lambda *x: REFS[name](*x, pm, nm)[0], [a, pos, neg])
  got = GRADS[name](*_f32(a, pos, neg), pm, nm)
  for arg, g, w in zip(("anchor", "positives", "negatives"), got, want):
    g = np.asarray(g, np.float64)
    err = np.linalg.norm(g - w) / np.linalg.norm(w)
    assert err <= 1e-5, (arg, err)
    # Elementwise too, relative to the largest entry of that argument.
    np.testing.assert_allclose(g, w, atol=1e-5 * np.abs(w).max(), rtol=1e-4,
                               err_msg=arg)


@pytest.mark.parametrize("name", NAMES)
def test_invalid_entries_count_nowhere(name):
  a, pos, neg, pm, nm = _batch(2)
  a, pos, neg = _f32(a, pos, neg)
  rng = np.random.default_rng(3)
  pos2, neg2 = pos.copy(), neg.copy()
  pos2[~pm] = rng.normal(size=pos2[~pm].shape) * 100
  neg2[~nm] = np.nan  # padding may hold anything
  f, g = FNS[name], GRADS[name]
  l1, aux1 = f(a, pos, neg, pm, nm)
  l2, aux2 = f(a, pos2, neg2, pm, nm)
  assert float(l1) == float(l2)
  for key in aux1:
    assert float(aux1[key]) == float(aux2[key]), key
  g1, g2 = g(a, pos, neg, pm, nm), g(a, pos2, neg2, pm, nm)
  for x, y in zip(g1, g2):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  assert not np.any(np.asarray(g2[1])[~pm])
  assert not np.any(np.asarray(g2[2])[~nm])


@pytest.mark.parametrize("name", NAMES)
def test_masked_slot_equals_removed_slot(name):
  """Masking the last view and distractor slot everywhere = not having it."""
  a, pos, neg, pm, nm = _batch(10)
  a, pos, neg = _f32(a, pos, neg)
  pm[:, -1], nm[:, -1] = False, False
  masked, aux = FNS[name](a, pos, neg, pm, nm)
  removed, aux2 = FNS[name](a, pos[:, :-1], neg[:, :-1], pm[:, :-1],
                            nm[:, :-1])
  # float32 sums over other shapes: logits (cos / tau) carry ~1e-6 of
  # rounding, so the losses agree to ~1e-6 relative, not to the last bit.
  np.testing.assert_allclose(float(masked), float(removed), rtol=1e-5)
  for key in aux:
    np.testing.assert_allclose(float(aux[key]), float(aux2[key]), rtol=1e-5,
                               atol=1e-6, err_msg=key)


@pytest.mark.parametrize("name", NAMES)
def test_scale_invariant(name):
  a, pos, neg, pm, nm = _batch(4)
  rng = np.random.default_rng(5)
  rescale = lambda x: x * rng.uniform(0.01, 100, x.shape[:-1] + (1,))
  f = FNS[name]
  l1, _ = f(*_f32(a, pos, neg), pm, nm)
  l2, _ = f(*_f32(rescale(a), rescale(pos), rescale(neg)), pm, nm)
  # Normalising rescaled float32 vectors rounds each cosine (~1e-7), and
  # the logits divide it by tau: ~1e-6 of the loss.
  np.testing.assert_allclose(float(l2), float(l1), rtol=1e-5)


def test_masks_none_means_all_valid():
  a, pos, neg, _, _ = _batch(6)
  pm, nm = np.ones(pos.shape[:2], bool), np.ones(neg.shape[:2], bool)
  got, _ = jax.jit(losses.two_tier_contrastive)(*_f32(a, pos, neg))
  want, _ = ref_two_tier(a, pos, neg, pm, nm)
  np.testing.assert_allclose(float(got), want, rtol=1e-5)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("case", ["nothing_valid", "lone_sample",
                                  "no_distractors"])
def test_degenerate_batches(name, case):
  """Empty means are 0, an empty random pool (sample 0 in lone_sample) is
  handled, and no value or gradient is NaN."""
  a, pos, neg, pm, nm = _batch(7)
  if case == "nothing_valid":
    pm[:], nm[:] = False, False
  elif case == "lone_sample":  # the others' views are all missing
    pm[:], nm[:] = False, True
    pm[0] = True
  else:
    nm[:] = False
  want, want_aux = REFS[name](a, pos, neg, pm, nm)
  got, aux = FNS[name](*_f32(a, pos, neg), pm, nm)
  np.testing.assert_allclose(float(got), want, rtol=1e-5, atol=1e-7)
  for key, v in want_aux.items():
    np.testing.assert_allclose(float(aux[key]), v, rtol=1e-5, atol=1e-6,
                               err_msg=key)
  grads = GRADS[name](*_f32(a, pos, neg), pm, nm)
  assert all(np.isfinite(np.asarray(x)).all() for x in grads)
  if case == "nothing_valid":
    assert float(got) == 0 and not any(np.any(np.asarray(x)) for x in grads)


def test_global_batch_sharded_over_devices():
  """Sharded over the data axis, positives of every device are in every
  denominator: same value as on one device and as numpy."""
  n = jax.device_count()
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
  shard = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  a, pos, neg, pm, nm = _batch(8, b=2 * n)
  pm[0] = False  # a sample with no valid view on the first device
  args = [jax.device_put(x, shard) for x in _f32(a, pos, neg) + [pm, nm]]
  got, _ = FNS["two_tier"](*args)
  want, _ = ref_two_tier(a, pos, neg, pm, nm)
  np.testing.assert_allclose(float(got), want, rtol=1e-5)


@pytest.mark.parametrize("kw, msg", [
    (dict(pos_mask=np.ones((4, 2), bool)), "pos_mask"),
    (dict(neg_mask=np.ones((3, 3), bool)), "neg_mask"),
    (dict(negatives=np.ones((4, 3, 5), np.float32)), "negatives"),
])
def test_bad_shapes_name_the_argument(kw, msg):
  a, pos, neg, _, _ = _batch(9)
  args = dict(zip(("anchor", "positives", "negatives"), _f32(a, pos, neg)))
  args.update(kw)
  with pytest.raises(ValueError, match=msg):
    losses.two_tier_contrastive(**args)
