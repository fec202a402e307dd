"""NearID and MTG input: TFDS builders (ArrayRecord), grain pipelines, data.

  prepare(config.input)            HF downloads -> ArrayRecord (tfds_builders);
                                   a build whose inputs changed since is
                                   refused everywhere (StaleBuild) until
                                   rebuilt (config.input.rebuild)
  train_iterator(config.input, process_index, process_count)
                                   checkpointable training batches
  eval_batches(config.input, split, sources, batch_size)
                                   a split's rows, padded fixed-shape batches
  default_config()                 the `config.input` fields, documented in
                                   grain_pipeline
  synthetic.generate(out, ...)     a NearID-format dataset to prepare
  preprocess                       squash-resize + [-1, 1] (SPEC.md §2)
  oracle.mtg_oracle                MTG's oracle from a row's masks
Data only: nothing here imports nearid_jax.
"""
from input_pipeline.grain_pipeline import default_config
from input_pipeline.grain_pipeline import eval_batches
from input_pipeline.grain_pipeline import train_dataset
from input_pipeline.grain_pipeline import train_iterator
from input_pipeline.groups import CorruptImage
from input_pipeline.tfds_builders import DataError
from input_pipeline.tfds_builders import prepare
from input_pipeline.tfds_builders import StaleBuild

__all__ = ["default_config", "eval_batches", "train_dataset",
           "train_iterator", "prepare", "CorruptImage", "DataError",
           "StaleBuild"]
