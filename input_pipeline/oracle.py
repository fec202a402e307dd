"""MTG's oracle (SPEC.md §5): how much of an edited object is left unchanged.

Computed from a row's masks when the row is read, so an evaluation batch
carries [o1, o2, 0] beside its images.
"""
import numpy as np


def mtg_oracle(part_mask, object_mask):
  """o = 1 - |part| / |object|; 0 when either mask is missing or empty.

  Masks are (H, W) or (H, W, C) arrays (a pixel is on when any channel is
  non-zero), or None.
  """
  if part_mask is None or object_mask is None:
    return 0.0
  part, obj = (np.asarray(m) for m in (part_mask, object_mask))
  part, obj = (m.any(-1) if m.ndim == 3 else m != 0 for m in (part, obj))
  if part.shape != obj.shape:
    raise ValueError(f"part mask {part.shape} and object mask {obj.shape} "
                     "differ in size")
  area = np.count_nonzero(obj)
  return 1.0 - np.count_nonzero(part) / area if area else 0.0
