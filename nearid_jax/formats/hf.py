"""Hugging Face SigLIP directories and the NearID release layout, both ways.

One table maps canonical (big_vision) keys to `SiglipVisionModel` keys; load
and export both walk it, so the two directions cannot drift apart.
"""
import json
import os

import numpy as np
import safetensors.numpy

from input_pipeline import preprocess
from nearid_jax import vit
from nearid_jax.formats import common

# (to_hf, from_hf): numpy array -> numpy array; from_hf also sees the Arch.
_SAME = (lambda x: x, lambda x, a: x)
_DENSE = (lambda x: x.T, lambda x, a: x.T)
_CONV = (lambda x: x.transpose(3, 2, 0, 1), lambda x, a: x.transpose(2, 3, 1, 0))
_POS = (lambda x: x[0], lambda x, a: x[None])
_QKV_W = (lambda x: x.reshape(x.shape[0], -1).T,
          lambda x, a: x.T.reshape(a.width, a.num_heads, a.head_dim))
_QKV_B = (lambda x: x.reshape(-1),
          lambda x, a: x.reshape(a.num_heads, a.head_dim))
_OUT_W = (lambda x: x.reshape(-1, x.shape[-1]).T,
          lambda x, a: x.T.reshape(a.num_heads, a.head_dim, a.width))


def _attention(canon, hf):
  return [(f"{canon}/{n}/kernel", f"{hf}.{p}_proj.weight", _QKV_W, None)
          for n, p in (("query", "q"), ("key", "k"), ("value", "v"))] + [
              (f"{canon}/{n}/bias", f"{hf}.{p}_proj.bias", _QKV_B, None)
              for n, p in (("query", "q"), ("key", "k"), ("value", "v"))] + [
                  (f"{canon}/out/kernel", f"{hf}.out_proj.weight", _OUT_W, None),
                  (f"{canon}/out/bias", f"{hf}.out_proj.bias", _SAME, None)]


def _layernorm(canon, hf):
  return [(f"{canon}/scale", f"{hf}.weight", _SAME, None),
          (f"{canon}/bias", f"{hf}.bias", _SAME, None)]


def _mlp(canon, hf):
  return [(f"{canon}/Dense_{i}/kernel", f"{hf}.fc{i + 1}.weight", _DENSE, None)
          for i in (0, 1)] + [
              (f"{canon}/Dense_{i}/bias", f"{hf}.fc{i + 1}.bias", _SAME, None)
              for i in (0, 1)]


_B, _L = "Transformer/encoderblock_{i}", "encoder.layers.{i}"
_H = "MAPHead_0"
# (canonical key, HF key, transform, slot in a fused q/k/v tensor or None).
# "{i}" is the block index.
TABLE = [
    ("embedding/kernel", "embeddings.patch_embedding.weight", _CONV, None),
    ("embedding/bias", "embeddings.patch_embedding.bias", _SAME, None),
    ("pos_embedding", "embeddings.position_embedding.weight", _POS, None),
    *_layernorm(f"{_B}/LayerNorm_0", f"{_L}.layer_norm1"),
    *_attention(f"{_B}/MultiHeadDotProductAttention_0", f"{_L}.self_attn"),
    *_layernorm(f"{_B}/LayerNorm_1", f"{_L}.layer_norm2"),
    *_mlp(f"{_B}/MlpBlock_0", f"{_L}.mlp"),
    *_layernorm("Transformer/encoder_norm", "post_layernorm"),
    (f"{_H}/probe", "head.probe", _SAME, None),
    # torch.nn.MultiheadAttention fuses q, k, v into one in_proj tensor.
    *[(f"{_H}/MultiHeadDotProductAttention_0/{n}/kernel",
       "head.attention.in_proj_weight", _QKV_W, slot)
      for slot, n in enumerate(("query", "key", "value"))],
    *[(f"{_H}/MultiHeadDotProductAttention_0/{n}/bias",
       "head.attention.in_proj_bias", _QKV_B, slot)
      for slot, n in enumerate(("query", "key", "value"))],
    (f"{_H}/MultiHeadDotProductAttention_0/out/kernel",
     "head.attention.out_proj.weight", _OUT_W, None),
    (f"{_H}/MultiHeadDotProductAttention_0/out/bias",
     "head.attention.out_proj.bias", _SAME, None),
    *_layernorm(f"{_H}/LayerNorm_0", "head.layernorm"),
    *_mlp(f"{_H}/MlpBlock_0", "head.mlp"),
]


def _rows(depth):
  for canon, hf, t, slot in TABLE:
    for i in (range(depth) if "{i}" in canon else (0,)):
      yield canon.format(i=i), hf.format(i=i), t, slot


def to_hf(flat, arch):
  """Canonical -> SiglipVisionModel tensors (no prefix)."""
  out, fused = {}, {}
  for canon, hf, (fwd, _), slot in _rows(arch.depth):
    x = fwd(np.asarray(flat[canon]))
    if slot is None:
      out[hf] = x
    else:
      fused.setdefault(hf, [None] * 3)[slot] = x
  out.update({k: np.concatenate(v) for k, v in fused.items()})
  return out


