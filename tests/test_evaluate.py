"""The evaluation driver against an independent reference: NearID.embed on the
same images, read straight from the HF files (not through TFDS or grain), and
the metrics of SPEC §5 applied to those embeddings."""
import io
import json
import os
import shutil
import sys

import jax
import ml_collections
import numpy as np
import pytest
from PIL import Image

import input_pipeline
from configs.common import training_config
from fake_data import FakeGroups
import workers
from input_pipeline import hf_format
from input_pipeline import oracle as oracle_lib
from input_pipeline import synthetic
from nearid_jax.evaluators import dreambench
from nearid_jax.evaluators import embed
from nearid_jax.evaluators import evaluate
from nearid_jax.evaluators import mtg as mtg_eval
from nearid_jax.evaluators import nearid as nearid_eval
from nearid_jax import metrics
from nearid_jax import model as model_lib
from nearid_jax import sharding
from nearid_jax.training import train
from nearid_jax import vit
from nearid_jax.formats import bigvision
from nearid_jax.model import NearID
from nearid_jax.model import split_params

RES = 32  # at 16 or 24 px some edits vanish: distractors equal to views
SOURCES = ("Flux", "Qwen", "FluxC")
# Each source's distractors are taken from the row this far ahead: another
# identity on another background, so a random tower wins some margins and
# loses others (true near-identity distractors would beat it every time).
# FluxC keeps its own (and is left out of the pooled numbers anyway).
SHIFT = {"Flux": 1, "Qwen": 2, "FluxC": 0}
SPLIT = "train"


def _shifted_rows(original):
  def rows(num_identities, res, seed, sources):
    pos, neg = original(num_identities, res, seed, sources)
    for s, cols in neg.items():
      for k in range(1, 4):
        kind, v = cols[f"nimg{k}"]
        # An edit of a hidden part renders the view itself: drop those, so
        # no two gallery images tie exactly (ties meet float noise).
        v = [None if d == p else d for d, p in zip(v, pos[f"images{k}"][1])]
        cols[f"nimg{k}"] = (kind, v[SHIFT[s]:] + v[:SHIFT[s]])
    return pos, neg
  return rows


def _input_config(root):
  cfg = input_pipeline.default_config()
  cfg.data_dir = os.path.join(root, "tfds")
  cfg.manual_dir = os.path.join(root, "hf")
  cfg.sources = cfg.eval_sources = SOURCES
  cfg.res, cfg.batch_size, cfg.mtg_repeat = RES, 4, 0
  return cfg


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  cfg = _input_config(str(tmp_path_factory.mktemp("evaldata")))
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(synthetic, "nearid_rows", _shifted_rows(synthetic.nearid_rows))
    synthetic.generate(cfg.manual_dir, num_identities=14, res=RES,
                       sources=SOURCES, mtg=20)
  input_pipeline.prepare(cfg)
  return cfg


def _towers():
  """Canonical flat params: a random pico tower + head, and the same tower
  with another head (the first head's weights plus noise)."""
  arch = vit.Arch.from_variant("pico/8", RES)
  flat = model_lib.random_tower(arch, 0)
  rng = np.random.default_rng(1)
  other = {k: v + 0.3 * rng.standard_normal(v.shape).astype(v.dtype)
           if k.startswith("MAPHead_0") else v for k, v in flat.items()}
  return arch, [flat, other]


def _model_and_heads(towers):
  arch, flats = towers
  model = NearID(arch, split_params(flats[0], arch, False))
  return model, {"baseline": model.params["head"],
                 "trained": split_params(flats[1], arch, False)["head"]}


@pytest.fixture(scope="module")
def towers():
  return _towers()


@pytest.fixture(scope="module")
def model(towers):
  return _model_and_heads(towers)[0]


@pytest.fixture(scope="module")
def heads(towers):
  return _model_and_heads(towers)[1]


def mesh_4x2():
  return sharding.make_mesh([("data", 4), ("fsdp", 2)], jax.devices())


def one_device():
  return sharding.make_mesh([("data", 1)], jax.devices()[:1])


# --- the independent reference ---


