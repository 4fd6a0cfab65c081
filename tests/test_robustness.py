"""No run damages a workdir or an input, and every refusal is one clear line (issue 19).

Everything goes through the command line (`python -m jaxlab.main`) in subprocesses: a refusal exits 2 with
exactly one `error:` line naming the key or file, no traceback, and leaves the workdir, every input and the
directory around them byte-identical. A run that fails after it started keeps its last good checkpoint.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import os
import re
import shutil
import subprocess

import jax
import numpy as np
import pytest
from conftest import run_main, run_python

from jaxlab import checkpoint

SMOKE = "ml_collections_configs/digits_vit.py:smoke"
TINY = ("--config.total_steps=2", "--config.checkpoint_every=1", "--config.keep_checkpoints=5",
        "--config.eval_every=0", "--config.progress=False")


def tree_hash(path) -> str:
  """sha256 over every file below `path` (relative name and bytes) and every directory name."""
  h = hashlib.sha256()
  for root, dirs, files in sorted(os.walk(path)):
    dirs.sort()
    h.update(os.path.relpath(root, path).encode())
    for name in sorted(files):
      h.update(name.encode())
      with open(os.path.join(root, name), "rb") as f:
        h.update(f.read())
  return h.hexdigest()


def error_lines(proc) -> list[str]:
  # split on "\n" only: a progress bar redraws its line with "\r", and the error must not share that line
  return [line for line in proc.stderr.split("\n") if line.startswith("error:")]


def assert_refused(proc, *fragments):
  """Exit 2, exactly one `error:` line containing every fragment, no traceback."""
  assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
  lines = error_lines(proc)
  assert len(lines) == 1, proc.stderr[-3000:]
  for frag in fragments:
    assert frag in lines[0], (frag, lines[0])
  assert "Traceback" not in proc.stderr and "Event loop is closed" not in proc.stderr, proc.stderr[-3000:]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A finished two-step run (checkpoints at steps 1 and 2) made through the command line."""
  wd = tmp_path_factory.mktemp("trained") / "run"
  proc = run_main(f"--config={SMOKE}", f"--workdir={wd}", *TINY)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return wd


