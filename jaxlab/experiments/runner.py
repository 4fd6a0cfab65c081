"""Stages of a method's experiment, declared over one base config, run with one done-marker rule.

A pipeline builds an `Experiment(config, workdir, section)` and runs stages:

  TrainStage(name, overrides)                       trains `derive(base, **overrides)` in `<workdir>/<name>`
  TransformStage(name, transform, inputs, args)     runs a checkpoint transform into `<workdir>/<name>`

`name` is a path under the workdir ('teacher', 'r2/seed0/svd_ft'). Every stage writes `overrides.json` (what it
was asked to do: the dotted overrides of a train stage; transform, inputs and args of a transform stage) when it
starts and `stage.json` (that record plus the stage's summary) when it ends. A stage whose `stage.json` exists is
done: re-running the pipeline returns its recorded summary without running it, so an interrupted experiment
resumes stage by stage (an unfinished train stage resumes from its last checkpoint). A done stage asked to do
something else (other overrides) is refused with one line naming the stage and the key.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections

DONE_FILE = "stage.json"          # the one done-marker of both stage kinds
REQUEST_FILE = "overrides.json"   # what the stage was asked to do, written when it starts


@dataclasses.dataclass(frozen=True)
class TrainStage:
  """Trains the experiment's base config with `overrides` (dotted keys, e.g. {'optimizer.lr': 1e-3})."""
  name: str
  overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class TransformStage:
  """Runs the registered checkpoint transform `transform` over `inputs` (checkpoint workdirs) with `args`."""
  name: str
  transform: str
  inputs: Sequence[str]
  args: Mapping[str, Any] = dataclasses.field(default_factory=dict)


def _json_default(x):
  if isinstance(x, ml_collections.ConfigDict):
    return x.to_dict()
  if hasattr(x, "tolist"):  # numpy / jax scalars and arrays
    return x.tolist()
  raise TypeError(f"{type(x).__name__} is not JSON serializable")


def jsonable(x):
  """`x` as JSON gives it back: ConfigDicts as dicts, tuples as lists, numpy/jax values as numbers and lists."""
  return json.loads(json.dumps(x, default=_json_default))


def derive(config, overrides: Mapping[str, Any] | None = None, /, **more) -> ml_collections.ConfigDict:
  """An unlocked copy of `config` with dotted-key overrides applied.

  `derive(c, **{'optimizer.lr': 1e-3, 'model': {...}})` or `derive(c, {'optimizer.lr': 1e-3})`. Every key must
  already exist in `config` (a typo is refused, never silently added); a dict value replaces that whole section
  (e.g. a new `model` or `parameterization`).

  Raises:
    ValueError: a key that `config` does not have, or a value of the wrong type, naming the key.
  """
  out = ml_collections.ConfigDict(config.to_dict())
  for key, value in {**(overrides or {}), **more}.items():
    node, parts = out, key.split(".")
    for i, part in enumerate(parts):
      if not isinstance(node, ml_collections.ConfigDict) or part not in node:
        where = ".".join(parts[:i]) or "the config"
        raise ValueError(f"stage override {key!r}: {where} has no key {part!r}; overrides may only change keys "
                         "the config declares (declare it in the config file)")
      if i < len(parts) - 1:
        node = node[part]
    if isinstance(value, (Mapping, ml_collections.ConfigDict)):  # a copy: a stage never shares the caller's dicts
      plain = value.to_dict() if isinstance(value, ml_collections.ConfigDict) else dict(value)
      value = ml_collections.ConfigDict(copy.deepcopy(plain))
    try:
      if isinstance(value, ml_collections.ConfigDict) or isinstance(node[parts[-1]], ml_collections.ConfigDict):
        del node[parts[-1]]  # a section is replaced as a whole
      node[parts[-1]] = value
    except TypeError as e:
      raise ValueError(f"stage override {key}={value!r}: {e}") from e
  return out


