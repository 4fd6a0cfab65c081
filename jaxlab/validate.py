"""One validation pass over a job's config and inputs, run before anything is written.

`jaxlab.main` calls `job(config, workdir)` first, then records the run, then runs the job. A refusal is a
`ValueError` (or `checkpoint.CheckpointError`) whose first line names the config key, flag or file and says
what to do; main prints it as one `error:` line and exits 2 with the workdir and every input untouched.

The pass is shared by every job:
  1. numbers: sizes, step counts, rates and ratios anywhere in the config (`numbers`), named by key;
  2. paths: every input the job reads exists, and the workdir (and any other output) is not an input, nor
     inside one (`check_paths`), so a job never writes into a directory it reads;
  3. the job's own check, registered with `register(job, inputs=..., outputs=..., check=...)`: for a train
     job the data set, the step count, the batch against the data and the devices, and whether a workdir
     that already holds checkpoints can be resumed with this config (parameter and optimizer-state shapes
     read from the checkpoint's metadata; no weights are read).

`train.train_and_evaluate` runs `train_run` at its start too, so pipeline stages (sub-workdirs trained
through the library) pass the same checks before their sub-workdir is created.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Sequence
from typing import Any

from jaxlab import configs
from jaxlab.registry import Registry

# ----------------------------------------------------------------------------
# Numbers, by key name (so nested sections of pipelines are covered too)
# ----------------------------------------------------------------------------

_UNIT_MODEL_KEYS = ("width", "depth", "num_heads", "mlp_dim", "patch_size", "d_model", "d_state", "n_layers",
                    "stem_width")


def _rule(key: str) -> tuple[Callable[[float], bool], str] | None:
  """(predicate, what it must be) for a numeric config key, by its last name; None for keys without a rule."""
  if key.endswith("batch_size") or key == "throughput_batch" or key in ("num_ingredients", "num_templates"):
    return (lambda v: v >= 1 and float(v).is_integer()), "a positive whole number"
  if key == "log_every":
    return (lambda v: v >= 1), "at least 1"
  if key.endswith("_every") or key.endswith("steps") or key.endswith("epochs") or key == "warmup":
    return (lambda v: v >= 0), "zero or positive"
  if key == "lr" or key.endswith("_lr") or key in ("weight_decay", "grad_clip", "aug_noise", "aug_shift"):
    return (lambda v: v >= 0), "zero or positive"
  if key.endswith("dropout") or key in ("drop_path", "label_smoothing", "b1", "b2", "momentum"):
    return (lambda v: 0 <= v < 1), "in [0, 1)"
  if key == "min_lr_ratio":
    return (lambda v: 0 <= v <= 1), "in [0, 1]"
  if key in ("temperature", "widen_factor"):
    return (lambda v: v > 0), "positive"
  if key == "keep_checkpoints":
    return (lambda v: v >= 1), "at least 1 (the last checkpoint is what a restart resumes from)"
  if key == "num_devices":
    import jax
    n = jax.device_count()
    return (lambda v: 0 <= v <= n and float(v).is_integer()), f"0 (all) or a device count up to the {n} devices here"
  return None


def numbers(config, prefix: str = "config") -> None:
  """Checks every numeric leaf of `config` that has a rule (sizes >= 1, steps >= 0, rates, ratios).

  Raises:
    ValueError: `config.<key>=<value>: must be ...` for the first bad value.
  """
  for key, value in _items(config):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
      continue
    name = f"{prefix}.{key}"
    if not math.isfinite(value):
      raise ValueError(f"{name}={value}: must be a finite number")
    parts = key.split(".")
    if "model" in parts[:-1] and parts[-1] in _UNIT_MODEL_KEYS:  # architecture sizes (an import's 0 = inferred)
      rule = (lambda v: v >= 1 and float(v).is_integer()), "a positive whole number"
    else:
      rule = _rule(parts[-1])
    if rule is not None and not rule[0](value):
      raise ValueError(f"{name}={value}: must be {rule[1]}")


def _items(config, prefix: str = ""):
  """(dotted key, value) of every leaf of a ConfigDict / dict."""
  for key, value in config.items():
    if hasattr(value, "items"):
      yield from _items(value, f"{prefix}{key}.")
    else:
      yield f"{prefix}{key}", value


def _get(config, dotted: str, default=None):
  node = config
  for part in dotted.split("."):
    if not hasattr(node, "get"):
      return default
    node = node.get(part, None)
    if node is None:
      return default
  return node


# ----------------------------------------------------------------------------
# Paths: inputs exist, outputs are not inputs
# ----------------------------------------------------------------------------


def _owner(path: str) -> str:
  """The directory an input occupies: a workdir for a workdir or its `checkpoints` folder, else the path."""
  from jaxlab import checkpoint
  p = os.path.abspath(os.path.expanduser(path))
  if os.path.basename(p.rstrip("/")) == checkpoint.CKPT_SUBDIR:
    return os.path.dirname(p.rstrip("/"))
  return p


def _inside(path: str, directory: str) -> bool:
  path, directory = os.path.realpath(path), os.path.realpath(directory)
  return path == directory or os.path.commonpath([path, directory]) == directory


def check_exist(inputs: Sequence[tuple[str, str]]) -> None:
  """Every input file or directory exists. Raises FileNotFoundError naming the key and the path."""
  for key, path in inputs:
    if not os.path.exists(os.path.expanduser(path)):
      raise FileNotFoundError(f"{key}={path}: no such file or directory; check the path")


def check_checkpoints(inputs: Sequence[tuple[str, str]]) -> None:
  """Every input holds a jaxlab checkpoint. Raises CheckpointError naming the key and the path."""
  from jaxlab import checkpoint
  for key, path in inputs:
    try:
      checkpoint.resolve(path)
    except checkpoint.CheckpointError as e:
      raise checkpoint.CheckpointError(f"{key}={e}") from None


def check_paths(workdir: str, inputs: Sequence[tuple[str, str]], outputs: Sequence[tuple[str, str]] = ()) -> None:
  """The workdir and the other outputs are neither an input nor inside one (inputs are only read).

  Args:
    workdir: the job's `--workdir`.
    inputs: (config key, path) of everything the job reads.
    outputs: (config key, path) of what the job writes besides the workdir.

  Raises:
    ValueError: naming the key (or `--workdir`) and the path.
  """
  for out_key, out in [("--workdir", workdir), *outputs]:
    for key, path in inputs:
      if _inside(out, _owner(path)):
        where = "is" if os.path.realpath(out) == os.path.realpath(_owner(path)) else "is inside"
        raise ValueError(f"{out_key}={out} {where} the input {key}={path}; write the output somewhere else "
                         "(inputs are only read, never written)")
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise ValueError(f"--workdir={workdir} is a file, not a directory; choose a directory")


def check_writable(workdir: str) -> None:
  """The workdir, or the nearest directory above it that exists, can be written (checked without writing)."""
  probe = os.path.abspath(workdir)
  while not os.path.exists(probe):
    probe = os.path.dirname(probe)
  if not os.path.isdir(probe) or not os.access(probe, os.W_OK | os.X_OK):
    raise PermissionError(f"--workdir={workdir} is not writable ({probe} cannot be written); "
                          "choose another directory")


# ----------------------------------------------------------------------------
# Per-job checks
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class JobCheck:
  """What the shared pass needs to know about a job.

  inputs: `fn(config) -> [(key, path), ...]`, everything the job reads (never written).
  outputs: `fn(config) -> [(key, path), ...]`, what it writes besides the workdir.
  check: `fn(config, workdir)`, the job's own checks; raises ValueError naming the key.
  """
  inputs: Callable[[Any], list[tuple[str, str]]] = lambda config: []
  outputs: Callable[[Any], list[tuple[str, str]]] = lambda config: []
  check: Callable[[Any, str], Any] | None = None


JOB_CHECKS = Registry("job", key="config.job")  # the checks of each job, registered at the end of this module


def register(job_name: str, *, inputs=None, outputs=None, check=None) -> None:
  """Registers the validation of `config.job = job_name` (see `JobCheck`)."""
  JOB_CHECKS.register(job_name, JobCheck(inputs=inputs or (lambda config: []), outputs=outputs or (lambda config: []),
                                         check=check))


def job(config, workdir: str) -> None:
  """The whole pass for `config.job` before anything is written. Raises a one-line error naming the key."""
  spec = JOB_CHECKS.get(config.get("job", "train"))
  numbers(config)
  check_paths(workdir, spec.inputs(config), spec.outputs(config))
  check_writable(workdir)
  if spec.check is not None:
    spec.check(config, workdir)


def _paths(config, keys: Sequence[str]) -> list[tuple[str, str]]:
  """(config.key, path) for each of `keys` that is set (a comma-separated string gives several)."""
  out = []
  for key in keys:
    value = _get(config, key)
    if not value:
      continue
    out += [(f"config.{key}", p) for p in configs.as_paths(value if isinstance(value, (tuple, list)) else str(value))]
  return out


_TRAIN_INPUTS = ("init_from.path", "objective.teacher")


@dataclasses.dataclass
class TrainPlan:
  """What the train checks found: the data set, the step count and the step a resume starts from."""
  dataset: Any
  total_steps: int
  resume_step: int | None


def train_run(config, workdir: str) -> TrainPlan:
  """Checks a training config against its data, devices, inputs and the workdir's checkpoints.

  Raises:
    ValueError / CheckpointError: naming the key (data.batch_size, total_steps, init_from.path, ...) or the
      workdir whose checkpoint this config cannot resume.
  """
  import jax

  from jaxlab import data
  numbers(config)
  check_paths(workdir, _paths(config, _TRAIN_INPUTS))
  check_checkpoints(_paths(config, _TRAIN_INPUTS))
  meta_for = getattr(data, "checkpoint_meta_for", None)  # an imported model's preprocessing, where supported
  dataset = data.get_dataset(config.data, meta_for(config)) if meta_for else data.get_dataset(config.data)
  n_train = dataset.num_examples("train")
  bs = int(config.data.batch_size)
  if bs > n_train:
    raise ValueError(f"config.data.batch_size={bs} exceeds the {n_train} training examples of {dataset.name!r}; "
                     "lower it")
  n_dev = int(_get(config, "sharding.num_devices", 0) or 0) or jax.device_count()
  if bs % n_dev or bs % jax.process_count():
    raise ValueError(f"config.data.batch_size={bs} must be divisible by the {n_dev} devices")
  for key in ("eval_splits", "final_eval_splits"):
    for split in tuple(config.get(key, ())):
      if split not in dataset.splits:
        raise ValueError(f"config.{key}: data set {dataset.name!r} has no split {split!r}; "
                         f"splits: {sorted(dataset.splits)}")
  total = resolve_steps(config, n_train)
  return TrainPlan(dataset=dataset, total_steps=total, resume_step=_check_resume(config, workdir, dataset, total))


def resolve_steps(config, num_train: int) -> int:
  """Total steps from `total_steps` or `total_epochs` (exactly one must be set)."""
  steps, epochs = int(config.get("total_steps", 0) or 0), float(config.get("total_epochs", 0) or 0)
  if steps and epochs:
    raise ValueError("config: set only one of total_steps and total_epochs (the other to 0)")
  if epochs:
    return max(1, math.ceil(epochs * num_train / config.data.batch_size))
  if steps <= 0:
    raise ValueError("config.total_steps: must be positive (or set config.total_epochs)")
  return steps


def _check_resume(config, workdir: str, dataset, total: int) -> int | None:
  """The step a restart resumes from, after checking that this config's train state fits that checkpoint.

  Shapes are compared from the checkpoint's metadata (no weights are read), so a resume that cannot work is
  refused before the workdir is touched.
  """
  import jax

  from jaxlab import build, checkpoint, optim, trees
  cdir = os.path.join(os.path.abspath(workdir), checkpoint.CKPT_SUBDIR)
  steps = checkpoint.steps(cdir)
  if not steps:
    return None
  step = steps[-1]
  hint = f"use a fresh --workdir, or the config that wrote {workdir}"
  if step > total:
    raise ValueError(f"--workdir={workdir} holds a checkpoint at step {step}, beyond the {total} steps of this "
                     f"config (config.total_steps / total_epochs); {hint}")
  try:
    module = build.model(config.model, dataset.num_classes)
    variables = build.abstract_variables(module, dataset.input_shape, dataset.input_dtype)
    params = variables.pop("params")
    param = build.parameterization(config.get("parameterization"), config.model)
    theta = jax.eval_shape(lambda p: param.init(jax.random.key(0), p), params)
    tx, _ = optim.build(config.optimizer, theta, total)
    opt_state = jax.eval_shape(tx.init, theta)
  except (ValueError, KeyError, TypeError) as e:
    raise ValueError(f"config.model: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from e
  stored_weights, stored_opt = checkpoint.stored_shapes(cdir, step)
  ours = {"theta": theta, **({"model_state": variables} if variables else {})}
  d = trees.diff(ours, stored_weights, check_dtype=False)
  if d:
    raise checkpoint.CheckpointError(trees.mismatch_message(
        f"--workdir={workdir}: this config cannot resume its checkpoint at step {step} (config vs checkpoint)", d,
        hint))
  if stored_opt is None:
    raise checkpoint.CheckpointError(f"--workdir={workdir}: its checkpoint at step {step} has no optimizer state "
                                     "(a transform output?); train from it with config.init_from.path and a "
                                     "fresh --workdir")
  want = [tuple(x.shape) for x in jax.tree.leaves(opt_state)]
  have = [tuple(x.shape) for x in jax.tree.leaves(stored_opt)]
  if want != have or checkpoint.structure_difference(opt_state, stored_opt):
    raise checkpoint.CheckpointError(
        f"--workdir={workdir}: the optimizer state of its checkpoint at step {step} ({len(have)} arrays) does not "
        f"fit config.optimizer ({len(want)} arrays; name, grad_clip, weight_decay, momentum, frozen and lr_rules "
        f"shape it); {hint}")
  return step


# ----------------------------------------------------------------------------
# The built-in jobs
# ----------------------------------------------------------------------------


def _evaluate_check(config, workdir: str) -> None:
  from jaxlab import checkpoint, data
  if not config.get("checkpoint"):
    raise ValueError("config.checkpoint: give the checkpoint (workdir) to evaluate")
  check_checkpoints([("config.checkpoint", config.checkpoint)])
  meta = checkpoint.load_meta(config.checkpoint)
  data_cfg = dict(meta["data"]["config"], **({"name": config.data_name} if config.get("data_name") else {}))
  dataset = data.get_dataset(data_cfg)
  for split in tuple(config.get("splits", ())):
    if split not in dataset.splits:
      raise ValueError(f"config.splits: data set {dataset.name!r} has no split {split!r}; "
                       f"splits: {sorted(dataset.splits)}")


def _transform_inputs(config) -> list[tuple[str, str]]:
  from jaxlab.transforms import engine
  return [("config.inputs", p) for p in engine.split_paths(config.get("inputs"))]


def _transform_check(config, workdir: str) -> None:
  from jaxlab import build
  from jaxlab.transforms import engine, registry
  t = registry.get(config.get("transform", ""))
  paths = engine.split_paths(config.get("inputs"))
  t.validate(build.to_dict(config.get("args")), len(paths))
  check_checkpoints([("config.inputs", p) for p in paths])
  engine.check_output_dir(workdir, paths)


register("train", inputs=lambda c: _paths(c, _TRAIN_INPUTS), check=train_run)
register("evaluate", inputs=lambda c: _paths(c, ("checkpoint",)), check=_evaluate_check)
register("transform", inputs=_transform_inputs, check=_transform_check)
register("pipeline", inputs=lambda c: _paths(c, _TRAIN_INPUTS))  # name checked by main (pipelines import train)
register("import", inputs=lambda c: _paths(c, ("source",)), check=lambda c, w: check_exist(_paths(c, ("source",))))
register("export", inputs=lambda c: _paths(c, ("checkpoint",)), outputs=lambda c: _paths(c, ("out",)),
         check=lambda c, w: check_checkpoints(_paths(c, ("checkpoint",))))