def _decode(data):
  return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def reference_images(manual, split):
  """Rows of a split straight from the HF files: images or None per slot."""
  with open(os.path.join(manual, "splits", f"{split}.json")) as f:
    rows = json.load(f)
  pos = hf_format.Table(os.path.join(manual, "NearID"))
  srcs = {s: hf_format.Table(os.path.join(manual, f"NearID-{s}"))
          for s in SOURCES}
  out = []
  for r in rows:
    row = pos.row(r)
    n = row["n_images"]
    views = [_decode(hf_format.image_bytes(row[f"images{k + 1}"], pos))
             if k < n else None for k in range(3)]
    dists = {}
    for s, t in srcs.items():
      srow = t.row(r)
      dists[s] = [None] * 3
      for k in range(n):
        data = hf_format.image_bytes(srow[f"nimg{k + 1}"], t)
        dists[s][k] = None if data is None else _decode(data)
    out.append((r, views, dists))
  return out


def embed_slots(m, slots):
  """Images-or-None (N, K) -> embeddings (N, K, D) (zeros), mask (N, K)."""
  mask = np.array([[im is not None for im in row] for row in slots])
  flat = [im for row in slots for im in row if im is not None]
  emb = np.zeros(mask.shape + (m.out_dim,), np.float32)
  emb[mask] = m.embed(np.stack(flat))
  return emb, mask


def reference(model, head, manual, split=SPLIT):
  m = NearID(model.arch, {"img": model.params["img"], "head": head})
  rows = reference_images(manual, split)
  views, vmask = embed_slots(m, [v for _, v, _ in rows])
  dists, dmasks = zip(*[embed_slots(m, [d[s] for _, _, d in rows])
                        for s in SOURCES])
  return (np.array([r for r, _, _ in rows]), views, vmask,
          np.stack(dists, 1), np.stack(dmasks, 1))


def reference_retrieval(views, vmask, dists, dmask, ids):
  """Plain numpy: full score matrix, stable sort, R@k and AP."""
  q = views[vmask]
  q_ids = np.broadcast_to(ids[:, None], vmask.shape)[vmask]
  g = np.concatenate([q, dists[dmask]])
  g_ids = np.concatenate([q_ids, np.full(dmask.sum(), -1)])
  hits = {1: [], 5: [], 10: []}
  aps = []
  for i in range(len(q)):
    others = np.delete(np.arange(len(g)), i)
    s = g[others] @ q[i]
    ranked = others[np.argsort(-s, kind="stable")]
    pos = g_ids[ranked] == q_ids[i]
    if not pos.any():
      continue
    for k in hits:
      hits[k].append(pos[:k].any())
    ranks = np.flatnonzero(pos) + 1
    aps.append(np.mean(np.arange(1, len(ranks) + 1) / ranks))
  out = {f"r@{k}": np.mean(v) for k, v in hits.items()}
  out["map"] = np.mean(aps)
  return out


# --- tests ---


def test_embeddings_equal_nearid_embed_and_sharded_equals_single(
    data, model, heads):
  assert len(jax.devices()) == 8
  sharded = embed.embed_split(model, heads, data, SPLIT, SOURCES,
                                 mesh_4x2())
  single = embed.embed_split(model, heads, data, SPLIT, SOURCES,
                                one_device())
  for name, head in heads.items():
    ids, views, vmask, dists, dmask = reference(model, head, data.manual_dir)
    np.testing.assert_array_equal(sharded.index, ids)
    np.testing.assert_array_equal(sharded.view_mask, vmask)
    np.testing.assert_array_equal(sharded.distractor_mask, dmask)
    for emb in (sharded, single):
      np.testing.assert_allclose(emb.views[name][vmask], views[vmask],
                                 atol=2e-5)
      np.testing.assert_allclose(emb.distractors[name][dmask], dists[dmask],
                                 atol=2e-5)
    np.testing.assert_allclose(sharded.views[name], single.views[name],
                               atol=2e-5)
  # The split has rows with 2 views and the shift leaves some slots empty.
  assert not vmask.all()
  assert not dmask[np.broadcast_to(vmask[:, None], dmask.shape)].all()