def test_refusals_write_nothing(trained, tmp_path):
  """Each bad start: exit 2, one error line naming the key or file, nothing written anywhere."""
  bad_py = tmp_path / "bad.py"
  bad_py.write_text("def get_config(arg=None):\n  return {\n")
  notes = tmp_path / "notes.txt"
  notes.write_text("these are my notes, not a config\n")
  raises = tmp_path / "raises.py"
  raises.write_text("def get_config(arg=None):\n  return undefined_name\n")
  new = str(tmp_path / "new")
  run = str(trained)
  cases = [  # (args, fragments of the error line)
      ([f"--config={bad_py}", f"--workdir={new}"], [str(bad_py), "not a valid Python config file", "line 2"]),
      ([f"--config={notes}", f"--workdir={new}"], [str(notes), "not a valid Python config file"]),
      ([f"--config={raises}", f"--workdir={new}"], [str(raises), "NameError", "undefined_name"]),
      ([f"--config={SMOKE}", f"--workdir={new}", "--config.data.batch_size=0"], ["config.data.batch_size=0"]),
      ([f"--config={SMOKE}", f"--workdir={run}", "--config.data.batch_size=0"], ["config.data.batch_size=0"]),
      ([f"--config={SMOKE}", f"--workdir={new}", "--config.model.depth=0"], ["config.model.depth=0"]),
      ([f"--config={SMOKE}", f"--workdir={new}", "--config.optimizer.warmup_steps=-1"],
       ["config.optimizer.warmup_steps=-1"]),
      ([f"--config={SMOKE}", f"--workdir={new}", "--config.optimizer.b2=1.5"], ["config.optimizer.b2=1.5"]),
      ([f"--config={SMOKE}", f"--workdir={new}", "--config.data.batch_size=4096"],
       ["config.data.batch_size=4096", "training examples"]),
      # a resume that cannot work: another model, another optimizer, fewer steps than the checkpoint
      ([f"--config={SMOKE}", f"--workdir={run}", "--config.model.width=48", *TINY], ["--workdir", "cannot resume"]),
      ([f"--config={SMOKE}", f"--workdir={run}", "--config.optimizer.name=sgd", *TINY],
       ["--workdir", "config.optimizer"]),
      ([f"--config={SMOKE}", f"--workdir={run}", "--config.optimizer.grad_clip=0", *TINY],  # same arrays, other tree
       ["--workdir", "config.optimizer"]),
      ([f"--config={SMOKE}", f"--workdir={run}", "--config.total_steps=1"], ["--workdir", "step 2"]),
      # a workdir that is (inside) an input
      (["--config=ml_collections_configs/transform.py:uniform_soup", f"--config.inputs={run},{run}",
        f"--workdir={run}"], ["--workdir", "config.inputs"]),
      (["--config=ml_collections_configs/evaluate.py", f"--config.checkpoint={run}", f"--workdir={run}"],
       ["--workdir", "config.checkpoint"]),
      ([f"--config={SMOKE}", f"--config.init_from.path={run}", f"--workdir={run}/finetune"],
       ["--workdir", "config.init_from.path"]),
      ([f"--config={SMOKE}", f"--config.init_from.path={tmp_path}/missing", f"--workdir={new}"],
       ["config.init_from.path", "missing"]),
  ]
  before_run, before_tmp = tree_hash(run), sorted(os.listdir(tmp_path))
  with concurrent.futures.ThreadPoolExecutor(4) as pool:
    procs = list(pool.map(lambda case: run_main(*case[0]), cases))
  for (args, fragments), proc in zip(cases, procs, strict=True):
    print(" ".join(args))  # shown when the case fails
    assert_refused(proc, *fragments)
  assert tree_hash(run) == before_run  # the existing workdir (also the input of the last cases) is untouched
  assert sorted(os.listdir(tmp_path)) == before_tmp  # no new directory left behind


def _copy(src, dst) -> str:
  shutil.copytree(src, dst)
  return str(dst)


def test_nonfinite_stop_keeps_last_good_checkpoint_and_history(trained, tmp_path):
  """A resume whose loss blows up stops with one line naming the step and the kept checkpoint; the bar's line
  is closed first; the kept checkpoint loads and is finite; the run's history gains an attempt."""
  wd = _copy(trained, tmp_path / "run")
  record_before = open(os.path.join(wd, "config.json")).read()
  proc = run_main(f"--config={SMOKE}", f"--workdir={wd}", "--config.total_steps=6", "--config.checkpoint_every=1",
                  "--config.optimizer.lr=1e30", "--config.optimizer.warmup_steps=0",
                  "--config.optimizer.schedule=constant", "--config.log_every=1")  # progress bar on
  assert_refused(proc, "non-finite loss", "last good checkpoint, step")
  bad_step = int(re.search(r"non-finite loss or gradients at step (\d+)", error_lines(proc)[0]).group(1))
  kept_step = int(re.search(r"last good checkpoint, step (\d+)", error_lines(proc)[0]).group(1))
  steps = checkpoint.steps(os.path.join(wd, "checkpoints"))
  assert 2 <= kept_step < bad_step and steps[-1] == kept_step  # nothing was written from the bad step on
  kept = checkpoint.load(wd)
  assert kept.step == kept_step and all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(kept.theta))
  # history: attempt 001 (the original run) and 002 (this one, an error) side by side
  attempts = os.path.join(wd, "attempts")
  assert sorted(os.listdir(attempts)) == ["001", "002"]
  assert json.load(open(os.path.join(attempts, "001", "outcome.json")))["status"] == "done"
  outcome = json.load(open(os.path.join(attempts, "002", "outcome.json")))
  assert outcome["status"] == "error" and "non-finite" in outcome["message"]
  assert "--config.optimizer.lr=1e30" in open(os.path.join(attempts, "002", "overrides.txt")).read()
  assert "--config.optimizer.lr=1e30" not in open(os.path.join(attempts, "001", "overrides.txt")).read()
  # the latest record describes the newest checkpoint: this attempt's if it wrote one, else the first one's
  latest = "002" if kept_step > 2 else "001"
  assert open(os.path.join(wd, "config.json")).read() == open(os.path.join(attempts, latest, "config.json")).read()
  if latest == "001":
    assert open(os.path.join(wd, "config.json")).read() == record_before


