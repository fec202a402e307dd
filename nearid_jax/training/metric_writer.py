"""metrics.jsonl and TensorBoard event files in the workdir (process 0 only)."""
import json
import os
import time

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
  """resume_step: rows of later steps (lost work, to be redone) are dropped,
  and hidden in TensorBoard.

  TensorBoard hides earlier events at or past the step of a SessionLog START
  event (purge_step), but ignores a run's first START: every writer of a run
  must write one, a fresh start too (resume_step -1: purge from step 0).
  """

  def __init__(self, workdir, resume_step=None):
    self.enabled = jax.process_index() == 0
    if not self.enabled:
      return
    import tensorboardX  # pylint: disable=g-import-not-at-top
    path = os.path.join(workdir, "metrics.jsonl")
    if resume_step is not None:
      _drop_rows_after(path, resume_step)
    self._jsonl = open(path, "a")
    # The file name has the time in seconds and is opened "wb": a suffix in
    # ns keeps a restart within the same second from overwriting the file,
    # and the files in time order (TensorBoard reads them sorted by name).
    self._tb = tensorboardX.SummaryWriter(
        workdir, purge_step=None if resume_step is None else resume_step + 1,
        filename_suffix=f".{time.time_ns()}")

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
