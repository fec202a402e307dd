"""grain worker processes: the same batches as in-process, and restorable.

Apart from test_input_grain.py because starting workers (each imports jax
and tfds) is most of its time.
"""
import numpy as np
import pytest

import input_pipeline
from input_pipeline import synthetic

# Every test here starts processes or trains a run.
pytestmark = pytest.mark.slow


def test_worker_processes_give_the_same_batches_and_restore(tmp_path):
  synthetic.generate(str(tmp_path / "hf"), 12, 32, seed=0,
                     sources=("Flux", "Qwen"), mtg=4)
  cfg = input_pipeline.default_config()
  cfg.manual_dir, cfg.data_dir = str(tmp_path / "hf"), str(tmp_path / "tfds")
  cfg.sources = cfg.eval_sources = ("Flux", "Qwen")
  cfg.res, cfg.batch_size, cfg.mtg_repeat, cfg.num_workers = 32, 3, 1, 0
  input_pipeline.prepare(cfg)
  in_process = input_pipeline.train_iterator(cfg, 1, 3)
  ref = [next(in_process) for _ in range(7)]

  cfg.num_workers = 2
  it = input_pipeline.train_iterator(cfg, 1, 3)
  got = [next(it) for _ in range(3)]
  state = it.get_state()
  it.close()
  restored = input_pipeline.train_iterator(cfg, 1, 3)
  restored.set_state(state)
  got += [next(restored) for _ in range(4)]
  restored.close()
  for a, b in zip(got, ref):
    assert a.keys() == b.keys()
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])