def from_hf(tensors, arch, source):
  """SiglipVisionModel tensors (no prefix) -> canonical."""
  flat = {}
  for canon, hf, (_, back), slot in _rows(arch.depth):
    if hf not in tensors:
      raise common.CheckpointError(f"{source}: missing tensor {hf!r}")
    x = tensors[hf]
    try:
      if slot is not None:
        x = np.split(x, 3)[slot]
      flat[canon] = back(x, arch)
    except ValueError as e:
      raise common.CheckpointError(
          f"{source}: tensor {hf!r} has shape {tensors[hf].shape}, which does "
          f"not fit {arch} ({e})") from None
  extra = set(tensors) - {hf for _, hf, _, _ in _rows(arch.depth)}
  if extra:
    raise common.CheckpointError(
        f"{source}: unexpected tensors for a {arch.depth}-block tower: "
        f"{sorted(extra)[:5]}")
  return flat


# --- directories --------------------------------------------------------------

def _read_json(path):
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError) as e:
    raise common.CheckpointError(f"{path}: cannot read JSON ({e})") from None


def _read_tensors(directory):
  index = os.path.join(directory, "model.safetensors.index.json")
  if os.path.exists(index):
    files = sorted(set(_read_json(index)["weight_map"].values()))
  elif os.path.exists(os.path.join(directory, "model.safetensors")):
    files = ["model.safetensors"]
  else:
    raise common.CheckpointError(
        f"{directory}: no model.safetensors or model.safetensors.index.json "
        "(only safetensors checkpoints are read)")
  tensors = {}
  for name in files:
    path = os.path.join(directory, name)
    try:
      tensors.update(safetensors.numpy.load_file(path))
    except Exception as e:  # safetensors raises its own, untyped errors.
      raise common.CheckpointError(f"{path}: cannot read safetensors ({e})") \
          from None
  return tensors


def _vision_tensors(tensors, model_type):
  """Strips the layout's prefixes; drops the text tower and logit scale/bias."""
  prefixes = (("backbone.vision_model.", "backbone.") if model_type == "nearid"
              else ("vision_model.", ""))
  out = {}
  for k, v in tensors.items():
    if k.startswith(("text_model.", "logit_scale", "logit_bias")):
      continue
    p = next((p for p in prefixes if k.startswith(p)), None)
    if p is None:
      out[k] = v  # reported by from_hf as unexpected
    else:
      out[k[len(p):]] = v
  return out


def _arch(tensors, vcfg, source):
  """Dimensions from shapes; heads from the config (shapes cannot tell)."""
  for k in ("embeddings.patch_embedding.weight",
            "embeddings.position_embedding.weight", "encoder.layers.0.mlp.fc1.weight"):
    if k not in tensors:
      raise common.CheckpointError(f"{source}: missing tensor {k!r}")
  width, _, p, _ = tensors["embeddings.patch_embedding.weight"].shape
  n = tensors["embeddings.position_embedding.weight"].shape[0]
  grid = int(round(n ** 0.5))
  depth = 1 + max(int(k.split(".")[2]) for k in tensors
                  if k.startswith("encoder.layers."))
  mlp = tensors["encoder.layers.0.mlp.fc1.weight"].shape[0]
  # SiglipVisionConfig's default is 12 heads when the config omits it.
  # image_size cannot be read off shapes when it is not a multiple of the
  # patch (So400m/14@384: 27 * 14 = 378): the config has it.
  res = int(vcfg.get("image_size", grid * p))
  if res // p != grid:
    raise common.CheckpointError(
        f"{source}: config image_size={res} with patch {p} gives a "
        f"{res // p}x{res // p} grid, but position_embedding has {n} entries")
  arch = vit.Arch(int(width), depth, int(mlp),
                  int(vcfg.get("num_attention_heads", 12)), int(p), res)
  for field, value in (("hidden_size", arch.width),
                       ("num_hidden_layers", arch.depth),
                       ("intermediate_size", arch.mlp_dim),
                       ("patch_size", arch.patch_size)):
    if field in vcfg and int(vcfg[field]) != value:
      raise common.CheckpointError(
          f"{source}: config says {field}={vcfg[field]} but the tensors "
          f"have {value}")
  return arch


def load(directory):
  """A SiglipModel / SiglipVisionModel / NearID release dir -> (flat, Arch)."""
  config_path = os.path.join(directory, "config.json")
  config = _read_json(config_path)
  model_type = config.get("model_type")
  if model_type in ("siglip", "nearid"):
    vcfg = config.get("vision_config") or {}
  elif model_type == "siglip_vision_model":
    vcfg = config
  else:
    raise common.CheckpointError(
        f"{config_path}: model_type {model_type!r} is not one of 'siglip', "
        "'siglip_vision_model', 'nearid'")
  tensors = _vision_tensors(_read_tensors(directory), model_type)
  arch = _arch(tensors, vcfg, directory)
  return from_hf(tensors, arch, directory), arch