def dotted(section, prefix: str = "") -> dict[str, Any]:
  """A nested config section as dotted-key overrides: {'optimizer': {'lr': 0.1}} -> {'optimizer.lr': 0.1}; how a
  config file declares a stage's fixed settings (ConfigDict keys cannot hold dots)."""
  out = {}
  for k, v in (section.items() if hasattr(section, "items") else ()):
    if isinstance(v, (Mapping, ml_collections.ConfigDict)):
      out.update(dotted(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def _read(path: str) -> dict | None:
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def _write(path: str, obj) -> None:
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2)
  os.replace(tmp, path)  # a marker is never half-written


class Experiment:
  """One method's experiment in `workdir`: the base config its stages derive from, and the stages run so far.

  Attributes:
    config: an unlocked copy of the pipeline config.
    section: `config.<section>`, the method's own keys (e.g. `config.pela`).
    base: what train stages derive from: `config` with `job='train'`, without `pipeline` and the section.
    workdir: the experiment's directory.
    stages: one record per stage run or skipped, in order: {name, kind, request, skipped, wall_s}.
  """

  def __init__(self, config, workdir: str, section: str, config_file: str | None = None,
               lists: Mapping[str, type] | None = None):
    """Args: the pipeline `config`, its `workdir`, the method's config `section`, its config file name (for
    the `Command:` line, e.g. 'pela.py'; default '<section>.py') and `lists`: the section's list keys and their
    item type, normalised in `section` to tuples by `normalize` (e.g. {'seeds': int, 'aux.stages': int})."""
    if section not in config:
      raise ValueError(f"config.{section}: missing; the pipeline's keys live under config.{section}")
    self.config = ml_collections.ConfigDict(config.to_dict())
    self.section = self.config[section]
    self.section_name = section
    self.config_file = config_file or f"{section}.py"
    self.base = ml_collections.ConfigDict(self.config.to_dict())
    self.base.job = "train"
    for key in ("pipeline", section):
      if key in self.base:
        del self.base[key]
    self.workdir = workdir
    self.stages: list[dict] = []
    self.t0 = time.time()
    self.normalize(lists or {})
    os.makedirs(workdir, exist_ok=True)

  def normalize(self, lists: Mapping[str, type]) -> None:
    """Turns each list key of the section (dotted, e.g. 'aux.stages') into a tuple of its item type, however it
    was given: a tuple or list, or a command-line string ('0,1,2', '(0,1,2)').

    Raises:
      ValueError: a key the section does not have, or an item that is not of the type, naming
        `config.<section>.<key>`.
    """
    from jaxlab import configs
    for key, kind in lists.items():
      node, parts = self.section, key.split(".")
      where = f"config.{self.section_name}.{key}"
      for part in parts[:-1]:
        node = node.get(part) if isinstance(node, ml_collections.ConfigDict) else None
      if not isinstance(node, ml_collections.ConfigDict) or parts[-1] not in node:
        raise ValueError(f"{where}: missing; declare it in ml_collections_configs/{self.config_file}")
      value = node[parts[-1]]
      if isinstance(value, str):
        value = value.strip().strip("()[]")
      try:
        items = configs.as_tuple(() if value is None else value, kind)
      except (TypeError, ValueError) as e:
        raise ValueError(f"{where}={value!r}: every item must be {kind.__name__} ({e})") from e
      del node[parts[-1]]  # a list field would refuse a tuple of another type
      node[parts[-1]] = items

  def path(self, name: str) -> str:
    """The absolute workdir of stage `name`."""
    return os.path.abspath(os.path.join(self.workdir, name))

  def derive(self, **overrides) -> ml_collections.ConfigDict:
    """`derive(self.base, **overrides)`."""
    return derive(self.base, **overrides)

  def run(self, stage: TrainStage | TransformStage) -> dict:
    """Runs `stage` unless its `stage.json` exists; returns its summary (recorded or fresh).

    Train stages return `train.train_and_evaluate`'s summary; transform stages `{'workdir', 'transform',
    'report', 'inputs'}`.

    Raises:
      ValueError: a bad override (from `derive`), or a done stage asked to do something else.
    """
    sub = self.path(stage.name)
    if isinstance(stage, TrainStage):
      request = {"kind": "train", "overrides": jsonable(dict(stage.overrides))}
      config = derive(self.base, dict(stage.overrides))  # refused before anything is written
    elif isinstance(stage, TransformStage):
      request = {"kind": "transform", "transform": stage.transform,
                 "inputs": [os.path.abspath(p) for p in stage.inputs], "args": jsonable(dict(stage.args))}
    else:
      raise TypeError(f"Experiment.run: {type(stage).__name__} is not a TrainStage or TransformStage")
    t0 = time.time()
    done = _read(os.path.join(sub, DONE_FILE))
    if done is not None:
      _check_same(stage.name, _portable(done["request"], done.get("root")), _portable(request, self.workdir))
      self.stages.append({"name": stage.name, "request": request, "skipped": True, "wall_s": 0.0})
      return done["summary"]
    os.makedirs(sub, exist_ok=True)
    _write(os.path.join(sub, REQUEST_FILE), request)
    if isinstance(stage, TrainStage):
      from jaxlab import train
      summary = train.train_and_evaluate(config, sub)
    else:
      summary = _transform(sub, request)
    summary = jsonable(summary)
    _write(os.path.join(sub, DONE_FILE), {"request": request, "summary": summary,
                                          "root": os.path.abspath(self.workdir)})
    self.stages.append({"name": stage.name, "request": request, "skipped": False, "wall_s": time.time() - t0})
    return summary

  def accuracy(self, name: str, split: str = "test") -> float:
    """The accuracy on `split` of the experiment's data set (`base.data`) of the checkpoint of stage `name` (or of
    any checkpoint path)."""
    from jaxlab import evaluate
    return float(evaluate.evaluate_checkpoint(self.path(name), split, data_cfg=self.base.data)["accuracy"])

  def predictions(self, name: str, split: str = "test"):
    """Class predictions (argmax of the logits; padding dropped) on `split` of the checkpoint of stage `name` (or
    of any checkpoint path), over the data set the checkpoint was trained on."""
    import numpy as np

    from jaxlab import checkpoint, data
    ld = checkpoint.load(self.path(name))
    ds = data.get_dataset(ld.meta["data"]["config"], ld.meta)
    return np.concatenate([np.argmax(ld.apply(ds.device_preprocess(b)["inputs"]), -1)[np.asarray(b["mask"]) > 0]
                           for b in ds.eval_batches(split, 512)])

  def run_all(self, stages: Sequence[TrainStage | TransformStage]) -> dict[str, dict]:
    """Runs `stages` in order; returns `{name: summary}`."""
    return {s.name: self.run(s) for s in stages}

  def wall_s(self) -> float:
    """Seconds since the experiment object was made (this invocation's wall time)."""
    return time.time() - self.t0


def _transform(sub: str, request: dict) -> dict:
  from jaxlab import checkpoint
  from jaxlab.transforms import engine
  ckpts = os.path.join(sub, checkpoint.CKPT_SUBDIR)
  if os.path.isdir(ckpts) and checkpoint.steps(ckpts):  # written before the marker was: adopt it
    meta = checkpoint.load_meta(sub)
    return {"workdir": sub, "transform": request["transform"], "report": meta["provenance"].get("report", {}),
            "inputs": meta["provenance"].get("inputs", [])}
  cfg = ml_collections.ConfigDict({"job": "transform", "transform": request["transform"],
                                   "inputs": tuple(request["inputs"]), "args": dict(request["args"])})
  return engine.run(cfg, sub)


def _portable(request: dict, root: str | None) -> dict:
  """`request` with paths inside the experiment's workdir `root` written `<workdir>/...`, so that a moved workdir
  still resumes."""
  if not root:
    return request
  text = json.dumps(request).replace(json.dumps(os.path.abspath(root) + os.sep)[1:-1], "<workdir>/")
  return json.loads(text)


def _check_same(name: str, old: dict, new: dict) -> None:
  """Raises when a done stage's recorded request differs from the one now asked for (a stale workdir)."""
  if old == new:
    return
  o, n = old.get("overrides", old), new.get("overrides", new)
  keys = sorted(k for k in set(o) | set(n) if o.get(k) != n.get(k))
  key = keys[0] if keys else "kind"
  raise ValueError(f"stage {name!r} is done with {key}={o.get(key)!r} but is now asked for {key}={n.get(key)!r}; "
                   f"use a new --workdir or delete {name}/{DONE_FILE} to redo it")