_READ_ONLY_BETWEEN_SAVES = """
import os, subprocess, sys
from jaxlab import checkpoint, main
save, calls = checkpoint.Manager.save, []
def save_then_lock(self, step, *args, **kw):
  if calls:  # the checkpoint folder becomes unwritable between two saves (root ignores mode bits: chattr +i)
    self.wait()
    if os.getuid() == 0:
      subprocess.run(["chattr", "+i", self.directory], check=True)
    else:
      os.chmod(self.directory, 0o555)
  calls.append(step)
  return save(self, step, *args, **kw)
checkpoint.Manager.save = save_then_lock
sys.argv = ["jaxlab.main"] + {args!r}
main.entry()
"""


def _unlock(directory: str):
  if os.getuid() == 0:
    subprocess.run(["chattr", "-i", directory], check=False)
  os.chmod(directory, 0o755)


def test_unwritable_checkpoint_dir_stops_and_keeps_previous_checkpoint(trained, tmp_path):
  if os.getuid() == 0 and shutil.which("chattr") is None:
    pytest.skip("running as root without chattr: cannot make a directory unwritable")
  wd = _copy(trained, tmp_path / "run")
  ckpts = os.path.join(wd, "checkpoints")
  args = [f"--config={SMOKE}", f"--workdir={wd}", "--config.total_steps=4", "--config.checkpoint_every=1",
          "--config.keep_checkpoints=5", "--config.eval_every=0", "--config.progress=False"]
  try:
    proc = run_python(_READ_ONLY_BETWEEN_SAVES.format(args=args))
  finally:
    _unlock(ckpts)
  if "chattr:" in proc.stderr:  # e.g. an overlay file system, or a container without CAP_LINUX_IMMUTABLE
    pytest.skip("cannot make a directory immutable here: " + proc.stderr.split("chattr:")[1].splitlines()[0])
  assert_refused(proc, ckpts, "step 4", "step 3 is intact")
  assert checkpoint.steps(ckpts) == [1, 2, 3]
  kept = checkpoint.load(wd)
  assert kept.step == 3 and all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(kept.theta))
  # this attempt wrote checkpoint 3, so the latest record is its own; the first attempt's is kept beside it
  attempts = os.path.join(wd, "attempts")
  assert open(os.path.join(wd, "overrides.txt")).read() == open(os.path.join(attempts, "002", "overrides.txt")).read()
  assert "--config.total_steps=2" in open(os.path.join(attempts, "001", "overrides.txt")).read()


def test_failure_after_resume_closes_the_checkpoint_manager(trained, tmp_path):
  """A teacher checkpoint whose meta is fine but whose arrays are damaged gets past validation and fails after
  the resume has opened the workdir's checkpoint manager: one error line, and no orbax thread complaining at
  interpreter exit ('Event loop is closed'); the workdir's record is put back, since no checkpoint was written."""
  wd = _copy(trained, tmp_path / "run")
  teacher = _copy(trained, tmp_path / "teacher")
  data_dir = os.path.join(teacher, "checkpoints", "2", "weights", "d")
  for name in os.listdir(data_dir):
    with open(os.path.join(data_dir, name), "r+b") as f:
      f.truncate(8)
  record_before = open(os.path.join(wd, "config.json")).read()
  proc = run_main(f"--config={SMOKE}", f"--workdir={wd}", "--config.total_steps=3", "--config.progress=False",
                  f"--config.objective.teacher={teacher}")
  assert_refused(proc, teacher)
  assert open(os.path.join(wd, "config.json")).read() == record_before
  assert checkpoint.steps(os.path.join(wd, "checkpoints")) == [1, 2]