def _vision_config(arch):
  return {
      "hidden_size": arch.width, "intermediate_size": arch.mlp_dim,
      "num_hidden_layers": arch.depth, "num_attention_heads": arch.num_heads,
      "image_size": arch.image_size, "patch_size": arch.patch_size,
      "num_channels": 3, "hidden_act": "gelu_pytorch_tanh",
      "layer_norm_eps": 1e-6, "attention_dropout": 0.0,
  }


def _preprocessor_config(arch, resize):
  # Squash-resize with `resize`'s PIL filter, then x / 255 * 2 - 1: SPEC.md's
  # preprocessing. transformers has no resize without antialias: "tf" models
  # get bilinear, the nearest it offers.
  resample = int(preprocess.PIL_FILTERS.get(resize,
                                            preprocess.PIL_FILTERS["pil"]))
  return {
      "image_processor_type": "SiglipImageProcessor",
      "do_resize": True, "size": {"height": arch.image_size,
                                  "width": arch.image_size},
      "resample": resample, "do_rescale": True, "rescale_factor": 1 / 255,
      "do_normalize": True, "image_mean": [0.5] * 3, "image_std": [0.5] * 3,
      "do_convert_rgb": True,
  }


def resize_method(directory, arch=None):
  """The resize method of the directory's preprocessor_config.json ("pil"
  without one); refuses a config that our preprocessing cannot reproduce."""
  path = os.path.join(directory, "preprocessor_config.json")
  if not os.path.exists(path):
    return "pil"
  cfg = _read_json(path)

  def refuse(key, why):
    raise common.CheckpointError(f"{path}: {key}={cfg.get(key)!r}: {why}")

  # Missing keys take SiglipImageProcessor's defaults (bicubic, 224 x 224,
  # 1/255, mean = std = 0.5), as transformers does when it reads the file.
  if not cfg.get("do_resize", True):
    refuse("do_resize", "the tower needs a fixed resolution; only a "
           "squash-resize is supported")
  if cfg.get("do_center_crop"):
    refuse("do_center_crop", "only a squash-resize (no crop) is supported")
  size = cfg.get("size", {"height": 224, "width": 224})
  if not isinstance(size, dict) or set(size) != {"height", "width"}:
    refuse("size", "only {height, width} (a squash-resize) is supported")
  if arch is not None and (size["height"] != arch.image_size
                           or size["width"] != arch.image_size):
    refuse("size", f"the model's config has image_size {arch.image_size}")
  # Rescale then normalise must be SigLIP's x / 127.5 - 1 on every channel.
  factor = cfg.get("rescale_factor", 1 / 255) if cfg.get("do_rescale",
                                                           True) else 1.0
  mean, std = np.zeros(3), np.ones(3)
  if cfg.get("do_normalize", True):
    mean = np.broadcast_to(np.asarray(cfg.get("image_mean", 0.5), float), 3)
    std = np.broadcast_to(np.asarray(cfg.get("image_std", 0.5), float), 3)
  if not (np.allclose(factor / std, 1 / 127.5, rtol=1e-6, atol=0)
          and np.allclose(mean / std, 1.0, rtol=1e-6, atol=0)):
    raise common.CheckpointError(
        f"{path}: rescale_factor {factor}, image_mean {mean.tolist()}, "
        f"image_std {std.tolist()} do not map pixels to x / 127.5 - 1, "
        "SigLIP's normalisation, the only one supported")
  try:
    return preprocess.method_of_resample(cfg.get("resample", 3))
  except ValueError as e:
    raise common.CheckpointError(f"{path}: {e}") from None


def save(directory, flat, arch, fmt, dtype, resize="pil"):
  """Writes `fmt` ("nearid" or "hf-siglip") into an existing empty directory;
  its preprocessor_config.json reproduces the `resize` method."""
  tensors = to_hf(flat, arch)
  if fmt == "nearid":
    prefix = "backbone.vision_model."
    config = {"architectures": ["NearIDModel"], "model_type": "nearid",
              "vision_config": _vision_config(arch), "embed_dim": arch.width,
              "normalize_embeddings": True,
              # The release's code files, placed beside these, are what
              # AutoModel.from_pretrained(trust_remote_code=True) imports.
              "auto_map": {"AutoConfig": "configuration_nearid.NearIDConfig",
                           "AutoModel": "modeling_nearid.NearIDModel"}}
  elif fmt == "hf-siglip":
    prefix = "vision_model."
    config = {"architectures": ["SiglipVisionModel"],
              "model_type": "siglip_vision_model", **_vision_config(arch),
              "vision_use_head": True}
  else:
    raise ValueError(f"unknown export format {fmt!r}: 'nearid' or 'hf-siglip'")
  config["torch_dtype"] = dtype
  tensors = {prefix + k: np.ascontiguousarray(v.astype(dtype))
             for k, v in tensors.items()}
  safetensors.numpy.save_file(tensors, os.path.join(directory,
                                                    "model.safetensors"),
                              metadata={"format": "pt"})
  for name, obj in (("config.json", config),
                    ("preprocessor_config.json",
                     _preprocessor_config(arch, resize))):
    with open(os.path.join(directory, name), "w") as f:
      json.dump(obj, f, indent=2)
