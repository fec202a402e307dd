"""Local sweeps: a config file's `sweep()` lists overrides, one run each.

    # configs/x.py
    def sweep():
      return [{"lr": lr, "loss.temperature": t}
              for lr in (1e-4, 3e-4) for t in (0.05, 0.07)]

    python launch.py --config configs/x.py --workdir runs/x --mode sweep

runs each into runs/x/lr=0.0001,loss.temperature=0.05 and so on, in order,
skipping runs whose workdir already finished (resume picks up the rest;
a resumed run's config is checked as any resume's: config_drift.py).
"""
import importlib.util
import os


def load_sweep(config_file):
  name = config_file.split(":")[0]
  spec = importlib.util.spec_from_file_location("_sweep_config", name)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, "sweep"):
    raise ValueError(f"{name} defines no sweep() to run")
  return module.sweep()


def run_name(overrides):
  return ",".join(f"{k}={v}" for k, v in overrides.items())


def runs(config, config_file, root):
  """-> [(config with the overrides, workdir)], every key checked first."""
  out = []
  for overrides in load_sweep(config_file):
    c = config.copy_and_resolve_references()
    for key, value in overrides.items():
      try:  # a locked ConfigDict refuses unknown keys and wrong types
        parent, _, leaf = key.rpartition(".")
        node = c
        for part in filter(None, parent.split(".")):
          node = node[part]
        node[leaf] = value
      except (KeyError, AttributeError, TypeError) as e:
        raise ValueError(f"sweep override {key}={value!r}: {e}") from None
    out.append((c, os.path.join(root, run_name(overrides))))
  return out
