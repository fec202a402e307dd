"""Train-step throughput: our jitted, sharded JAX step vs the same step in PyTorch.

Run from the repository root, e.g.

  .venv/bin/python -m benchmarks.train_throughput --which demo \
      [--torch_threads 1] [--cached] [--steps 5] [--json out.json]
  .venv/bin/python -m benchmarks.train_throughput --which b16 --groups 2
  .venv/bin/python -m benchmarks.train_throughput --which so400m --groups 1 \
      --warmup 1 --repeats 1 --no-compile

Our step is built exactly as training builds it: the config (configs/demo.py,
or configs/b16_224.py / configs/nearid_r7.py with a random tower; R7's tower
runs in float32 here, as the matmul peak, where the paper's runs in bf16 on
accelerators), `sharding.make_mesh`, `train.setup`, and random uint8
batches shaped like the input pipeline's put on the mesh with
`sharding.global_batch`; one timed call is --steps (default 1) calls of
`state, metrics = step(frozen, state, batch)`, blocked on after the last,
as the training loop runs them: it never waits for a step before
dispatching the next, so JAX's dispatch of a step (0.7-1.0 ms for the
demo's, measured apart) overlaps the step before it.

The PyTorch step does the same work on the same weights: our model exported
with `NearID.export(format="hf-siglip")` and read by
`transformers.SiglipVisionModel`; the tower runs under `torch.no_grad()`
(frozen) on the batch's 6B images scaled to [-1, 1] (with `use_head` off:
the model's own pooled output is not needed), the MAP head
(`model.head`, trainable) on its last_hidden_state, L2 normalisation, the
two-tier loss (`two_tier_torch`, checked against ours on the first batch),
backward, gradient-norm clip 1.0 and a `torch.optim.AdamW` step. The head +
loss part is `torch.compile`d unless --no-compile (the tower is inference
only, as in embed_throughput). Throughput counts every image slot of the
batch, masked or not: both steps compute them all. PyTorch runs on one
thread per core and, with --torch_threads, on other counts too: the small
ops of the demo's tower run faster on one thread when the machine is busy.
The ratio is against PyTorch's fastest variant. --tower swaps in another
tower shape with the config's other settings (smoke runs of the suite).
--cached times the step the demo trains with: the head on the batch's
tower tokens rounded to bf16, as the feature cache serves them, in both
libraries (no tower pass; PyTorch reads them widened to float32).
--settle (default 1) makes an untimed call of each step right before each
timed one, and --settle_s (default 0.03) more until that many seconds have
passed (common.time_calls: PyTorch's OpenMP workers keep spinning after
a step or a matmul and would slow whatever is timed next). A PyTorch call
is --steps of its steps too (eager PyTorch on the CPU runs each before
returning).
"""
import argparse
import os
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers

import configs.b16_224
import configs.demo
import configs.nearid_r7
from benchmarks import common
from nearid_jax import sharding
from nearid_jax.training import train
from nearid_jax import vit

SLOTS = 6  # images per group: 3 views + 3 distractors
_NEG = -1e9  # masked logits, as in nearid_jax/losses.py
SETTLE_S = 0.03  # see common.time_calls


CONFIGS = {"demo": configs.demo, "b16": configs.b16_224,
           "so400m": configs.nearid_r7}
# Global batch (groups) when none is given: the config's for the demo,
# reduced to what a 2-core CPU runs in seconds to minutes for the others.
CPU_GROUPS = {"demo": 0, "b16": 2, "so400m": 1}


def make_config(which, groups, tower=""):
  """The training config of `which` with a random tower, on CPU settings.

  groups: overrides its global batch (0 = keep it); tower: "variant@res"
  replaces the tower's shape.
  """
  config = CONFIGS[which].get_config()
  config.model.init = ""  # a random tower of the variant's shape
  config.model.dtype = "float32"  # as the matmul peak and PyTorch
  if tower:
    variant, res = tower.split("@")
    config.model.variant, config.model.res = variant, int(res)
  if groups:
    config.input.batch_size = groups
  return config