def test_nearid_numbers_equal_reference(data, model, heads):
  mesh = mesh_4x2()
  emb = embed.embed_split(model, heads, data, SPLIT, SOURCES, mesh)
  got = nearid_eval.nearid_scores(emb, mesh)
  assert got == nearid_eval.nearid(model, heads, data, SPLIT, SOURCES, mesh)
  for name, head in heads.items():
    ids, views, vmask, dists, dmask = reference(model, head, data.manual_dir)
    r = got[name]
    for s, src in enumerate(SOURCES):
      want = metrics.ssr_pa(views, vmask, dists[:, s], dmask[:, s])
      assert r["sources"][src] == want, (name, src)
    # pooled = SPEC's seven sources present (FluxC excluded), concatenated
    assert r["pooled_sources"] == ["Flux", "Qwen"]
    pooled = metrics.ssr_pa(np.concatenate([views, views]),
                            np.concatenate([vmask, vmask]),
                            np.concatenate([dists[:, 0], dists[:, 1]]),
                            np.concatenate([dmask[:, 0], dmask[:, 1]]))
    assert r["pooled"] == pooled
    # Ranks from the driver's own embeddings (compared above): scores 6e-6
    # apart must not meet the two jits' float noise.
    want = reference_retrieval(emb.views[name], vmask,
                               emb.distractors[name], dmask, ids)
    for k, v in want.items():
      np.testing.assert_allclose(r["retrieval"][k], v, rtol=1e-6, err_msg=k)
  # non-degenerate data: the numbers above are not all 0 or all 1
  pas = [got[h]["sources"][s]["pa"] for h in heads for s in ("Flux", "Qwen")]
  assert 0 < min(pas) and max(pas) < 1


def test_baseline_and_trained_differ_only_when_heads_do(data, model, heads):
  got = nearid_eval.nearid(model, heads, data, SPLIT, SOURCES, one_device())
  assert got["baseline"] != got["trained"]
  same = nearid_eval.nearid(model, {"baseline": heads["baseline"],
                                 "trained": heads["baseline"]},
                         data, SPLIT, SOURCES, one_device())
  assert same["baseline"] == same["trained"] == got["baseline"]


def test_mtg_equals_reference(data, model, heads):
  got = mtg_eval.mtg(model, heads, data, mesh_4x2())
  t = hf_format.Table(os.path.join(data.manual_dir, "mtg-dataset"), "test")
  rows = [t.row(i) for i in range(len(t))]
  img = lambda r, f: _decode(hf_format.image_bytes(r[f], t))
  oracle = [[oracle_lib.mtg_oracle(img(r, f"image_{i}_part_mask"),
                                img(r, f"image_{i}_object_mask"))
             for i in (1, 2)] for r in rows]
  o1, o2 = np.array(oracle).T
  assert len(rows) == got["baseline"]["n_samples"] == 4
  for name, head in heads.items():
    m = NearID(model.arch, {"img": model.params["img"], "head": head})
    e = {f: m.embed(np.stack([img(r, f) for r in rows])) for f in (
        "image_1_original", "image_2_original", "image_1_inpainted",
        "image_2_inpainted")}
    cos = lambda a, b: np.sum(e[a] * e[b], 1)
    want = metrics.mtg(
        cos("image_1_original", "image_2_original"),
        cos("image_1_original", "image_1_inpainted"),
        cos("image_2_original", "image_2_inpainted"),
        cos("image_1_original", "image_2_inpainted"),
        cos("image_2_original", "image_1_inpainted"), o1, o2)
    for k, v in want.items():
      np.testing.assert_allclose(got[name][k], v, rtol=1e-4, atol=1e-5,
                                 err_msg=f"{name} {k}")


def test_kept_tokens_give_the_embeddings_without_the_images(
    data, model, heads, monkeypatch):
  mesh = mesh_4x2()
  kept = {"nearid": embed.SplitTokens(), "mtg": embed.SplitTokens()}
  args = (data, SPLIT, SOURCES, mesh)
  first = embed.embed_split(model, {"baseline": heads["baseline"]}, *args,
                               tokens=kept["nearid"])
  first_mtg = mtg_eval.mtg(model, heads, data, mesh, tokens=kept["mtg"])
  # The tokens of every slot, in the tower's dtype: batches of 8 rows (4
  # asked, rounded up to the 8-way data x fsdp split).
  n = 8 * 3 * (1 + len(SOURCES)) * model.arch.num_patches * model.arch.width
  assert kept["nearid"].nbytes() == len(kept["nearid"].batches) * n * 4

  def no_images(*a, **k):
    raise AssertionError("images read again")
  monkeypatch.setattr(input_pipeline, "eval_batches", no_images)
  again = embed.embed_split(model, heads, *args, tokens=kept["nearid"])
  monkeypatch.undo()
  want = embed.embed_split(model, heads, *args)
  for emb in (first, again):
    np.testing.assert_array_equal(emb.index, want.index)
    np.testing.assert_array_equal(emb.distractor_mask, want.distractor_mask)
  # One jit or two: float32 programs that sum in other orders, so the
  # tolerance of the sharded-vs-single check above.
  for name in heads:
    np.testing.assert_allclose(again.views[name], want.views[name],
                               atol=2e-5)
    np.testing.assert_allclose(again.distractors[name],
                               want.distractors[name], atol=2e-5)
  np.testing.assert_allclose(first.views["baseline"], want.views["baseline"],
                             atol=2e-5)
  monkeypatch.setattr(input_pipeline, "eval_batches", no_images)
  mtg_again = mtg_eval.mtg(model, heads, data, mesh, tokens=kept["mtg"])
  for name in heads:
    for k, v in first_mtg[name].items():
      assert mtg_again[name][k] == pytest.approx(v, abs=1e-6), (name, k)
  with pytest.raises(ValueError, match="SplitTokens of .* asked for"):
    embed.embed_split(model, heads, data, SPLIT, SOURCES[:1], mesh,
                         tokens=kept["nearid"])


