"""A local sweep over the demo: learning rate x temperature.

    python launch.py --config configs/demo_sweep.py --workdir runs/sweep \
        --mode sweep --config.input.data_dir=runs/demo/data/tfds
"""
from configs import demo


def get_config(arg=None):
  return demo.get_config(arg)


def sweep():
  return [{"lr": lr, "loss.temperature": t}
          for lr in (1e-3, 3e-3) for t in (0.05, 0.07)]
