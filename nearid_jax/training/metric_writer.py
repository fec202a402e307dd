"""metrics.jsonl and TensorBoard event files in the workdir (process 0 only)."""
import json
import os

import jax


def _drop_rows_after(path, step):
  """Keeps metrics.jsonl rows up to `step`; a torn last line goes too."""
  if not os.path.exists(path):
    return
  keep = []
  with open(path) as f:
    for line in f:
      try:
        row = json.loads(line)
      except json.JSONDecodeError:
        continue  # a line cut by a kill -9
      if row["step"] <= step:
        keep.append(line if line.endswith("\n") else line + "\n")
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    f.writelines(keep)
  os.replace(tmp, path)


class MetricWriter:
  """resume_step: rows of later steps (lost work, to be redone) are dropped."""

  def __init__(self, workdir, resume_step=None):
    self.enabled = jax.process_index() == 0
    if not self.enabled:
      return
    import tensorboardX  # pylint: disable=g-import-not-at-top
    path = os.path.join(workdir, "metrics.jsonl")
    if resume_step is not None:
      _drop_rows_after(path, resume_step)
    self._jsonl = open(path, "a")
    self._tb = tensorboardX.SummaryWriter(workdir)

  def write(self, step, scalars):
    if not self.enabled:
      return
    scalars = {k: float(v) for k, v in scalars.items()}
    self._jsonl.write(json.dumps({"step": int(step), **scalars}) + "\n")
    self._jsonl.flush()
    for k, v in scalars.items():
      self._tb.add_scalar(k, v, int(step))
    self._tb.flush()

  def close(self):
    if self.enabled:
      self._jsonl.close()
      self._tb.close()