def two_tier_torch(anchor, positives, negatives, pos_mask, neg_mask,
                   temperature, alpha):
  """SPEC §3's two-tier loss in torch, masks as nearid_jax.losses."""
  b, p, d = positives.shape
  a = torch.nn.functional.normalize(anchor, dim=-1, eps=1e-6)
  q = torch.nn.functional.normalize(
      positives * pos_mask[..., None], dim=-1, eps=1e-6).reshape(b * p, d)
  n = torch.nn.functional.normalize(
      negatives * neg_mask[..., None], dim=-1, eps=1e-6)
  pool = a @ q.T / temperature                          # (B, B*P)
  dist = torch.einsum("bd,bkd->bk", a, n) / temperature  # (B, K)
  pool_valid = pos_mask.reshape(1, b * p).expand(b, -1)
  own = torch.eye(b, dtype=torch.bool,
                  device=anchor.device).repeat_interleave(p, dim=1)
  # Tier 1: softmax over valid Q ++ own valid distractors, per valid positive.
  logits = torch.cat([pool.masked_fill(~pool_valid, _NEG),
                      dist.masked_fill(~neg_mask, _NEG)], dim=1)
  target = (torch.arange(b, device=anchor.device)[:, None] * p
            + torch.arange(p, device=anchor.device)[None, :])
  nll1 = torch.logsumexp(logits, 1)[:, None] - logits.gather(1, target)
  l1 = (nll1 * pos_mask).sum() / pos_mask.sum().clamp(min=1)
  # Tier 2: each valid distractor vs b's random pool (others' valid positives).
  lse = torch.logsumexp(pool.masked_fill(~(pool_valid & ~own), _NEG), 1)
  nll2 = torch.nn.functional.softplus(lse[:, None] - dist)
  l2 = (nll2 * neg_mask).sum() / neg_mask.sum().clamp(min=1)
  return l1 + alpha * l2


def torch_steps(vision, config, batch, try_compile, tokens=None):
  """PyTorch train steps -> ({name: step() -> loss}, {name: label}, note).

  "torch" is eager; "torch_compile" (when it compiles) has the head + loss
  part torch.compile'd, the tower staying eager under no_grad. Both update
  the same head with the same optimizer: the same work on every call.
  tokens: (6B, N, D) float32 tower tokens (the feature cache's, widened from
  bf16); given, the steps train the head on them and skip the tower.
  The batch goes to the tower's device and dtype; the head and loss run in
  float32 (make the head float32 under a bf16 tower), as ours.
  """
  tower = next(vision.parameters())
  # Same slot order as our step: 3 views then 3 distractors per group.
  images = np.concatenate([batch["views"], batch["distractors"]], axis=1)
  x = torch.from_numpy(images.reshape((-1,) + images.shape[2:]))
  x = x.to(tower.device).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
  x = x.to(tower.dtype).contiguous()
  pos_mask = torch.from_numpy(batch["view_mask"][:, 1:].copy()).to(
      tower.device)
  neg_mask = torch.from_numpy(batch["distractor_mask"].copy()).to(
      tower.device)
  head = vision.head
  vision.use_head = False  # the tower pass needs only last_hidden_state
  for p in vision.parameters():
    p.requires_grad_(False)
  for p in head.parameters():
    p.requires_grad_(True)
  opt = torch.optim.AdamW(head.parameters(), lr=config.lr,
                          weight_decay=config.wd)
  tau, alpha = config.loss.temperature, config.loss.alpha

  def head_loss(tokens):
    emb = torch.nn.functional.normalize(head(tokens.float()), dim=-1)
    emb = emb.reshape(-1, SLOTS, emb.shape[-1])
    return two_tier_torch(emb[:, 0], emb[:, 1:3], emb[:, 3:], pos_mask,
                          neg_mask, tau, alpha)

  def frozen_tokens():
    if tokens is not None:
      return tokens
    with torch.no_grad():
      return vision(pixel_values=x).last_hidden_state

  def make(fn):
    def step():
      loss = fn(frozen_tokens())
      opt.zero_grad(set_to_none=True)
      loss.backward()
      torch.nn.utils.clip_grad_norm_(head.parameters(), config.grad_clip_norm)
      opt.step()
      return loss.detach()
    return step

  attn = vision.config._attn_implementation  # pylint: disable=protected-access
  calls = {"torch": make(head_loss)}
  labels = {"torch": f"PyTorch eager (attn={attn})"}
  if not try_compile:
    return calls, labels, "not tried (--no-compile)"
  compiled = torch.compile(head_loss)
  try:
    first = frozen_tokens()
    start = time.perf_counter()
    compiled(first).backward()  # compiles forward and backward
    opt.zero_grad(set_to_none=True)
  except Exception as e:  # pylint: disable=broad-except
    opt.zero_grad(set_to_none=True)
    return calls, labels, (f"failed ({type(e).__name__}: "
                           f"{str(e).splitlines()[0]}); eager only")
  calls["torch_compile"] = make(compiled)
  labels["torch_compile"] = "PyTorch, head + loss torch.compile"
  tower = "no tower: cached tokens" if tokens is not None else (
      "tower eager under no_grad")
  return calls, labels, (f"used on head + loss (inductor; {tower}); compile "
                         f"took {time.perf_counter() - start:.0f} s")