def test_every_config_passes_the_number_checks():
  """No false refusal: the plain and smoke variants of every config pass `validate.numbers`."""
  import glob
  import importlib.util

  from conftest import ROOT

  from jaxlab import validate
  for path in sorted(glob.glob(os.path.join(ROOT, "ml_collections_configs", "*.py"))):
    spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    for arg in (None, "smoke"):
      try:
        cfg = mod.get_config(arg)
      except ValueError:  # a config without this variant (transform.py needs a transform name)
        continue
      validate.numbers(cfg)


def test_validate_names_the_key_and_the_path(tmp_path):
  import ml_collections

  from jaxlab import validate
  def refused(tree) -> str:
    with pytest.raises(ValueError) as e:
      validate.numbers(ml_collections.ConfigDict(tree))
    return str(e.value)

  assert refused({"data": {"batch_size": 0}}) == "config.data.batch_size=0: must be a positive whole number"
  assert refused({"teacher": {"model": {"num_heads": 0}}}).startswith("config.teacher.model.num_heads=0: must be")
  assert refused({"optimizer": {"lr": float("nan")}}) == "config.optimizer.lr=nan: must be a finite number"
  assert refused({"optimizer": {"b2": 1.0}}) == "config.optimizer.b2=1.0: must be in [0, 1)"
  assert refused({"log_every": 0}) == "config.log_every=0: must be at least 1"
  validate.numbers(ml_collections.ConfigDict({"num_heads": 0, "image_size": 0, "total_steps": 0}))  # 0 = inferred
  src = tmp_path / "src"
  src.mkdir()
  with pytest.raises(ValueError, match=r"--workdir=.*/src/out is inside the input config\.init_from\.path="):
    validate.check_paths(str(src / "out"), [("config.init_from.path", str(src))])
  with pytest.raises(ValueError, match=r"config\.out=.*/src/x\.safetensors is inside the input config\.checkpoint"):
    validate.check_paths(str(tmp_path / "w"), [("config.checkpoint", str(src))],
                         [("config.out", str(src / "x.safetensors"))])
  with pytest.raises(FileNotFoundError, match=r"^config\.source=.*/nope\.safetensors: no such file"):
    validate.check_exist([("config.source", str(tmp_path / "nope.safetensors"))])
  with pytest.raises(ValueError, match=r"^config\.inputs=.*/src: no jaxlab checkpoint found"):
    validate.check_checkpoints([("config.inputs", str(src))])
  validate.check_paths(str(tmp_path / "w"), [("config.checkpoint", str(src))])  # a sibling is fine
  assert not (tmp_path / "w").exists()  # checking writes nothing


def test_failure_keeps_what_has_value_and_puts_the_record_back(tmp_path):
  """After a failed start: a new workdir with finished pipeline stages stays; a new one with nothing of value
  goes; an existing one whose checkpoints did not change gets its previous record back."""
  from jaxlab import main

  stages = tmp_path / "pipeline"
  snap = main._Snapshot(str(stages))
  (stages / "pretrain" / "checkpoints" / "5" / "meta").mkdir(parents=True)
  (stages / "config.json").write_text("{}")
  snap.restore_after_failure()
  assert (stages / "pretrain" / "checkpoints" / "5" / "meta").is_dir()

  fresh = tmp_path / "fresh"
  snap = main._Snapshot(str(fresh))
  (fresh / "attempts" / "001").mkdir(parents=True)
  (fresh / "config.json").write_text("{}")
  snap.restore_after_failure()
  assert not fresh.exists()

  run = tmp_path / "run"
  (run / "checkpoints" / "2" / "meta").mkdir(parents=True)
  (run / "config.json").write_text('{"old": 1}')
  snap = main._Snapshot(str(run))
  (run / "config.json").write_text('{"new": 1}')
  (run / "overrides.txt").write_text("--config.seed=1\n")
  snap.restore_after_failure()
  assert (run / "config.json").read_text() == '{"old": 1}' and not (run / "overrides.txt").exists()
