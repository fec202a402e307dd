"""SigLIP2 image tower and MAP head in Flax, with big_vision's parameter names.

Parameter trees match big_vision's `models/vit.py` under `params/img`, so a
released SigLIP2 `.npz` maps onto these modules without renaming. The two
attention computations are plain functions here (Kernels); a backend may
swap in its own forms of the same math (nearid_jax/kernels.py picks them).
"""
import dataclasses
import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

# name: (width, depth, mlp_dim, num_heads), as big_vision's decode_variant.
# "pico" is ours: a SigLIP2-shaped tower small enough for CPU tests and the demo.
VARIANTS = {
    "pico": (64, 2, 256, 4),
    "mu": (32, 1, 128, 2),
    "Ti": (192, 12, 768, 3),
    "S": (384, 12, 1536, 6),
    "M": (512, 12, 2048, 8),
    "B": (768, 12, 3072, 12),
    "L": (1024, 24, 4096, 16),
    "So400m": (1152, 27, 4304, 16),
    "H": (1280, 32, 5120, 16),
    "g": (1408, 40, 6144, 16),
    "g-opt": (1536, 40, 6144, 16),
    "G": (1664, 48, 8192, 16),
}

# The fixed-resolution SigLIP2 towers Google released ("variant@res").
SIGLIP2_FIXED_RES = (
    "B/32@256", "B/16@224", "B/16@256", "B/16@384", "B/16@512",
    "L/16@256", "L/16@384", "L/16@512", "So400m/14@224", "So400m/14@384",
    "So400m/16@256", "So400m/16@384", "So400m/16@512", "g-opt/16@256",
    "g-opt/16@384",
)


@dataclasses.dataclass(frozen=True)
class Arch:
  """Shape of a SigLIP2 image tower; everything else follows from it."""
  width: int
  depth: int
  mlp_dim: int
  num_heads: int
  patch_size: int
  image_size: int

  def __post_init__(self):
    # Not required to be a multiple: So400m/14@384 has 27x27 patches and
    # its VALID patchify conv drops the last 6 pixels, as in big_vision and HF.
    if self.image_size < self.patch_size:
      raise ValueError(f"image_size {self.image_size} is smaller than "
                       f"patch_size {self.patch_size}")
    if self.width % self.num_heads:
      raise ValueError(f"width {self.width} is not divisible by num_heads "
                       f"{self.num_heads}")

  @property
  def grid(self):
    return self.image_size // self.patch_size

  @property
  def num_patches(self):
    return self.grid ** 2

  @property
  def head_dim(self):
    return self.width // self.num_heads

  def replace(self, **kw):
    return dataclasses.replace(self, **kw)

  def check_tiles(self, what):
    """Refuses a resolution the patches do not tile, unless SigLIP2 ships it.

    So400m/14@384 (27x27 patches, 6 px dropped) is released and must load;
    any other such choice is most likely a typo that silently drops pixels.
    """
    released = {(int(v.split("/")[1].split("@")[0]), int(v.split("@")[1]))
                for v in SIGLIP2_FIXED_RES}
    if (self.image_size % self.patch_size
        and (self.patch_size, self.image_size) not in released):
      raise ValueError(
          f"{what}={self.image_size} is not a multiple of the patch size "
          f"{self.patch_size} (the last {self.image_size % self.patch_size} "
          "pixels would be dropped) and no released SigLIP2 tower uses it")

  @classmethod
  def from_variant(cls, variant, image_size=None):
    """"So400m/14" with image_size, or "So400m/14@384"."""
    if "@" in variant:
      variant, res = variant.split("@")
      image_size = int(res)
    name, _, patch = variant.partition("/")
    if name not in VARIANTS or not patch.isdigit():
      raise ValueError(f"unknown variant {variant!r}: expected NAME/PATCH with "
                       f"NAME one of {sorted(VARIANTS)}")
    if image_size is None:
      raise ValueError(f"variant {variant!r} needs an image size (e.g. "
                       f"{variant}@224)")
    width, depth, mlp, heads = VARIANTS[name]
    return cls(width, depth, mlp, heads, int(patch), int(image_size))