def _threads(n):
  return f"{n} thread{'s' if n > 1 else ''}"


def cached_batch(model, frozen, batch, mesh):
  """`batch` as the feature cache serves it: the tower's tokens, in bf16."""
  tokens = jax.jit(train.group_tokens, static_argnums=0)(
      model.tower, frozen, batch)
  tokens = np.asarray(jax.device_get(tokens).astype(jnp.bfloat16))
  host = {"tokens": tokens.reshape(batch["view_mask"].shape[:1] + (SLOTS,)
                                   + tokens.shape[1:]),
          "view_mask": np.asarray(batch["view_mask"]),
          "distractor_mask": np.asarray(batch["distractor_mask"])}
  return sharding.global_batch(host, mesh), tokens


def run_one(which, groups=0, tower="", warmup=2, repeats=5, try_compile=True,
            torch_threads=(), settle=1, cached=False, settle_s=SETTLE_S,
            steps=1):
  """Builds both steps for one config, checks the loss, times; -> results.

  groups: 0 = CPU_GROUPS[which]; tower: see make_config; torch_threads: other
  torch thread counts to time each PyTorch step with too (small steps can run
  faster on fewer threads, most of all on a loaded machine); settle,
  settle_s: see common.time_calls; cached: both steps train the head on the
  batch's tokens rounded to bf16, as from the feature cache (no tower pass);
  steps: train steps per timed call, blocked on after the last.
  """
  config = make_config(which, groups or CPU_GROUPS[which], tower)
  m = config.model
  b = config.input.batch_size
  reduced = b != CONFIGS[which].get_config().input.batch_size
  print(f"== {which}: {m.variant}@{m.res}, global batch {b} groups x {SLOTS} "
        f"= {b * SLOTS} images" + (" (reduced for CPU)" if reduced else ""),
        flush=True)
  mesh = sharding.make_mesh(config.mesh)
  model, frozen, state, step = train.setup(config, mesh)
  batch = common.random_batch(b, m.res)
  jbatch = sharding.global_batch(batch, mesh)
  with tempfile.TemporaryDirectory() as tmp:
    hf_dir = model.export(os.path.join(tmp, "hf"), format="hf-siglip")
    vision = transformers.SiglipVisionModel.from_pretrained(hf_dir).eval()
  tokens = None
  if cached:
    jbatch, tokens = cached_batch(model, frozen, jbatch, mesh)
    tokens = torch.from_numpy(tokens.astype(np.float32))
  tcalls, labels, compile_note = torch_steps(vision, config, batch,
                                             try_compile, tokens)
  print(f"torch.compile: {compile_note}", flush=True)
  for name in list(tcalls):
    for n in torch_threads:
      tcalls[f"{name}_{n}thr"] = common.with_torch_threads(n, tcalls[name])
      labels[f"{name}_{n}thr"] = f"{labels[name]}, {_threads(n)}"
    labels[name] += f", {_threads(torch.get_num_threads())}"

  # First call of each (its warm-up; JAX compiles here): same head, same
  # batch, so the losses must agree.
  start = time.perf_counter()
  state, metrics = step(frozen, state, jbatch)
  ours = float(jax.block_until_ready(metrics)["train/loss"])
  jit_s = time.perf_counter() - start
  theirs = float(tcalls["torch"]())
  rel = abs(ours - theirs) / abs(ours)
  print(f"loss check on the first batch: JAX {ours:.6f}, PyTorch "
        f"{theirs:.6f}, relative difference {rel:.1e} "
        f"({'OK' if rel <= 1e-4 else 'MISMATCH'} at 1e-4); JAX first call "
        f"(compiles) {jit_s:.0f} s", flush=True)

  def jax_call():
    nonlocal state
    for _ in range(steps):
      state, metrics = step(frozen, state, jbatch)
    jax.block_until_ready(metrics)

  def repeated(fn):
    return lambda: [fn() for _ in range(steps)][-1]

  calls = {"jax": jax_call, **{k: repeated(f) for k, f in tcalls.items()}}
  times, peaks = common.time_with_peak(calls, warmup=max(warmup - 1, 0),
                                       repeats=repeats, settle=settle,
                                       settle_s=settle_s)
  peak = peaks[0]
  arch = vit.Arch.from_variant(m.variant, m.res)
  # No FLOP/s for the cached step: a few small ops, not matmul-bound.
  flops = None if cached else common.forward_flops(arch, b * SLOTS)
  r = {"which": which, "cached": cached, "variant": m.variant, "res": m.res,
       "groups": b, "steps_per_call": steps,
       "reduced_for_cpu": reduced, "images_per_step": b * SLOTS,
       "scan": model.scan, "mesh": dict(mesh.shape),
       "torch_compile": compile_note, "loss_jax": ours, "loss_torch": theirs,
       "loss_rel_diff": rel, "jax_first_call_s": jit_s,
       "forward_flops_per_step": flops, "peak_flops": peak,
       "peak_flops_per_cpu_s": peaks[1], "warmup": warmup,
       "repeats": repeats, "settle": settle, "settle_s": settle_s,
       "torch_threads": [torch.get_num_threads(), *torch_threads],
       "labels": {"jax": f"JAX train.setup step (jit, mesh "
                         f"{dict(mesh.shape)})", **labels}}
  for impl in calls:
    s = common.summarize(times[impl])
    s["images_per_s"] = b * SLOTS * steps / s["best_wall_s"]
    if flops:
      s["pct_of_peak_fwd"] = (100 * flops * steps / s["best_wall_s"]
                              / peak["peak"])
    r[impl] = s
  # Against PyTorch's faster variant: the target is about the best it does.
  best = common.best_of(r, tcalls)
  r["ratio_vs"] = best
  r["ratio_images_per_s"] = r["jax"]["images_per_s"] / r[best]["images_per_s"]
  r["ratio_cpu"] = r[best]["best_cpu_s"] / r["jax"]["best_cpu_s"]
  if flops:
    print(f"forward {flops / 1e9:.1f} GFLOP/step (analytic, backward of the "
          f"head not counted); matmul peak {peak['peak'] / 1e9:.1f} GFLOP/s; "
          "reached: "
          + ", ".join(f"{k} {r[k]['pct_of_peak_fwd']:.0f}%" for k in calls)
          + " of it", flush=True)
  for impl in calls:
    print(f"{impl}: wall s per call of {steps} step(s) "
          f"{r[impl]['all_wall_s']}", flush=True)
  return r


