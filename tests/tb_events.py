"""TensorBoard scalars of a log directory, as TensorBoard shows them."""
import glob
import os
import struct

from tensorboardX.proto import event_pb2


def _records(path):
  """The records of a TFRecord file: u64 length, u32 CRC, data, u32 CRC."""
  with open(path, "rb") as f:
    while len(header := f.read(12)) == 12:
      (n,) = struct.unpack("<Q", header[:8])
      data = f.read(n)
      if len(data) < n:
        return  # cut by a kill -9; TensorBoard stops there too
      yield data
      f.read(4)


def scalars(logdir, purge=True):
  """{tag: [(step, value)]} of every event file, in TensorBoard's order (by
  name). With `purge`, as TensorBoard's EventAccumulator keeps them: in
  files of version 2, each SessionLog START after a run's first drops every
  earlier event at or past its step; the first START drops nothing."""
  out, version, started = {}, None, False
  for path in sorted(glob.glob(os.path.join(logdir, "*tfevents*"))):
    for record in _records(path):
      e = event_pb2.Event.FromString(record)
      if e.file_version:
        version = int(e.file_version.split(":")[1])
      if (purge and version and version >= 2
          and e.session_log.status == event_pb2.SessionLog.START):
        if started:
          out = {tag: [(s, v) for s, v in rows if s < e.step]
                 for tag, rows in out.items()}
        started = True
      for v in e.summary.value:
        out.setdefault(v.tag, []).append((e.step, v.simple_value))
  return out
