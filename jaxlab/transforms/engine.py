"""Offline transform jobs: validate, load inputs, transform, write a new checkpoint."""

from __future__ import annotations

import os

import jax

from jaxlab import build, checkpoint
from jaxlab.transforms import registry


def run(config, workdir: str) -> dict:
  """Runs `config.transform` over `config.inputs` and writes the result to `workdir`.

  The arguments are validated before any checkpoint is loaded; the output
  workdir must not be one of the inputs nor already hold a checkpoint; the
  inputs are only read.
  """
  t = registry.get(config.transform)
  inputs = [str(p) for p in (config.inputs or ())]
  args = t.validate(build.to_dict(config.get("args")), len(inputs))
  if not inputs:
    raise ValueError("config.inputs: give at least one checkpoint directory")
  out_abs = os.path.abspath(workdir)
  for p in inputs:
    if os.path.abspath(p) in (out_abs, os.path.join(out_abs, checkpoint.CKPT_SUBDIR)):
      raise ValueError(f"--workdir={workdir} is one of the inputs; write the output somewhere else")
    checkpoint.resolve(p)  # clear error for a missing checkpoint before loading anything
  if os.path.isdir(os.path.join(out_abs, checkpoint.CKPT_SUBDIR)) and os.listdir(
      os.path.join(out_abs, checkpoint.CKPT_SUBDIR)):
    raise ValueError(f"--workdir={workdir} already holds a checkpoint; choose an empty output directory")
  loaded = [checkpoint.load(p) for p in inputs]
  out = t.fn(loaded, **args)
  meta = dict(loaded[0].meta)
  meta.update(out.meta)
  meta["step"] = 0
  meta["metrics"] = {}
  meta["provenance"] = {
      "transform": t.name,
      "args": {k: (list(v) if isinstance(v, tuple) else v) for k, v in args.items()},
      "inputs": [{"path": os.path.abspath(ld.path), "step": ld.step,
                  "hash": checkpoint.content_hash(ld.theta)} for ld in loaded],
      "code": checkpoint.code_version(),
      "report": out.report,
  }
  meta["versions"] = checkpoint.versions()
  theta = jax.device_get(out.theta)
  checkpoint.save_weights(workdir, 0, theta, meta, jax.device_get(out.model_state))
  return {"workdir": out_abs, "transform": t.name, "report": out.report}