def tiny_config(data, **kw):
  c = training_config()
  c.model.variant, c.model.res, c.model.scan = "pico/8", RES, False
  c.input.update({k: data[k] for k in ("data_dir", "manual_dir", "sources",
                                       "eval_sources", "mtg_repeat")})
  c.input.batch_size = 8
  c.eval.split, c.eval.batch_size = SPLIT, 4
  c.mesh = [("data", 4), ("fsdp", 2)]
  c.total_steps, c.warmup_steps, c.lr = 2, 1, 1e-2
  c.log_every, c.ckpt_every, c.eval_every = 1, 2, 2
  c.update(kw)
  return c


@pytest.mark.parametrize("cache_tokens", [True, False])
def test_evaluator_keys_and_cached_baseline(data, model, heads, monkeypatch,
                                            cache_tokens):
  config = tiny_config(data)
  config.eval.cache_tokens = cache_tokens
  mesh = sharding.make_mesh(config.mesh)
  calls = []
  original = embed.embed_split
  monkeypatch.setattr(embed, "embed_split", lambda m, h, *a, **k: (
      calls.append(sorted(h)), original(m, h, *a, **k))[1])
  ev = evaluate.make_evaluator(config, mesh, heads["baseline"])
  m = NearID(model.arch, {"img": model.params["img"],
                          "head": heads["trained"]})
  first = ev(m, 0)
  m.params = {"img": model.params["img"], "head": heads["baseline"]}
  second = ev(m, 1)
  # the baseline once (NearID and MTG), then the trained head alone
  assert calls == [["baseline", "trained"]] * 2 + [["trained"]] * 2
  want = nearid_eval.nearid(model, heads, data, SPLIT, None, mesh)
  want_mtg = mtg_eval.mtg(model, heads, data, mesh)
  for out, trained in ((first, "trained"), (second, "baseline")):
    assert out["eval/nearid/ssr"] == want[trained]["pooled"]["ssr"]
    assert out["eval/nearid/pa"] == want[trained]["pooled"]["pa"]
    for s in SOURCES:
      assert out[f"eval/nearid/{s.lower()}/pa"] == (
          want[trained]["sources"][s]["pa"])
    assert out["eval/retrieval/r@1"] == want[trained]["retrieval"]["r@1"]
    # Kept tokens and images are two float32 programs: their cosines differ
    # by float32 rounding (~1e-6 on 64-wide unit vectors), and a Pearson r
    # divides by the similarities' spread across the few MTG rows (~0.1).
    assert out["eval/mtg/mo"] == pytest.approx(want_mtg[trained]["mo"],
                                               abs=2e-5)
    assert out["baseline/nearid/ssr"] == want["baseline"]["pooled"]["ssr"]
    assert out["baseline/mtg/pa"] == want_mtg["baseline"]["pa"]
  assert {k for k in first if k.startswith("baseline/")} == {
      "baseline/" + k[5:] for k in first if k.startswith("eval/")}
  assert first["eval/retrieval/map"] != second["eval/retrieval/map"]


