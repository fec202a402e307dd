"""Reads our exports back with transformers (PyTorch): the check that they load.

`format="nearid"` is read by a class with the published NearIDModel's
structure (config model_type "nearid", `backbone` = SiglipVisionModel,
embedding = L2-normalised pooler_output), written here from those facts so the
check needs no remote code. Needs torch and transformers (requirements-test).
"""
import numpy as np
import torch
import transformers


class NearIDConfig(transformers.PretrainedConfig):
  model_type = "nearid"

  def __init__(self, vision_config=None, embed_dim=1152,
               normalize_embeddings=True, **kw):
    super().__init__(**kw)
    self.vision_config = vision_config or {}
    self.embed_dim = embed_dim
    self.normalize_embeddings = normalize_embeddings


class NearIDModel(transformers.PreTrainedModel):
  config_class = NearIDConfig
  main_input_name = "pixel_values"

  def __init__(self, config):
    super().__init__(config)
    vcfg = transformers.SiglipVisionConfig(**config.vision_config)
    self.backbone = transformers.SiglipVisionModel(vcfg)
    self.post_init()

  def _init_weights(self, module):
    """Every weight comes from the checkpoint."""

  def forward(self, pixel_values):
    pooled = self.backbone(pixel_values=pixel_values).pooler_output
    return torch.nn.functional.normalize(pooled, dim=-1)


def load(out_dir, fmt):
  """-> (torch module: pixel_values -> unit embeddings, loading info)."""
  if fmt == "nearid":
    model, info = NearIDModel.from_pretrained(out_dir, output_loading_info=True)
    return model.eval(), info
  vision, info = transformers.SiglipVisionModel.from_pretrained(
      out_dir, output_loading_info=True)
  vision.eval()

  def embed(pixel_values):
    pooled = vision(pixel_values=pixel_values).pooler_output
    return torch.nn.functional.normalize(pooled, dim=-1)
  return embed, info


def processor(out_dir):
  # transformers 5 names the PIL-based processor *Pil; its default needs
  # torchvision. Both read the same preprocessor_config.json.
  cls = getattr(transformers, "SiglipImageProcessorPil",
                transformers.SiglipImageProcessor)
  return cls.from_pretrained(out_dir)


def embed(out_dir, fmt, images):
  """uint8 images -> float32 embeddings through transformers end to end."""
  model, _ = load(out_dir, fmt)
  pix = processor(out_dir)(images=list(images), return_tensors="pt")
  with torch.no_grad():
    out = model(pix["pixel_values"].float())
  return np.asarray(out.float().numpy(), np.float32)
