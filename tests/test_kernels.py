"""The backend's choice of attention kernels, and the GPU's form against
flax's attention."""
import types

import flax.linen as nn
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from nearid_jax import kernels
from nearid_jax import vit
from nearid_jax.cpu import attention as cpu_attention


@pytest.mark.parametrize("choice,backend,want", [
    ("auto", "cpu", "cpu"), ("auto", "gpu", "gpu"), ("auto", "tpu", "plain"),
    ("auto", "METAL", "plain"), ("plain", "gpu", "plain"),
    ("cpu", "tpu", "cpu"), ("gpu", "cpu", "gpu"), ("plain", "cpu", "plain")])
def test_choice_by_backend(choice, backend, want):
  assert kernels.choose(choice, backend) == want


def test_kernels_by_name():
  assert kernels.kernels("plain") == vit.Kernels()
  assert kernels.kernels("cpu") == cpu_attention.CPU_KERNELS
  assert kernels.kernels("gpu") == kernels.GPU_KERNELS
  assert kernels.kernels("auto", "tpu") == vit.Kernels()
  assert kernels.kernels("auto", "gpu").attention is kernels.gpu_attention
  assert kernels.kernels("auto", "gpu").pool is vit.attention_pool
  assert kernels.kernels("auto") == kernels.kernels(
      kernels.choose("auto", jax.default_backend()))
  with pytest.raises(ValueError, match="kernels 'tpu'"):
    kernels.kernels("tpu")


def _qkv(dtype, seed=0):
  # The tower's layout (B, N, H, Dh); N odd, as So400m/14@384's 729.
  rng = np.random.default_rng(seed)
  return [jnp.asarray(rng.standard_normal((3, 13, 4, 8)), dtype)
          for _ in range(3)]


@pytest.mark.parametrize("implementation", ["xla", None])
def test_gpu_attention_equals_flax(implementation):
  q, k, v = _qkv(jnp.float32)
  want = nn.dot_product_attention(q, k, v)
  out = kernels.gpu_attention(q, k, v, implementation=implementation)
  assert out.shape == want.shape and out.dtype == jnp.float32
  # float32 rounding of softmax-weighted sums of unit-scale values.
  np.testing.assert_allclose(out, want, atol=1e-6, rtol=1e-5)
  mask = jnp.asarray(np.random.default_rng(1).random((3, 1, 13, 13)) < 0.7)
  mask = mask.at[..., 0].set(True)  # no query without a key
  np.testing.assert_allclose(
      kernels.gpu_attention(q, k, v, mask, implementation=implementation),
      nn.dot_product_attention(q, k, v, mask=mask), atol=1e-6, rtol=1e-5)


def test_gpu_attention_in_bf16_off_a_gpu():
  """bf16 operands off a GPU go to XLA's form (cuDNN's needs a GPU), as a
  bf16 tower's do; dtype= converts as flax's does."""
  q, k, v = _qkv(jnp.bfloat16)
  out = kernels.gpu_attention(q, k, v)
  assert out.dtype == jnp.bfloat16
  want = nn.dot_product_attention(*(x.astype(jnp.float32) for x in (q, k, v)))
  np.testing.assert_allclose(np.asarray(out, np.float32), want, atol=3e-2)
  out = kernels.gpu_attention(*_qkv(jnp.float32), dtype=jnp.bfloat16)
  assert out.dtype == jnp.bfloat16


def test_cudnn_takes_its_dtypes_and_head_dims(monkeypatch):
  x = lambda dtype, dh: jnp.zeros((1, 5, 2, dh), dtype)
  assert not kernels.cudnn_takes(x(jnp.bfloat16, 72))  # this is no GPU
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  platform = types.SimpleNamespace(platform_version="rocm 60300")
  monkeypatch.setattr(jax.extend.backend, "get_backend", lambda: platform)
  assert not kernels.cudnn_takes(x(jnp.bfloat16, 72))  # no cuDNN on ROCm
  platform.platform_version = "cuda 12080"
  assert kernels.cudnn_takes(x(jnp.bfloat16, 72))  # So400m's head dim
  assert kernels.cudnn_takes(x(jnp.float16, 128))
  assert not kernels.cudnn_takes(x(jnp.float32, 72))
  assert not kernels.cudnn_takes(x(jnp.bfloat16, 76))
  assert not kernels.cudnn_takes(x(jnp.bfloat16, 256))
