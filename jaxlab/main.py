"""Entry point: `python -m jaxlab.main --config=<file.py>[:arg] --workdir=<dir> [--config.k=v ...]`.

`config.job` picks the job: `train` (default), `transform` (offline checkpoint
transform), `evaluate` (a checkpoint on a split), `pipeline` (a method's
multi-stage experiment). main only parses flags and, in this order:
  1. validates the job's config and inputs (`jaxlab.validate`): a refusal is one
     `error:` line, exit 2, and nothing is written anywhere;
  2. records the attempt (`<workdir>/attempts/<NNN>/` and the latest at
     `<workdir>/config.json`, `overrides.txt`, `versions.json`);
  3. calls the library. A failure after that is one `error:` line, exit 2; a new
     workdir without a checkpoint is removed, and an existing one gets its
     previous record back when the attempt wrote no checkpoint.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import sys
import time

from absl import app, flags, logging
from ml_collections import config_flags

from jaxlab.registry import Registry

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file (path.py[:arg]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and results.")


RECORD_FILES = ("config.json", "overrides.txt", "versions.json")
ATTEMPTS_SUBDIR = "attempts"


def _record_texts(config, argv: list[str]) -> dict[str, str]:
  from jaxlab import checkpoint
  overrides = [a for a in argv if a.startswith("--config.")]
  return {
      "config.json": config.to_json_best_effort(indent=2),
      "overrides.txt": "\n".join(overrides) + ("\n" if overrides else ""),
      "versions.json": json.dumps(checkpoint.versions(), indent=2),
  }


def _write_atomic(path: str, text: str) -> None:
  """Writes `text` to a temporary name beside `path` and moves it into place (never a half-written file)."""
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w") as f:
    f.write(text)
  os.replace(tmp, path)


def record_run(config, workdir: str, argv: list[str]) -> str:
  """Records this start of a job; returns its attempt folder. Call only after validation succeeded.

  Every start gets `<workdir>/attempts/<NNN>/` with config.json, overrides.txt, versions.json and command.txt
  (later `outcome.json`), so a workdir's history is never overwritten; the latest attempt is also copied to
  `<workdir>/config.json`, `overrides.txt` and `versions.json`, the names tools read.

  Raises:
    PermissionError: the workdir cannot be created or written.
  """
  texts = _record_texts(config, argv)
  try:
    os.makedirs(workdir, exist_ok=True)
    root = os.path.join(workdir, ATTEMPTS_SUBDIR)
    os.makedirs(root, exist_ok=True)
    taken = [int(d) for d in os.listdir(root) if d.isdigit()]
    attempt = os.path.join(root, f"{max(taken, default=0) + 1:03d}")
    os.makedirs(attempt)
    for name, text in texts.items():
      _write_atomic(os.path.join(attempt, name), text)
    _write_atomic(os.path.join(attempt, "command.txt"), shlex.join([sys.executable, *argv]) + "\n")
    for name, text in texts.items():
      _write_atomic(os.path.join(workdir, name), text)
  except OSError as e:
    raise PermissionError(f"--workdir={workdir} is not writable ({e.strerror or e}); choose another directory") from e
  return attempt


def _finish_attempt(attempt: str | None, status: str, message: str = "") -> None:
  """Writes the attempt's `outcome.json` (done / error / interrupted); best effort, never raises."""
  if not attempt:
    return
  try:
    _write_atomic(os.path.join(attempt, "outcome.json"),
                  json.dumps({"status": status, "message": message, "ended": time.strftime("%Y-%m-%dT%H:%M:%S%z")},
                             indent=2))
  except OSError:
    pass


def _checkpoints_below(workdir: str) -> set[tuple[str, int]]:
  """(checkpoints folder, step) of every finished checkpoint in `workdir` and its sub-workdirs (pipeline stages)."""
  from jaxlab import checkpoint
  found = set()
  for root, dirs, _ in os.walk(workdir):
    if checkpoint.CKPT_SUBDIR in dirs:
      cdir = os.path.join(root, checkpoint.CKPT_SUBDIR)
      found.update((os.path.relpath(cdir, workdir), s) for s in checkpoint.steps(cdir))
    dirs[:] = [d for d in dirs if d not in (checkpoint.CKPT_SUBDIR, "jax_cache", "tensorboard", ATTEMPTS_SUBDIR)]
  return found