@pytest.mark.slow
def test_train_then_standalone_report(data, towers, tmp_path):
  init = str(tmp_path / "tower.npz")
  bigvision.save(init, towers[1][0], two_tower=False)
  config = tiny_config(data)
  config.model.init = init
  mesh = sharding.make_mesh(config.mesh)
  baseline = NearID.from_config(config).params["head"]
  wd = str(tmp_path / "run")
  train.train_and_evaluate(
      config, wd, data_iter=FakeGroups(8, RES),
      evaluate=evaluate.make_evaluator(config, mesh, baseline))
  with open(os.path.join(wd, "metrics.jsonl")) as f:
    logged = [json.loads(line) for line in f]
  evals = [r for r in logged if "eval/nearid/ssr" in r]
  assert [r["step"] for r in evals] == [0, 2]
  # step 0: the trained head is still the baseline
  assert evals[0]["eval/nearid/pa"] == evals[0]["baseline/nearid/pa"]

  out = str(tmp_path / "eval")
  # A save in flight (a run still writing the workdir) is left alone.
  in_flight = os.path.join(wd, "checkpoints", "4.orbax-checkpoint-tmp-99")
  shutil.copytree(os.path.join(wd, "checkpoints", "2"), in_flight)
  rep = evaluate.run(config, wd, out)
  assert os.path.isdir(os.path.join(in_flight, "state"))
  for f in ("report.json", "report.md", "similarity_hist.png",
            "kernel_pca.png", "training_curve.png"):
    assert os.path.getsize(os.path.join(out, f)) > 0, f
  assert rep["meta"]["step"] == 2
  # the standalone eval of the last checkpoint = the in-training eval at 2
  assert rep["scores"]["trained"]["nearid"]["pooled"]["pa"] == (
      evals[-1]["eval/nearid/pa"])
  assert rep["scores"]["baseline"]["nearid"]["pooled"]["pa"] == (
      evals[0]["baseline/nearid/pa"])


def test_run_on_a_checkpoint(data, model, heads, towers, tmp_path):
  config = tiny_config(data)
  config.eval.mtg = False
  flat, other_flat = towers[1]
  ckpt = str(tmp_path / "tower.npz")
  bigvision.save(ckpt, flat, two_tower=False)
  rep = evaluate.run(config, ckpt, str(tmp_path / "own"))
  # no workdir, no model.init: the checkpoint's own head is the baseline
  assert rep["scores"]["baseline"] == rep["scores"]["trained"]
  assert "mtg" not in rep["scores"]["trained"]
  # the other head on the same tower, scored against ckpt's head
  other = str(tmp_path / "other.npz")
  bigvision.save(other, other_flat, two_tower=False)
  rep = evaluate.run(config, other, str(tmp_path / "vs"), baseline=ckpt)
  want = nearid_eval.nearid(model, heads, data, SPLIT, None, mesh_4x2())
  for h in ("baseline", "trained"):
    assert rep["scores"][h]["nearid"] == want[h]


# --- errors ---


def test_empty_split(data, model, heads, monkeypatch):
  # TFDS refuses to prepare an empty split, so stand in for the pipeline.
  monkeypatch.setattr(input_pipeline, "eval_batches", lambda *a, **k: iter(()))
  with pytest.raises(ValueError, match=r"split 'val' of NearID \(Flux, Qwen, "
                     r"FluxC\) under .* is empty"):
    nearid_eval.nearid(model, heads, data, "val", SOURCES, one_device())


def test_missing_source_is_named(data, model, heads):
  with pytest.raises(input_pipeline.DataError, match="never prepared.*SDXL"):
    nearid_eval.nearid(model, heads, data, SPLIT, ("Flux", "SDXL"), one_device())
  with pytest.raises(ValueError, match="no distractor source"):
    nearid_eval.nearid(model, heads, data, SPLIT, (), one_device())


def test_images_resized_otherwise_than_the_model_are_refused(data, model,
                                                              heads):
  cfg = ml_collections.ConfigDict(data.to_dict())
  cfg.resize = "pil-bicubic"
  with pytest.raises(ValueError, match="input.resize='pil-bicubic' but the "
                     "model resizes with 'pil'"):
    embed.embed_split(model, heads, cfg, SPLIT)


def test_head_of_another_width(data, model, heads, towers, tmp_path):
  arch = vit.Arch.from_variant("mu/8", RES)  # 32 wide; the tower is 64
  narrow = model_lib.random_tower(arch, 0)
  with pytest.raises(ValueError, match="head 'baseline' is 32 wide but the "
                     "model's tower is 64 wide"):
    nearid_eval.nearid(model, {"baseline": split_params(narrow, arch,
                                                     False)["head"],
                            "trained": heads["trained"]}, data, SPLIT)
  ckpt = str(tmp_path / "narrow.npz")
  bigvision.save(ckpt, narrow, two_tower=False)
  wide = str(tmp_path / "wide.npz")
  bigvision.save(wide, towers[1][0], two_tower=False)
  with pytest.raises(ValueError, match=r"baseline head from .*narrow.npz is "
                     "32 wide"):
    evaluate.run(tiny_config(data), wide, str(tmp_path / "out"),
                 baseline=ckpt)


