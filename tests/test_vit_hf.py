"""Our Flax tower and MAP head against transformers' SiglipVisionModel."""
import numpy as np
import pytest
import torch

from nearid_jax import NearID
from nearid_jax import vit


def _torch_forward(model, x):
  with torch.no_grad():
    out = model(pixel_values=torch.from_numpy(x).permute(0, 3, 1, 2))
  return out.last_hidden_state.numpy(), out.pooler_output.numpy()


def _jax_forward(model, x):
  tokens = model.tower.apply({"params": model.params["img"]}, x)
  pooled = vit.MAPHead(model.arch.mlp_dim, model.arch.num_heads).apply(
      {"params": model.params["head"]["MAPHead_0"]}, tokens)
  return np.asarray(tokens), np.asarray(pooled)


@pytest.mark.parametrize("scan", [False, True])
def test_forward_matches_transformers(hf_model_dir, scan):
  _, path, tmodel = hf_model_dir
  model = NearID.load(path, scan=scan)
  res = model.arch.image_size
  x = np.random.default_rng(1).uniform(-1, 1, (3, res, res, 3)).astype(
      np.float32)
  want_tokens, want_pooled = _torch_forward(tmodel, x)
  tokens, pooled = _jax_forward(model, x)
  assert tokens.shape == want_tokens.shape
  np.testing.assert_allclose(tokens, want_tokens, atol=1e-4, rtol=0)
  np.testing.assert_allclose(pooled, want_pooled, atol=1e-4, rtol=0)
  # and the public forward is the L2-normalised pooled output
  emb = np.asarray(model._forward(model.params, x))
  np.testing.assert_allclose(
      emb, want_pooled / np.linalg.norm(want_pooled, axis=1, keepdims=True),
      atol=1e-5)


def test_arch_is_read_from_shapes(hf_model_dir):
  name, path, tmodel = hf_model_dir
  cfg = tmodel.config
  arch = NearID.load(path).arch
  assert (arch.width, arch.depth, arch.mlp_dim, arch.num_heads,
          arch.patch_size, arch.image_size) == (
              cfg.hidden_size, cfg.num_hidden_layers, cfg.intermediate_size,
              cfg.num_attention_heads, cfg.patch_size, cfg.image_size), name


def test_bfloat16_compute_is_close(hf_model_dir):
  _, path, _ = hf_model_dir
  f32 = NearID.load(path)
  bf16 = NearID.load(path, dtype="bfloat16")
  images = np.random.default_rng(2).integers(0, 256, (4, 40, 50, 3), np.uint8)
  a, b = f32.embed(images), bf16.embed(images)
  # params stay float32; only the frozen tower's matmuls run in bf16
  assert bf16.params["img"]["embedding"]["kernel"].dtype == np.float32
  assert np.min(np.sum(a * b, axis=1)) > 0.99


@pytest.mark.parametrize("remat", [False, True])
def test_scan_remat_gradients_match_unrolled(hf_model_dir, remat):
  """Gradient through a scanned, rematerialised tower equals the unrolled one."""
  import jax  # pylint: disable=g-import-not-at-top
  _, path, _ = hf_model_dir
  plain = NearID.load(path, scan=False)
  scanned = NearID.load(path, scan=True, remat=remat)
  res = plain.arch.image_size
  x = np.random.default_rng(3).uniform(-1, 1, (2, res, res, 3)).astype(
      np.float32)

  def grad_wrt_input(m):
    f = lambda x: m.tower.apply({"params": m.params["img"]}, x).sum()
    return np.asarray(jax.jit(jax.grad(f))(x))
  np.testing.assert_allclose(grad_wrt_input(scanned), grad_wrt_input(plain),
                             atol=1e-4, rtol=1e-4)


def test_every_released_variant_decodes():
  for name in vit.SIGLIP2_FIXED_RES:
    arch = vit.Arch.from_variant(name)
    assert arch.grid == arch.image_size // arch.patch_size
  so = vit.Arch.from_variant("So400m/14@384")
  assert (so.width, so.depth, so.mlp_dim, so.num_heads, so.num_patches) == (
      1152, 27, 4304, 16, 729)
  g = vit.Arch.from_variant("g-opt/16", 256)
  assert (g.width, g.depth, g.mlp_dim, g.num_heads) == (1536, 40, 6144, 16)


def test_so400m_head_has_about_15m_params():
  from nearid_jax.formats import common  # pylint: disable=g-import-not-at-top
  shapes = common.expected_shapes(vit.Arch.from_variant("So400m/14@384"))
  n = sum(int(np.prod(s)) for k, s in shapes.items()
          if k.startswith("MAPHead_0"))
  assert 15.0e6 < n < 15.4e6, n  # SPEC §2: about 15.2M


@pytest.mark.parametrize("bad", ["So400m", "Huge/14", "B/x"])
def test_bad_variant_names_say_what_is_wrong(bad):
  with pytest.raises(ValueError, match="unknown variant"):
    vit.Arch.from_variant(bad, 224)


def test_resolution_below_patch_is_refused():
  with pytest.raises(ValueError, match="smaller than patch_size 16"):
    vit.Arch.from_variant("B/16", 8)