def attention_pool(x, u):
  """Per head h, the softmax_n(x_n . u_h)-weighted mean of the tokens x_n.

  (B, N, D), (H, D) -> (B, H, D).
  """
  w = jax.nn.softmax(jnp.einsum("bnd,hd->bhn", x, u), axis=-1)
  return jnp.einsum("bhn,bnd->bhd", w, x)


@dataclasses.dataclass(frozen=True)
class Kernels:
  """The attention computations the modules call; the plain math by default."""
  # softmax(q k^T / sqrt(head_dim)) v, flax's attention_fn signature
  attention: Callable = nn.dot_product_attention
  pool: Callable = attention_pool              # (B, N, D), (H, D) -> (B, H, D)


class MlpBlock(nn.Module):
  mlp_dim: int
  dtype: Any = None  # None: the inputs' and params' dtype

  @nn.compact
  def __call__(self, x):
    d = x.shape[-1]
    x = nn.Dense(self.mlp_dim, dtype=self.dtype, name="Dense_0")(x)
    x = nn.gelu(x, approximate=True)  # SigLIP's gelu_pytorch_tanh
    return nn.Dense(d, dtype=self.dtype, name="Dense_1")(x)


class Encoder1DBlock(nn.Module):
  """Pre-LN transformer block. Takes and returns a scan carry."""
  mlp_dim: int
  num_heads: int
  dtype: Any = jnp.float32
  kernels: Kernels = Kernels()

  @nn.compact
  def __call__(self, x, _=None):
    y = nn.LayerNorm(name="LayerNorm_0")(x)
    y = nn.MultiHeadDotProductAttention(
        num_heads=self.num_heads, dtype=self.dtype, attention_fn=self.kernels.attention,
        name="MultiHeadDotProductAttention_0")(y, y)
    x = x + y
    y = nn.LayerNorm(name="LayerNorm_1")(x)
    x = x + MlpBlock(self.mlp_dim, self.dtype, name="MlpBlock_0")(y)
    return x, None


class Transformer(nn.Module):
  depth: int
  mlp_dim: int
  num_heads: int
  scan: bool = False
  remat: bool = False
  dtype: Any = jnp.float32
  kernels: Kernels = Kernels()
  # params -> params, applied to one block's weights where that block runs
  # (inside the scan when scanned): sharding.fsdp_tower gathers them there.
  layer_params: Callable | None = None

  @nn.compact
  def __call__(self, x):
    block_cls = Encoder1DBlock
    if self.remat:
      block_cls = nn.remat(block_cls, prevent_cse=not self.scan)
    if self.layer_params is not None:
      block_cls = nn.map_variables(block_cls, "params",
                                   trans_in_fn=self.layer_params)
    if self.scan:
      # One compiled block with a leading depth axis on its params: big models
      # compile in seconds instead of minutes.
      block = nn.scan(block_cls, variable_axes={"params": 0},
                      split_rngs={"params": True}, in_axes=nn.broadcast,
                      length=self.depth)
      x, _ = block(self.mlp_dim, self.num_heads, self.dtype, self.kernels,
                   name="encoderblock")(x, None)
    else:
      for i in range(self.depth):
        x, _ = block_cls(self.mlp_dim, self.num_heads, self.dtype,
                         self.kernels, name=f"encoderblock_{i}")(x, None)
    return nn.LayerNorm(name="encoder_norm")(x)


class VisionTower(nn.Module):
  """SigLIP2 image encoder up to `encoder_norm`: (B, H, W, 3) -> (B, N, D)."""
  arch: Arch
  scan: bool = False
  remat: bool = False
  dtype: Any = jnp.float32
  kernels: Kernels = Kernels()
  layer_params: Callable | None = None  # as Transformer's

  @nn.compact
  def __call__(self, images):
    a = self.arch
    x = nn.Conv(a.width, (a.patch_size, a.patch_size),
                strides=(a.patch_size, a.patch_size), padding="VALID",
                dtype=self.dtype, name="embedding")(images)
    n, h, w, d = x.shape
    x = x.reshape(n, h * w, d)
    pos = self.param("pos_embedding",
                     nn.initializers.normal(stddev=1 / np.sqrt(d)),
                     (1, h * w, d), jnp.float32)
    x = x + pos
    return Transformer(a.depth, a.mlp_dim, a.num_heads, self.scan, self.remat,
                       self.dtype, self.kernels, self.layer_params,
                       name="Transformer")(x)