def rows(which, **kw):
  """run_one(which, **kw) as one suite row: JAX vs PyTorch's faster step."""
  r = run_one(which, **kw)
  batch = (f"{r['groups']} groups x {SLOTS} = {r['images_per_step']} images"
           + (" (reduced for CPU)" if r["reduced_for_cpu"] else
              " (the config's)"))
  tower = (f"{r['variant']}@{r['res']}, {batch}, float32, "
           f"{'scanned' if r['scan'] else 'unrolled'} blocks")
  if r["cached"]:
    tower = (f"head on the cached bf16 tokens of {r['variant']}@{r['res']}, "
             f"{batch}")
  steps = r["steps_per_call"]
  if steps > 1:
    tower += f", {steps} steps per call"
  return [common.suite_row(
      f"train_{which}" + ("_cached" if r["cached"] else ""), tower,
      r["labels"]["jax"],
      "img/s", r["images_per_step"] * steps, r["jax"],
      flops=r["forward_flops_per_step"] and r["forward_flops_per_step"] * steps,
      peaks=(r["peak_flops"], r["peak_flops_per_cpu_s"]),
      ref=r[r["ratio_vs"]], ref_impl=r["labels"][r["ratio_vs"]],
      details=r)]


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--which", default="demo,b16",
                      help="comma-separated: demo (pico/8@48), b16 "
                           "(B/16@224), so400m (So400m/14@384)")
  parser.add_argument("--groups", type=int, default=0,
                      help="global batch in groups of 6 images; 0 = the "
                           "config's for demo, 2 for b16, 1 for so400m (CPU)")
  parser.add_argument("--tower", default="",
                      help="variant@res replacing the config's tower shape")
  parser.add_argument("--torch_threads", default="",
                      help="comma-separated torch thread counts to time "
                           "PyTorch with besides one per core, e.g. 1")
  parser.add_argument("--settle", type=int, default=1,
                      help="untimed calls of each step before each timed one")
  parser.add_argument("--settle_s", type=float, default=SETTLE_S,
                      help="and more untimed calls until this many seconds")
  parser.add_argument("--steps", type=int, default=1,
                      help="train steps per timed call (the loop's pattern: "
                           "blocked on after the last)")
  parser.add_argument("--cached", action="store_true",
                      help="train the head on bf16 tokens, as from the "
                           "feature cache (both libraries skip the tower)")
  common.add_timing_flags(parser, "step")
  args = parser.parse_args()
  common.set_torch_threads()

  table, out = [], {"args": vars(args), "configs": {}}
  for which in args.which.split(","):
    if which not in CONFIGS:
      parser.error(f"--which {which!r}: one of {sorted(CONFIGS)}")
    out["configs"][which] = r = run_one(
        which, args.groups, args.tower, args.warmup, args.repeats,
        not args.no_compile,
        [int(n) for n in args.torch_threads.split(",") if n], args.settle,
        args.cached, args.settle_s, args.steps)
    name = f"{r['variant']}@{r['res']}, {r['groups']} groups x 6"
    ms = 1e3 / args.steps  # per step
    for impl in r["labels"]:
      table.append([name, r["labels"][impl],
                    f"{r[impl]['images_per_s']:.4g}",
                    f"{ms * r[impl]['best_wall_s']:.1f}",
                    f"{ms * r[impl]['median_wall_s']:.1f}",
                    f"{ms * r[impl]['best_cpu_s']:.1f}"])
    table.append([name, f"**ratio JAX/{r['ratio_vs']}**",
                  f"**{r['ratio_images_per_s']:.2f}x**", "", "",
                  f"{r['ratio_cpu']:.2f}x"])
  notes = common.thread_notes()
  out["threads"] = notes
  print(f"\nCPU: {notes['cpu']}, {notes['cores']} cores, 1-min load avg "
        f"{notes['load_avg_1m']} at the end (shared machine); torch threads "
        f"{notes['torch_threads']}; XLA_FLAGS={notes['XLA_FLAGS']!r}; "
        f"{args.steps} step(s) per call, "
        f"best of {args.repeats} interleaved calls after {args.warmup} "
        f"warm-up calls, each after {args.settle} untimed call(s) and at "
        f"least {args.settle_s} s of them\n")
  print(common.markdown_table(
      ["config", "impl", "images/s (best)", "ms/step (best)",
       "ms/step (median)", "CPU ms/step (best)"], table))
  if args.json:
    common.write_json(args.json, out)


if __name__ == "__main__":
  main()
