"""Devices: 1 vs 8 fake CPU devices give the same losses; two processes agree with one."""

import json
import os
import socket
import subprocess
import sys

import numpy as np
from conftest import ROOT, TEST_XLA_FLAGS, run_python

TRAIN_SNIPPET = """
import json, sys
sys.path.insert(0, 'tests')
import jax
from conftest import tiny_config
from jaxlab import train
cfg = tiny_config(steps=4)
cfg.log_every = 1
cfg.sharding.fsdp = {fsdp}
s = train.train_and_evaluate(cfg, {wd!r})
print('RESULT', json.dumps({{'devices': jax.device_count(), 'test': s['test_accuracy']}}))
"""


def _losses(wd):
  rows = [json.loads(x) for x in open(os.path.join(wd, "metrics.jsonl"))]
  return np.array([r["train/loss"] for r in rows if "train/loss" in r])


def _result(proc):
  assert proc.returncode == 0, proc.stderr[-3000:]
  line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT"))
  return json.loads(line[len("RESULT"):])


def test_one_vs_eight_devices_same_losses(tmp_path):
  wd1, wd8 = str(tmp_path / "d1"), str(tmp_path / "d8")
  r1 = _result(run_python(TRAIN_SNIPPET.format(wd=wd1, fsdp="()")))
  r8 = _result(run_python(TRAIN_SNIPPET.format(wd=wd8, fsdp="((r'.*kernel', -1),)"),
                          {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}))
  assert r1["devices"] == 1 and r8["devices"] == 8
  np.testing.assert_allclose(_losses(wd1), _losses(wd8), rtol=2e-5, atol=2e-6)
  assert abs(r1["test"] - r8["test"]) <= 1 / 360 + 1e-9


WORKER = """
import json, sys
sys.path.insert(0, 'tests')
import jax
jax.config.update('jax_cpu_collectives_implementation', 'gloo')
jax.distributed.initialize(coordinator_address='localhost:{port}', num_processes=2, process_id={pid})
from conftest import tiny_config
from jaxlab import train
cfg = tiny_config(steps=4)
cfg.log_every = 1
s = train.train_and_evaluate(cfg, {wd!r})
print('RESULT', json.dumps({{'processes': jax.process_count(), 'test': s['test_accuracy']}}))
"""


def test_two_processes_agree_with_one(tmp_path):
  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  wd_multi, wd_single = str(tmp_path / "multi"), str(tmp_path / "single")
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env["XLA_FLAGS"] = TEST_XLA_FLAGS  # one device per process, the suite's compile flags
  procs = [subprocess.Popen([sys.executable, "-c", WORKER.format(port=port, pid=i, wd=wd_multi)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
  outs = [p.communicate(timeout=600) for p in procs]
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  results = [json.loads(next(x for x in out.splitlines() if x.startswith("RESULT"))[6:]) for out, _ in outs]
  assert all(r["processes"] == 2 for r in results)
  single = _result(run_python(TRAIN_SNIPPET.format(wd=wd_single, fsdp="()")))
  np.testing.assert_allclose(_losses(wd_multi), _losses(wd_single), rtol=2e-5, atol=2e-6)
  assert abs(results[0]["test"] - single["test"]) <= 1 / 360 + 1e-9
