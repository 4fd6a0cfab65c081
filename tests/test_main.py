"""The entry point: overrides, recorded config, one-line errors with non-zero exit and nothing half-written."""

import json
import os

import pytest
from conftest import run_main

SMOKE = "ml_collections_configs/digits_vit.py:smoke"


def _assert_one_line_error(proc, *fragments):
  assert proc.returncode != 0, proc.stdout + proc.stderr
  err_lines = [line for line in proc.stderr.splitlines() if line.startswith(("error:", "FATAL Flags parsing error"))]
  assert err_lines, proc.stderr[-2000:]
  for frag in fragments:
    assert frag in err_lines[0], err_lines[0]


def test_smoke_run_records_config_and_overrides(tmp_path):
  wd = tmp_path / "run"
  proc = run_main(f"--config={SMOKE}", f"--workdir={wd}", "--config.optimizer.lr=0.003", "--config.model.depth=1",
                  "--config.progress=False")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "done: test accuracy" in proc.stdout
  cfg = json.load(open(wd / "config.json"))
  assert cfg["optimizer"]["lr"] == 0.003 and cfg["model"]["depth"] == 1
  assert open(wd / "overrides.txt").read().split() == ["--config.optimizer.lr=0.003", "--config.model.depth=1",
                                                       "--config.progress=False"]
  assert "jax" in json.load(open(wd / "versions.json"))
  # a second start of the same command finds the final checkpoint and does not train again
  again = run_main(f"--config={SMOKE}", f"--workdir={wd}", "--config.optimizer.lr=0.003", "--config.model.depth=1",
                   "--config.progress=False")
  assert again.returncode == 0 and "done: test accuracy" in again.stdout


@pytest.mark.parametrize("args,fragments", [
    (["--config=ml_collections_configs/nope.py"], ["nope.py"]),
    ([f"--config={SMOKE}", "--config.optimizer.lrr=1"], ["lrr"]),
    (["--config=ml_collections_configs/transform.py:nope"], ["transform.py:nope", "unknown transform 'nope'"]),
    ([f"--config={SMOKE}", "--config.model.name=resnet9000"], ["config.model.name", "resnet9000"]),
    ([f"--config={SMOKE}", "--config.data.name=imagenet_v9"], ["config.data.name", "imagenet_v9"]),
    ([f"--config={SMOKE}", "--config.data.name=tfds", "--config.data.tfds_name=mnist",
      "--config.data.data_dir=/nonexistent_tfds_dir"], ["tfds build mnist"]),
])
def test_bad_input_one_line_error_and_nothing_written(tmp_path, args, fragments):
  wd = tmp_path / "out"
  proc = run_main(*args, f"--workdir={wd}")
  _assert_one_line_error(proc, *fragments)
  assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
  assert not wd.exists()


def test_unwritable_workdir(tmp_path):
  ro = tmp_path / "ro"
  ro.mkdir()
  os.chmod(ro, 0o500)
  if os.access(ro, os.W_OK):  # running as root: permissions do not bind
    target = "/proc/jaxlab_cannot_write_here"
  else:
    target = str(ro / "sub")
  proc = run_main(f"--config={SMOKE}", f"--workdir={target}")
  _assert_one_line_error(proc, "--workdir", "not writable")


def test_compilation_cache_setting(tmp_path):
  import jax

  from jaxlab import compile_cache
  configured = jax.config.jax_compilation_cache_dir  # conftest sets JAX_COMPILATION_CACHE_DIR
  assert configured
  assert compile_cache.resolve("", tmp_path) == "" and compile_cache.resolve("off", tmp_path) == ""
  assert compile_cache.resolve("auto", tmp_path) == configured  # an existing cache is kept
  assert compile_cache.resolve(True, tmp_path) == configured
  own = tmp_path / "cache"
  with compile_cache.enabled(str(own), tmp_path) as path:
    assert path == str(own) and jax.config.jax_compilation_cache_dir == str(own)
    jax.jit(lambda x: x * 3 + 1).lower(jax.numpy.arange(7.0)).compile()
  assert jax.config.jax_compilation_cache_dir == configured  # restored on exit
  assert own.is_dir() and os.listdir(own)  # the program was written there


def test_pipeline_list_keys_accept_comma_separated_overrides():
  from jaxlab import configs
  assert configs.as_tuple(("seq_digits,pathfinder",)) == ("seq_digits", "pathfinder")  # how `a,b` arrives
  assert configs.as_tuple("0,1, 2", int) == (0, 1, 2)
  assert configs.as_tuple((3, "4,5"), int) == (3, 4, 5)


def test_pipeline_command_line_shows_the_recorded_overrides(tmp_path):
  from jaxlab.experiments import command
  assert command(str(tmp_path), "s4d.py").endswith(f"--config=ml_collections_configs/s4d.py --workdir={tmp_path}")
  (tmp_path / "overrides.txt").write_text("--config.s4d.tasks=('listops','pathfinder')\n--config.seed=3\n")
  assert command(str(tmp_path), "s4d.py").endswith(
      f"--workdir={tmp_path} \"--config.s4d.tasks=('listops','pathfinder')\" --config.seed=3")
