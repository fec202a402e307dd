"""The attention kernels a model runs, chosen by backend in this one place.

  "plain"  vit.Kernels(): flax's attention and vit.attention_pool, as XLA
           compiles them (TPUs run these)
  "cpu"    nearid_jax/cpu/attention.py: the layouts and exp XLA:CPU runs
           fastest
  "gpu"    the tower's attention through jax.nn.dot_product_attention:
           cuDNN's flash attention where it takes the operands (cudnn_takes),
           XLA's otherwise; the MAP head's pooling stays plain
  "auto"   the backend's own: "cpu" on the CPU, "gpu" on a GPU, else "plain"

All compute the same function (tests/test_cpu_kernels.py, tests/
test_kernels.py).
"""
import jax
import jax.extend
import jax.numpy as jnp

from nearid_jax import vit
from nearid_jax.cpu import attention as cpu_attention

KERNELS = ("auto", "plain", "cpu", "gpu")
# jax.default_backend() -> the "auto" choice; any other backend gets "plain".
AUTO = {"cpu": "cpu", "gpu": "gpu"}
# cuDNN's flash attention: fp16/bf16 operands, a head dim that is a multiple
# of 8 up to 128 (jax's check; 256 from Hopper on). So400m's is 72.
CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)
CUDNN_MAX_HEAD_DIM = 128


def cudnn_takes(query):
  """Whether cuDNN's flash attention runs (B, N, H, Dh) operands like
  `query` here: on a GPU backend, in its dtypes and head dims
  (jax.nn.dot_product_attention(implementation="cudnn") raises otherwise)."""
  head_dim = query.shape[-1]
  # ROCm GPUs are "gpu" too; only CUDA's platform has cuDNN.
  cuda = (jax.default_backend() == "gpu" and "cuda" in
          jax.extend.backend.get_backend().platform_version.lower())
  return (cuda and query.dtype in CUDNN_DTYPES
          and head_dim % 8 == 0 and head_dim <= CUDNN_MAX_HEAD_DIM)


def gpu_attention(query, key, value, mask=None, dtype=None,
                  implementation=None):
  """flax's attention_fn (no dropout) as jax.nn.dot_product_attention.

  query, key, value: (B, N, H, Dh), flax's layout and jax's. implementation:
  "xla" or "cudnn"; None takes cuDNN's where cudnn_takes, XLA's otherwise.
  dtype: the computation's (default the operands'), as flax's.
  """
  if dtype is not None:
    query, key, value = (x.astype(dtype) for x in (query, key, value))
  if implementation is None:
    implementation = "cudnn" if cudnn_takes(query) else "xla"
  return jax.nn.dot_product_attention(query, key, value, mask=mask,
                                      implementation=implementation)


GPU_KERNELS = vit.Kernels(attention=gpu_attention)
_BY_NAME = {"plain": vit.Kernels(), "cpu": cpu_attention.CPU_KERNELS,
            "gpu": GPU_KERNELS}


def choose(choice, backend):
  """The kernels' name for `choice` (one of KERNELS) on `backend`
  (jax.default_backend()'s name): "auto" becomes AUTO's, else "plain"."""
  if choice not in KERNELS:
    raise ValueError(f"kernels {choice!r}: one of {KERNELS}")
  return AUTO.get(backend, "plain") if choice == "auto" else choice


def kernels(choice="auto", backend=None):
  """-> vit.Kernels of choose(choice, backend or jax.default_backend())."""
  return _BY_NAME[choose(choice, backend or jax.default_backend())]