def test_resolution_mismatch(data, model):
  # The same weights declared at 24 px: refused before any compute.
  m = NearID(model.arch.replace(image_size=24), model.params)
  with pytest.raises(ValueError, match="input.res=32 but the model runs at "
                     "24"):
    nearid_eval.nearid(m, {"trained": m.params["head"]}, data, SPLIT)


# --- DreamBench++ ---


def test_dreambench_scores(model, tmp_path):
  method = "emu2"
  keys = ["object_dog_1", "object_cup_2", "style_a_0", "object_cup_1"]
  human = tmp_path / "human"
  (human / "group1").mkdir(parents=True)
  with open(human / "group1" / f"{method}-cp.json", "w") as f:
    json.dump({k: i % 3 for i, k in enumerate(keys)}, f)
  rng = np.random.default_rng(0)
  refs = rng.integers(0, 256, (4, 20, 24, 3), np.uint8)
  gens = rng.integers(0, 256, (4, 30, 18, 3), np.uint8)
  # generated images as files for half the keys
  pairs = {}
  for i, k in enumerate(keys[::-1]):  # dict order differs from the file's
    j = len(keys) - 1 - i
    gen = gens[j]
    if j % 2:
      gen = str(tmp_path / f"{k}.png")
      Image.fromarray(gens[j]).save(gen)
    pairs[k] = (refs[j], gen)
  path = dreambench.dreambench(model, pairs, str(human), str(tmp_path / "out"),
                             method)
  assert path == str(tmp_path / "out" / f"{method}.json")
  with open(path) as f:
    got = json.load(f)
  assert list(got) == keys
  a, b = model.embed(refs), model.embed(gens)
  want = 100 * np.sum(a * b, 1) / (np.linalg.norm(a, axis=1) *
                                   np.linalg.norm(b, axis=1))
  np.testing.assert_allclose(list(got.values()), want, rtol=1e-5, atol=1e-4)

  del pairs[keys[2]]
  pairs["object_bird_0"] = (refs[0], gens[0])
  with pytest.raises(ValueError, match=r"1 missing \(first \['style_a_0'\]\)"
                     r", 1 unknown \(first \['object_bird_0'\]\)"):
    dreambench.dreambench(model, pairs, str(human), str(tmp_path / "o2"),
                        method)


def _worker(pid, nproc, port, root, out):
  """One process of test_two_processes_keep_their_rows_tokens."""
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(f"localhost:{port}", nproc, pid)
  model, heads = _model_and_heads(_towers())
  mesh = sharding.make_mesh([("data", -1)])
  kept = embed.SplitTokens()
  run = lambda: embed.embed_split(model, heads, _input_config(root), SPLIT,
                                     SOURCES, mesh, tokens=kept)
  first, again = run(), run()
  if jax.process_index() == 0:
    np.savez(out, **{f"{which}/{part}/{h}": getattr(emb, part)[h]
                     for which, emb in (("first", first), ("again", again))
                     for part in ("views", "distractors") for h in heads})
  print(f"process {jax.process_index()}/{jax.process_count()}: "
        f"{len(jax.devices())} devices, kept {kept.nbytes()} bytes",
        flush=True)


@pytest.mark.slow
def test_two_processes_keep_their_rows_tokens(data, model, heads, tmp_path):
  out = str(tmp_path / "emb.npz")
  outs = workers.run(__file__, 2, os.path.dirname(data.data_dir), out)
  # Each process keeps its own rows' tokens: half of a one-process run's.
  kept = [int(o.split("kept ")[1].split(" bytes")[0]) for o in outs]
  assert "process 1/2: 4 devices" in outs[1] and kept[0] == kept[1] > 0
  # One process with the workers' batches: 4 ways split (their 4 devices).
  one = embed.SplitTokens()
  want = embed.embed_split(model, heads, data, SPLIT, SOURCES,
                           sharding.make_mesh([("data", 4)], jax.devices()[:4]),
                           tokens=one)
  assert sum(kept) == one.nbytes()
  got = np.load(out)
  for which in ("first", "again"):
    for h in heads:
      np.testing.assert_allclose(got[f"{which}/views/{h}"], want.views[h],
                                 atol=2e-5)
      np.testing.assert_allclose(got[f"{which}/distractors/{h}"],
                                 want.distractors[h], atol=2e-5)


if __name__ == "__main__":
  _worker(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), *sys.argv[4:6])
