"""The README's main command (shortened), and the other launch.py modes."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys

import pytest

from input_pipeline import synthetic

# Every test here starts processes or trains a run.
pytestmark = pytest.mark.slow

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The demo at toy size: same code path, seconds instead of minutes.
SHORT = ["--config.total_steps=4", "--config.eval_every=2",
         "--config.log_every=2", "--config.ckpt_every=2",
         "--config.input.batch_size=8", "--config.eval.batch_size=8",
         "--config.demo.identities=24", "--config.demo.mtg_rows=10",
         "--config.demo.image_res=32", "--config.model.res=32",
         "--config.demo.pretrain.total_steps=3",
         "--config.demo.pretrain.groups=4",
         "--config.demo.pretrain.batch_size=2"]


def shared_data(workdir):
  """Flags that run on the demo run's data and pretrained tower (no tower
  pretrained again)."""
  return [f"--config.input.data_dir={workdir}/data/tfds",
          f"--config.input.manual_dir={workdir}/data/hf",
          f"--config.model.init={workdir}/pretrained/pico8_32.npz"]


def launch(workdir, *args, config="configs/demo.py", timeout=900):
  """launch.py in a subprocess; workdir None: no --workdir flag."""
  where = [] if workdir is None else ["--workdir", str(workdir)]
  return subprocess.run(
      [sys.executable, "launch.py", "--config", config, *where, *args],
      cwd=REPO, capture_output=True, text=True, timeout=timeout, check=False)


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("demo")
  out = launch(workdir, "--mode=demo", *SHORT)
  assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
  return workdir, out


def test_demo_writes_everything(demo_run):
  workdir, out = demo_run
  rows = [json.loads(l) for l in open(workdir / "metrics.jsonl")]
  evals = [r for r in rows if "eval/nearid/ssr" in r]
  assert [r["step"] for r in evals] == [0, 2, 4]
  assert all("baseline/nearid/ssr" in r for r in evals)
  assert any("train/loss" in r for r in rows)
  for f in ("config.json", "demo.json", "report/report.md",
            "report/report.json", "export/nearid/model.safetensors",
            "export/hf-siglip/config.json"):
    assert (workdir / f).exists(), f
  summary = json.load(open(workdir / "demo.json"))
  # The frozen tower is the one the demo pretrained, in the run's config.
  tower = str(workdir / "pretrained" / "pico8_32.npz")
  assert summary["tower"] == tower
  assert json.load(open(workdir / "config.json"))["model"]["init"] == tower
  assert "pretrain step 3/3" in out.stdout
  for fmt in ("nearid", "hf-siglip"):
    assert summary["exports"][fmt]["transformers_max_abs_diff"] < 1e-4
  assert "NearID SSR on held-out identities" in out.stdout
  # A quiet console: the project's own lines and nothing the libraries log
  # at INFO/WARNING or draw as progress bars.
  lines = (out.stdout + out.stderr).splitlines()
  assert lines and all(l.startswith(("[demo ", "[train ")) for l in lines), [
      l for l in lines if not l.startswith(("[demo ", "[train "))][:5]


def test_verbosity_brings_back_the_libraries_logs(tmp_path):
  manual = tmp_path / "hf"
  synthetic.generate(str(manual), 8, 32, 0, ("Flux",))
  flux_only = [f"--config.input.manual_dir={manual}",
               "--config.input.sources=('Flux',)",
               "--config.input.eval_sources=('Flux',)",
               "--config.input.mtg_repeat=0"]
  quiet = launch(tmp_path / "quiet", "--mode=prepare", *SHORT, *flux_only)
  assert quiet.returncode == 0, quiet.stderr[-3000:]
  assert "prepared nearid" in quiet.stdout
  assert "Downloading and preparing" not in quiet.stdout + quiet.stderr
  assert "Using custom data configuration" not in quiet.stderr
  loud = launch(tmp_path / "loud", "--mode=prepare", "--verbosity=0", *SHORT,
                *flux_only)
  assert loud.returncode == 0, loud.stderr[-3000:]
  assert "Downloading and preparing" in loud.stdout
  assert "Using custom data configuration" in loud.stderr


def test_modes_on_the_demo_workdir(demo_run, tmp_path):
  workdir, _ = demo_run
  # export: the workdir's latest head, reloaded equals what the demo exported
  out = launch(workdir, "--mode=export", *SHORT)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "exported hf-siglip" in out.stdout
  # eval: a report from the workdir
  out = launch(workdir, "--mode=eval", *SHORT)
  assert out.returncode == 0, out.stderr[-3000:]
  report = json.load(open(workdir / "eval" / "report.json"))
  assert "nearid" in json.dumps(report)
  # train again: resumes at the end, nothing to do
  out = launch(workdir, "--mode=train", *SHORT)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "resumed from step 4" in out.stdout + out.stderr


def _start(workdir, *args):
  return subprocess.Popen(
      [sys.executable, "launch.py", "--config", "configs/demo.py",
       "--workdir", str(workdir), *args],
      cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _signal_after(p, text, signum):
  """Sends `signum` once the process printed a line holding `text`."""
  for line in p.stdout:
    if text in line:
      break
  p.send_signal(signum)
  return p.communicate(timeout=300)[0]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT],
                         ids=["sigterm", "sigint"])
def test_sigterm_to_launch_saves_and_exits_0(demo_run, tmp_path, signum):
  workdir, _ = demo_run
  p = _start(tmp_path / "run", "--mode=train", *SHORT, *shared_data(workdir),
             "--config.total_steps=100000", "--config.log_every=1",
             "--config.ckpt_every=100000", "--config.eval_every=0")
  out = _signal_after(p, "step 2/100000", signum)
  assert p.returncode == 0, out[-3000:]
  step = int(re.search(r"preempted: checkpoint saved at step (\d+)",
                       out).group(1))
  assert os.listdir(tmp_path / "run" / "checkpoints") == [str(step)]
  assert "to resume: python launch.py --config configs/demo.py" in out


@pytest.mark.parametrize("mode,signum,status", [
    ("eval", signal.SIGTERM, 0),
    ("cache", signal.SIGINT, 130),  # the shell's status for Ctrl-C
])
def test_notice_outside_training_stops_cleanly(demo_run, tmp_path, mode,
                                               signum, status):
  workdir, _ = demo_run
  run, cache = tmp_path / "run", tmp_path / "cache"
  run.mkdir()
  for f in ("checkpoints", "config.json"):  # a trained workdir to evaluate
    (shutil.copytree if f == "checkpoints" else shutil.copy)(
        workdir / f, run / f)
  flags = [f"--mode={mode}", *SHORT, *shared_data(workdir)]
  if mode == "cache":
    flags.append(f"--config.input.feature_cache={cache}")
  # --verbosity=0: TFDS's INFO line says the data is being read.
  p = _start(run, *flags, "--verbosity=0")
  out = _signal_after(p, "Load dataset info from", signum)
  assert p.returncode == status, out[-3000:]
  name = signal.Signals(signum).name
  assert f"--mode {mode} stopped by {name} before it finished" in out
  assert "To finish it, run the same command: python launch.py" in out
  assert "Traceback" not in out
  # nothing half-written: no report, a cache without its seal
  assert not (run / "eval" / "report.json").exists()
  assert not (cache / "metadata.json").exists()
  p = _start(run, *flags)  # the rerun finishes
  out = p.communicate(timeout=600)[0]
  assert p.returncode == 0, out[-3000:]
  done = run / "eval" / "report.json" if mode == "eval" else (
      cache / "metadata.json")
  assert done.exists()


def test_cache_mode_then_training_on_the_cache(demo_run, tmp_path):
  workdir, _ = demo_run
  flags = [*SHORT, *shared_data(workdir),
           f"--config.input.feature_cache={tmp_path / 'cache'}",
           "--config.eval_every=0"]
  out = launch(tmp_path / "run", "--mode=cache", *flags)
  assert out.returncode == 0, out.stderr[-3000:]
  assert re.search(r"feature cache .*cache: \d+ images", out.stdout)
  out = launch(tmp_path / "run", "--mode=train", *flags)
  assert out.returncode == 0, out.stderr[-3000:]
  rows = [json.loads(l) for l in open(tmp_path / "run" / "metrics.jsonl")]
  assert [r["step"] for r in rows] == [2, 4]
  # another resolution: the cache is refused, naming it
  out = launch(tmp_path / "run2", "--mode=train", *flags,
               "--config.model.res=48")
  assert out.returncode != 0
  assert "res: the cache has 32, this config 48" in out.stderr


def test_sweep_runs_each_override_in_its_own_workdir(demo_run, tmp_path):
  workdir, _ = demo_run
  cfg = tmp_path / "sweep_cfg.py"
  cfg.write_text(
      "import sys\nsys.path.insert(0, %r)\n"
      "from configs.demo import get_config\n"
      "def sweep():\n"
      "  return [{'lr': 1e-3}, {'lr': 3e-3, 'loss.temperature': 0.1}]\n"
      % REPO)
  data = [*shared_data(workdir), "--config.eval_every=0",
          "--config.total_steps=2"]
  out = launch(tmp_path / "root", "--mode=sweep", *SHORT, *data,
               config=str(cfg))
  assert out.returncode == 0, out.stderr[-3000:]
  runs = sorted(os.listdir(tmp_path / "root"))
  assert runs == ["lr=0.001", "lr=0.003,loss.temperature=0.1"]
  saved = json.load(open(tmp_path / "root" / runs[1] / "config.json"))
  assert saved["lr"] == 0.003 and saved["loss"]["temperature"] == 0.1

  cfg.write_text(cfg.read_text().replace("'loss.temperature'", "'loss.temp'"))
  out = launch(tmp_path / "root2", "--mode=sweep", *SHORT, *data,
               config=str(cfg))
  assert out.returncode != 0
  assert "sweep override loss.temp=0.1" in out.stderr
  assert not (tmp_path / "root2").exists()  # refused before any run


@pytest.mark.parametrize("flag,match", [
    ("--config.model.resolution=64", "resolution"),
    ("--config.lr=fast", "lr"),
    ("--config.mesh=(('data', 3),)", "does not divide the"),
    ("--config.model.res=50", "model.res=50 is not a multiple of the patch"),
])
def test_config_faults_are_refused_before_compute(tmp_path, flag, match):
  out = launch(tmp_path, "--mode=train", flag, timeout=300)
  assert out.returncode != 0
  assert match in out.stderr
  assert not (tmp_path / "checkpoints").exists()


def test_own_data_a_subset_of_sources_without_mtg(tmp_path):
  """README "Your own data": prepare (no workdir) one of the two sources of
  a dataset without MTG, train 5 steps, evaluate."""
  manual, data = tmp_path / "hf", tmp_path / "tfds"
  synthetic.generate(str(manual), 24, 32, 0, ("Flux", "SDXL"))
  own = ["--config.model.variant=pico/8", "--config.model.res=32",
         "--config.input.batch_size=8", "--config.eval.batch_size=8",
         f"--config.input.manual_dir={manual}",
         f"--config.input.data_dir={data}", "--config.input.sources=('SDXL',)"]
  config = "configs/own_data.py"
  out = launch(None, "--mode=prepare", *own, config=config, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  assert out.stdout.splitlines() == [
      f"prepared nearid: {data}/nearid/SDXL/1.0.0 (built)"]
  steps = ["--config.total_steps=5", "--config.eval_every=5",
           "--config.log_every=5", "--config.ckpt_every=5"]
  out = launch(tmp_path / "run", "--mode=train", *own, *steps, config=config)
  assert out.returncode == 0, out.stderr[-3000:]
  rows = [json.loads(l) for l in open(tmp_path / "run" / "metrics.jsonl")]
  assert rows[-1]["step"] == 5 and "eval/nearid/ssr" in rows[-1], rows
  out = launch(tmp_path / "run", "--mode=eval", *own, config=config)
  assert out.returncode == 0, out.stderr[-3000:]
  report = json.load(open(tmp_path / "run" / "eval" / "report.json"))
  assert "nearid" in json.dumps(report) and "mtg" not in json.dumps(report)


@pytest.mark.parametrize("args,match", [
    (["--mode=train"], "--mode train needs --workdir"),
    (["--mode=prepare", "--config.input.data_dir="],
     "--mode prepare without --workdir needs --config.input.data_dir"),
])
def test_workdir_is_required_except_to_prepare(args, match):
  out = launch(None, *args, config="configs/own_data.py", timeout=300)
  assert out.returncode != 0
  assert match in out.stderr
