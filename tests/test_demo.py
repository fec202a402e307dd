"""The README's main command, on the embedded default config."""
import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_launch_demo_end_to_end(tmp_path):
  out = subprocess.run(
      [sys.executable, "launch.py", "--config", "configs/demo.py",
       "--workdir", str(tmp_path), "--mode", "demo"],
      cwd=REPO, capture_output=True, text=True, timeout=600, check=False)
  assert out.returncode == 0, out.stderr[-3000:]
  report = json.load(open(tmp_path / "demo.json"))
  for fmt in ("nearid", "hf-siglip"):
    assert report["exports"][fmt]["max_abs_diff"] < 1e-4


def test_misspelled_config_key_is_refused(tmp_path):
  out = subprocess.run(
      [sys.executable, "launch.py", "--config", "configs/demo.py",
       "--workdir", str(tmp_path), "--config.model.resolution=64"],
      cwd=REPO, capture_output=True, text=True, timeout=120, check=False)
  assert out.returncode != 0
  assert "resolution" in out.stderr