class _Snapshot:
  """The workdir's latest record and checkpoints before a start, to put the record back after a failure that
  wrote no checkpoint (the workdir then again describes its own checkpoints), or to remove a workdir this
  start created when nothing of value was made in it."""

  def __init__(self, workdir: str):
    self.workdir = workdir
    self.existed = os.path.isdir(workdir)
    self.checkpoints = _checkpoints_below(workdir) if self.existed else set()
    self.records = {}
    for name in RECORD_FILES:
      path = os.path.join(workdir, name)
      if os.path.isfile(path):
        with open(path, "rb") as f:
          self.records[name] = f.read()

  def restore_after_failure(self) -> None:
    if not os.path.isdir(self.workdir):
      return
    now = _checkpoints_below(self.workdir)
    if not self.existed and not now:  # nothing of value was made: leave no directory behind
      shutil.rmtree(self.workdir, ignore_errors=True)
      return
    if now != self.checkpoints:  # this attempt wrote checkpoints: the record describes them
      return
    for name in RECORD_FILES:
      path = os.path.join(self.workdir, name)
      try:
        if name in self.records:
          with open(f"{path}.tmp{os.getpid()}", "wb") as f:
            f.write(self.records[name])
          os.replace(f"{path}.tmp{os.getpid()}", path)
        elif os.path.exists(path):
          os.remove(path)
      except OSError:
        pass


def run(config, workdir: str) -> dict:
  """Validates and runs the job that `config.job` names. Library entry point shared with tests and colabs.

  Raises:
    ValueError / OSError (CheckpointError, FileNotFoundError, PermissionError) naming the config key, flag or
    file: from the validation pass (`jaxlab.validate.job`, nothing written yet) or from the job.
  """
  _validate(config, workdir)
  return _execute(config, workdir)


def _validate(config, workdir: str) -> None:
  """`validate.job`, plus the pipeline name: the pipelines import train, which imports validate, so the
  registry of pipelines is consulted here rather than inside `jaxlab.validate` (no import cycle)."""
  from jaxlab import validate
  validate.job(config, workdir)
  if config.get("job", "train") == "pipeline":
    from jaxlab import pipelines
    pipelines.get(config.get("pipeline", ""))


def _execute(config, workdir: str) -> dict:
  """Runs an already validated job, with the compilation cache its config asks for."""
  from jaxlab import compile_cache
  cache = config.get("compilation_cache", "") if config.get("job", "train") in ("train", "pipeline") else ""
  with compile_cache.enabled(cache, workdir):
    return _run_job(config, workdir)


def _train(config, workdir: str) -> dict:
  from jaxlab import train
  return train.train_and_evaluate(config, workdir)


def _transform(config, workdir: str) -> dict:
  from jaxlab.transforms import engine
  return engine.run(config, workdir)


def _evaluate(config, workdir: str) -> dict:
  from jaxlab import evaluate
  return evaluate.run(config, workdir)


def _pipeline(config, workdir: str) -> dict:
  from jaxlab import pipelines
  return pipelines.get(config.pipeline)(config, workdir)


def _import(config, workdir: str) -> dict:
  from jaxlab.interop import jobs
  return jobs.run_import(config, workdir)


def _export(config, workdir: str) -> dict:
  from jaxlab.interop import jobs
  return jobs.run_export(config, workdir)


# config.job -> the function that runs it. A new job adds a line here and its checks in jaxlab/validate.py
# (`validate.register(job, inputs=..., outputs=..., check=...)`), which run before anything is written.
JOBS = Registry("job", key="config.job")
for _name, _fn in (("train", _train), ("transform", _transform), ("evaluate", _evaluate), ("pipeline", _pipeline),
                   ("import", _import), ("export", _export)):
  JOBS.register(_name, _fn)


def _run_job(config, workdir: str) -> dict:
  return JOBS.get(config.get("job", "train"))(config, workdir)


def _summary_line(result: dict) -> str:
  if "test_accuracy" in result and result["test_accuracy"] is not None:
    return (f"done: test accuracy {result['test_accuracy']:.4f}, params {result.get('params', 0):,}, "
            f"wall time {result.get('wall_s', 0.0):.1f}s, workdir {result.get('workdir')}")
  keys = {k: v for k, v in result.items() if isinstance(v, (int, float, str))}
  return "done: " + ", ".join(f"{k}={v}" for k, v in keys.items())


def _one_line(e: BaseException) -> str:
  msg = str(e).strip()
  return msg.splitlines()[0] if msg else type(e).__name__


def _config_file_error(e: Exception) -> str:
  """One line for a config file that cannot be loaded: missing, not Python, or raising in get_config."""
  cfg = next((a.split("=", 1)[1] for a in sys.argv[1:] if a.startswith("--config=")), "")
  if isinstance(e, SyntaxError):
    where = f"{e.filename or cfg}, line {e.lineno}" if e.lineno else (e.filename or cfg)
    return f"--config={cfg}: not a valid Python config file ({type(e).__name__}: {e.msg} at {where})"
  lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
  if isinstance(e, OSError) or any("No such file" in ln for ln in lines):
    detail = next((ln for ln in lines if "No such file" in ln or "not found" in ln.lower()), lines[-1] if lines else "")
    return f"--config: {lines[0] if lines else type(e).__name__} ({detail})"
  return f"--config={cfg}: {type(e).__name__}: {lines[0] if lines else ''} (while loading the config file)"