class _DenseParams(nn.Module):
  """nn.DenseGeneral's parameters (names, shapes, init), not applied.

  The MAP head folds its key and value projections into the probe, so it
  needs the kernels rather than the projected tokens.
  """
  in_shape: tuple
  out_shape: tuple
  kernel_init: Any = nn.initializers.xavier_uniform()

  @nn.compact
  def __call__(self):
    flat = (int(np.prod(self.in_shape)), int(np.prod(self.out_shape)))
    kernel = self.param(
        "kernel", lambda k, s: self.kernel_init(k, flat).reshape(s),
        self.in_shape + self.out_shape)
    bias = self.param("bias", nn.initializers.zeros, self.out_shape)
    return kernel, bias


class ProbeAttention(nn.Module):
  """One learned query attending over the tokens: (D,), (B, N, D) -> (B, D).

  nn.MultiHeadDotProductAttention(probe, tokens) with its parameters, but
  with a single query the key projection folds into it (q.(x Wk + bk) =
  x.(Wk q) + const, and a constant drops out of the softmax) and the value
  projection moves after the pooling (the weights sum to 1). Per token that
  is 2 H D multiply-adds instead of 2 D^2: 16x fewer in the demo head, 72x at
  So400m, forward and backward.
  """
  num_heads: int
  pool: Callable = attention_pool

  @nn.compact
  def __call__(self, probe, x):
    d = x.shape[-1]
    h, hd = self.num_heads, d // self.num_heads
    wq, bq = _DenseParams((d,), (h, hd), name="query")()
    wk, _ = _DenseParams((d,), (h, hd), name="key")()  # bias: softmax-invariant
    wv, bv = _DenseParams((d,), (h, hd), name="value")()
    wo, bo = _DenseParams((h, hd), (d,), name="out")()
    q = jnp.einsum("d,dhk->hk", probe, wq) + bq
    u = jnp.einsum("dhk,hk->hd", wk, q) / math.sqrt(hd)
    pooled = self.pool(x, u)
    v = jnp.einsum("bhd,dhk->bhk", pooled, wv) + bv
    return jnp.einsum("bhk,hkd->bd", v, wo) + bo


class MAPHead(nn.Module):
  """Multihead attention pooling: a learned probe attends over the tokens."""
  mlp_dim: int
  num_heads: int
  kernels: Kernels = Kernels()

  @nn.compact
  def __call__(self, x):
    d = x.shape[-1]
    probe = self.param("probe", nn.initializers.xavier_uniform(), (1, 1, d),
                       jnp.float32)
    x = ProbeAttention(self.num_heads, self.kernels.pool,
                       name="MultiHeadDotProductAttention_0")(probe[0, 0], x)
    y = nn.LayerNorm(name="LayerNorm_0")(x)
    return x + MlpBlock(self.mlp_dim, name="MlpBlock_0")(y)


class NearIDHead(nn.Module):
  """The trainable part: MAP head (+ projection if out_dim differs), L2-normed.

  Kept in float32 whatever the backbone's compute dtype: it is what trains.
  """
  arch: Arch
  out_dim: int | None = None
  kernels: Kernels = Kernels()

  @nn.compact
  def __call__(self, tokens):
    x = MAPHead(self.arch.mlp_dim, self.arch.num_heads, self.kernels,
                name="MAPHead_0")(tokens.astype(jnp.float32))
    if self.out_dim and self.out_dim != self.arch.width:
      x = nn.Dense(self.out_dim, name="proj")(x)
    # = x / max(|x|, 1e-12), with a finite gradient at x = 0 (the norm's is
    # NaN there, and a masked slot does not stop it).
    return x * jax.lax.rsqrt(
        jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), 1e-24))
