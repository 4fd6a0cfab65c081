"""Entry point: `python -m jaxlab.main --config=<file.py>[:arg] --workdir=<dir> [--config.k=v ...]`.

`config.job` picks the job: `train` (default), `transform` (offline checkpoint
transform), `evaluate` (a checkpoint on a split), `pipeline` (a method's
multi-stage experiment). main only parses flags, records the resolved config,
overrides and package versions in the workdir, and calls the library.
"""

from __future__ import annotations

import json
import os
import shutil
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file (path.py[:arg]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and results.")


def _check_writable(workdir: str) -> bool:
  """Creates `workdir` if needed; returns whether it existed before. Raises a clear error."""
  existed = os.path.isdir(workdir)
  try:
    os.makedirs(workdir, exist_ok=True)
    probe = os.path.join(workdir, ".write_test")
    with open(probe, "w") as f:
      f.write("ok")
    os.remove(probe)
  except OSError as e:
    raise PermissionError(f"--workdir={workdir} is not writable ({e.strerror}); choose another directory") from e
  return existed


def record_run(config, workdir: str, argv: list[str]) -> None:
  """Writes config.json, overrides.txt and versions.json into the workdir."""
  from jaxlab import checkpoint
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(config.to_json_best_effort(indent=2))
  overrides = [a for a in argv if a.startswith("--config.")]
  with open(os.path.join(workdir, "overrides.txt"), "w") as f:
    f.write("\n".join(overrides) + ("\n" if overrides else ""))
  with open(os.path.join(workdir, "versions.json"), "w") as f:
    json.dump(checkpoint.versions(), f, indent=2)


def run(config, workdir: str) -> dict:
  """Runs the job that `config.job` names. Library entry point shared with tests and colabs."""
  from jaxlab import compile_cache
  cache = config.get("compilation_cache", "") if config.get("job", "train") in ("train", "pipeline") else ""
  with compile_cache.enabled(cache, workdir):
    return _run_job(config, workdir)


def _run_job(config, workdir: str) -> dict:
  job = config.get("job", "train")
  if job == "train":
    from jaxlab import train
    return train.train_and_evaluate(config, workdir)
  if job == "transform":
    from jaxlab.transforms import engine
    return engine.run(config, workdir)
  if job == "evaluate":
    from jaxlab import evaluate
    return evaluate.run(config, workdir)
  if job == "pipeline":
    from jaxlab import pipelines
    return pipelines.get(config.pipeline)(config, workdir)
  if job in ("import", "export"):
    from jaxlab.interop import jobs
    return jobs.run_import(config, workdir) if job == "import" else jobs.run_export(config, workdir)
  raise ValueError(f"config.job: unknown job {job!r}; use train, transform, evaluate, pipeline, import or export")


def _summary_line(result: dict) -> str:
  if "test_accuracy" in result and result["test_accuracy"] is not None:
    return (f"done: test accuracy {result['test_accuracy']:.4f}, params {result.get('params', 0):,}, "
            f"wall time {result.get('wall_s', 0.0):.1f}s, workdir {result.get('workdir')}")
  keys = {k: v for k, v in result.items() if isinstance(v, (int, float, str))}
  return "done: " + ", ".join(f"{k}={v}" for k, v in keys.items())


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # orbax logs every file it writes at INFO
  from jaxlab import checkpoint
  workdir = _WORKDIR.value
  try:  # config_flags loads the file and applies overrides lazily, on first access
    config = _CONFIG.value
    if config is not None:
      config.get("job")
  except (OSError, KeyError, AttributeError, ValueError, TypeError) as e:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    detail = next((ln for ln in lines if "No such file" in ln or "not found" in ln.lower()), lines[-1] if lines else "")
    print(f"error: --config: {lines[0] if lines else type(e).__name__} ({detail})", file=sys.stderr)
    sys.exit(2)
  if config is None:
    raise app.UsageError("--config is required (for example ml_collections_configs/digits_vit.py)")
  if not workdir:
    raise app.UsageError("--workdir is required")
  existed = False
  try:
    existed = _check_writable(workdir)
    record_run(config, workdir, sys.argv)
    result = run(config, workdir)
  except (ValueError, FileNotFoundError, PermissionError, checkpoint.CheckpointError,
          FloatingPointError, KeyError) as e:
    # Nothing half-written: a new workdir without any checkpoint is removed again.
    ckpts = os.path.join(workdir, checkpoint.CKPT_SUBDIR)
    if not existed and os.path.isdir(workdir) and not (os.path.isdir(ckpts) and os.listdir(ckpts)):
      shutil.rmtree(workdir, ignore_errors=True)
    msg = str(e).splitlines()[0] if str(e) else type(e).__name__
    print(f"error: {msg}", file=sys.stderr)
    logging.debug("full error", exc_info=True)
    sys.exit(2)
  except KeyboardInterrupt:
    print(f"interrupted: start the same command again to resume from the last checkpoint in {workdir}",
          file=sys.stderr)
    sys.exit(130)
  print(_summary_line(result), flush=True)


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with an error in the config file (e.g. an unknown `:arg`) as one line, exit 2."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    cause = next((ln for ln in reversed(lines) if ln.split(":")[0].endswith(("Error", "Exception"))), None)
    if cause is None:  # a missing required flag and the like
      print(f"error: {lines[0] if lines else e} (see --helpshort)", file=sys.stderr)
    else:
      cfg = next((a for a in argv if a.startswith("--config=")), "--config")
      print(f"error: {cfg}: {cause.split(':', 1)[1].strip()}", file=sys.stderr)
    sys.exit(2)


def entry():
  flags.mark_flags_as_required(["config", "workdir"])
  try:
    app.run(main, flags_parser=_parse_flags)
  except (AttributeError, KeyError, TypeError, ValueError) as e:  # a bad --config.x override, raised while parsing
    overrides = [a for a in sys.argv[1:] if a.startswith("--config.")]
    msg = " ".join(str(e).replace("\\n", " ").replace("\\", "").replace("'", "").replace('"', "").split())
    print(f"error: bad config override among {overrides}: {msg}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  entry()