# Errors a job raises for bad input or a failed run, printed as one line with exit code 2.
_USER_ERRORS = (ValueError, OSError, FloatingPointError, KeyError)


def _quiet_closed_event_loop(default_hook):
  """A sys.excepthook that drops one known message: when orbax fails to restore a damaged checkpoint, its
  event loop is closed while tensorstore still finishes reads, and each late callback prints 'RuntimeError:
  Event loop is closed' with a traceback (after jaxlab has raised its own error). Everything else is printed."""
  def hook(kind, value, tb):
    if kind is RuntimeError and str(value) == "Event loop is closed":
      logging.debug("late orbax callback after a failed restore: %s", value)
      return
    default_hook(kind, value, tb)
  return hook


def _exit_after_error(e: BaseException) -> None:
  """Exit 2. After orbax failed to read a checkpoint (`CheckpointReadError` anywhere in the chain), without the
  interpreter's teardown: tensorstore callbacks aimed at orbax's closed event loop would print tracebacks then.
  Everything jaxlab opened is closed by then (the train loop's error path) and the output is flushed."""
  from jaxlab import checkpoint
  seen = e
  while seen is not None and not isinstance(seen, checkpoint.CheckpointReadError):
    seen = seen.__cause__ or seen.__context__
  if seen is None:
    sys.exit(2)
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(2)


def _quiet_closed_event_loop_unraisable(default_hook):
  """The same filter for `sys.unraisablehook`, where tensorstore's callbacks report their errors."""
  def hook(unraisable):
    if unraisable.exc_type is RuntimeError and str(unraisable.exc_value) == "Event loop is closed":
      logging.debug("late orbax callback after a failed restore: %s", unraisable.exc_value)
      return
    default_hook(unraisable)
  return hook


def main(argv):
  del argv
  sys.excepthook = _quiet_closed_event_loop(sys.excepthook)
  sys.unraisablehook = _quiet_closed_event_loop_unraisable(sys.unraisablehook)
  logging.set_verbosity(logging.WARNING)  # orbax logs every file it writes at INFO
  workdir = _WORKDIR.value
  try:  # config_flags loads the file and applies overrides lazily, on first access
    config = _CONFIG.value
    if config is not None:
      config.get("job")
  except Exception as e:  # noqa: BLE001  (a config file is arbitrary Python: any failure is its error)
    print(f"error: {_config_file_error(e)}", file=sys.stderr)
    sys.exit(2)
  if config is None:
    raise app.UsageError("--config is required (for example ml_collections_configs/digits_vit.py)")
  if not workdir:
    raise app.UsageError("--workdir is required")
  try:  # 1. validate everything that can be, before anything is written
    _validate(config, workdir)
  except _USER_ERRORS as e:
    print(f"error: {_one_line(e)}", file=sys.stderr)
    logging.debug("full error", exc_info=True)
    sys.exit(2)
  snapshot = _Snapshot(workdir)
  attempt = None
  try:  # 2. record this attempt, 3. run
    attempt = record_run(config, workdir, sys.argv)
    result = _execute(config, workdir)
  except _USER_ERRORS as e:
    _finish_attempt(attempt, "error", _one_line(e))
    snapshot.restore_after_failure()
    print(f"error: {_one_line(e)}", file=sys.stderr)
    logging.debug("full error", exc_info=True)
    _exit_after_error(e)
  except KeyboardInterrupt:
    _finish_attempt(attempt, "interrupted")
    print(f"interrupted: start the same command again to resume from the last checkpoint in {workdir}",
          file=sys.stderr)
    sys.exit(130)
  _finish_attempt(attempt, "done", _summary_line(result))
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
  except Exception as e:
    if not _raised_by_config_file(e):
      raise  # a bad --config.x override: entry() reports it
    print(f"error: {_config_file_error(e)}", file=sys.stderr)
    sys.exit(2)


def _raised_by_config_file(e: BaseException) -> bool:
  """Whether `e` comes from the --config file itself (it is not valid Python, or it raises while loading)."""
  import traceback
  cfg = next((a.split("=", 1)[1] for a in sys.argv[1:] if a.startswith("--config=")), "")
  path = os.path.abspath(cfg.split(":", 1)[0]) if cfg else ""
  if not path:
    return False
  if isinstance(e, SyntaxError) and e.filename and os.path.abspath(e.filename) == path:
    return True
  return any(os.path.abspath(f.filename) == path for f in traceback.extract_tb(e.__traceback__))


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
