"""The one training loop: resume is bitwise, rules work, bad input is refused."""

import json
import os
import shutil

import jax
import numpy as np
import pytest
from conftest import tiny_config

from jaxlab import checkpoint, train, trees


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
  wd = str(tmp_path_factory.mktemp("full"))
  cfg = tiny_config(steps=6, checkpoint_every=3, keep_checkpoints=5)
  summary = train.train_and_evaluate(cfg, wd)
  return cfg, wd, summary


def test_summary_and_files(full_run):
  _, wd, summary = full_run
  assert summary["steps"] == 6
  assert 0.0 <= summary["test_accuracy"] <= 1.0
  assert summary["metrics"]["test"]["count"] == 360
  rows = [json.loads(line) for line in open(os.path.join(wd, "metrics.jsonl"))]
  assert [r["step"] for r in rows if "train/loss" in r] == [2, 4, 6]
  assert any("test/accuracy" in r for r in rows)
  assert os.listdir(os.path.join(wd, "tensorboard"))
  assert checkpoint.Manager(wd).all_steps() == [3, 6]


def test_resume_is_bitwise(full_run, tmp_path):
  cfg, wd, _ = full_run
  # Simulate a crash after the step-3 checkpoint: copy the run and drop the last checkpoint.
  crashed = str(tmp_path / "crashed")
  shutil.copytree(wd, crashed)
  shutil.rmtree(os.path.join(crashed, "checkpoints", "6"))
  os.remove(os.path.join(crashed, "summary.json"))
  train.train_and_evaluate(cfg, crashed)
  a, b = checkpoint.load(wd), checkpoint.load(crashed)
  assert a.step == b.step == 6
  for name, x in trees.flatten(a.theta).items():
    np.testing.assert_array_equal(np.asarray(x), np.asarray(trees.flatten(b.theta)[name]), err_msg=name)


def test_checkpoint_loads_from_meta_alone_and_evaluates(full_run):
  _, wd, summary = full_run
  loaded = checkpoint.load(wd)
  assert loaded.meta["model"]["name"] == "vit" and loaded.meta["data"]["name"] == "digits"
  assert loaded.meta["step"] == 6 and "test/accuracy" in loaded.meta["metrics"]
  m = train.evaluate_checkpoint(wd, "test")
  assert m["accuracy"] == pytest.approx(summary["test_accuracy"], abs=1e-6)
  assert m["loss"] == pytest.approx(summary["metrics"]["test"]["loss"], rel=1e-5)  # the final state was evaluated
  assert m["count"] == 360


def test_frozen_and_lr_rules(tmp_path):
  cfg = tiny_config(steps=2)
  cfg.optimizer.frozen = (r"patch_embed/.*",)
  cfg.optimizer.lr_rules = ((r"head/.*", 0.0),)
  init_cfg = tiny_config(steps=2)
  init_cfg.optimizer.lr = 0.0
  wd0, wd1 = str(tmp_path / "zero"), str(tmp_path / "rules")
  train.train_and_evaluate(init_cfg, wd0)  # lr 0: the initial params
  train.train_and_evaluate(cfg, wd1)
  p0, p1 = trees.flatten(checkpoint.load(wd0).theta), trees.flatten(checkpoint.load(wd1).theta)
  for name in p0:
    same = np.array_equal(np.asarray(p0[name]), np.asarray(p1[name]))
    if name.startswith(("patch_embed", "head")):
      assert same, name
  assert not np.array_equal(np.asarray(p0["blocks/mlp/fc1/kernel"]), np.asarray(p1["blocks/mlp/fc1/kernel"]))


def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
  cfg = tiny_config(steps=6, checkpoint_every=2)
  cfg.optimizer.lr = 1e30
  cfg.optimizer.grad_clip = 0.0
  cfg.optimizer.warmup_steps = 0
  cfg.optimizer.schedule = "constant"
  cfg.log_every = 1
  with pytest.raises(train.NonFiniteError, match="last good checkpoint"):
    train.train_and_evaluate(cfg, str(tmp_path))
  for step in checkpoint.Manager(str(tmp_path)).all_steps():
    theta = checkpoint.load(str(tmp_path), step).theta
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(theta))


def test_init_from_copies_weights_and_dont_load(full_run, tmp_path):
  _, wd, _ = full_run
  cfg = tiny_config(steps=1)
  cfg.optimizer.lr = 0.0
  cfg.init_from.path = wd
  cfg.init_from.dont_load = (r"head/.*",)
  out = str(tmp_path / "ft")
  train.train_and_evaluate(cfg, out)
  src, dst = trees.flatten(checkpoint.load(wd).theta), trees.flatten(checkpoint.load(out).theta)
  np.testing.assert_array_equal(np.asarray(src["blocks/attn/qkv/kernel"]), np.asarray(dst["blocks/attn/qkv/kernel"]))
  assert not np.array_equal(np.asarray(src["head/kernel"]), np.asarray(dst["head/kernel"]))


def test_init_from_incompatible_model_is_refused(full_run, tmp_path):
  _, wd, _ = full_run
  cfg = tiny_config(steps=1)
  cfg.model.width = 24
  cfg.init_from.path = wd
  with pytest.raises(checkpoint.CheckpointError, match="config.init_from.path=.*shape of"):
    train.train_and_evaluate(cfg, str(tmp_path / "bad"))


def test_epochs_resolve_to_steps():
  cfg = tiny_config(steps=0)
  cfg.total_epochs = 2.0
  assert train.resolve_steps(cfg, 1077) == int(np.ceil(2 * 1077 / 32))
  cfg.total_steps = 5
  with pytest.raises(ValueError, match="only one of total_steps and total_epochs"):
    train.resolve_steps(cfg, 1077)


def test_init_and_eval_programs_are_shared_per_architecture():
  import jax

  from jaxlab import build, objectives, train
  from jaxlab.models import vit
  make = lambda **kw: vit.ViT(10, width=16, depth=1, num_heads=2, mlp_dim=16, **kw)  # noqa: E731
  ev = objectives.get_eval({})
  assert train.jit_eval_step(make(), ev) is train.jit_eval_step(make(), ev)  # equal modules: one program
  assert train.jit_eval_step(make(), ev) is not train.jit_eval_step(make(pool="cls"), ev)
  a = build.init_variables(make(), jax.random.key(0), (8, 8, 1))
  b = build.init_variables(make(), jax.random.key(0), (8, 8, 1))
  assert "intermediates" not in a and jax.tree.all(jax.tree.map(lambda x, y: bool((x == y).all()), a, b))
  shapes = build.abstract_variables(make(), (8, 8, 1))
  assert jax.tree.map(lambda x: x.shape, shapes) == jax.tree.map(lambda x: x.shape, a)
  calls = []
  cached = build.per_architecture(lambda *args: calls.append(args) or len(calls))
  assert cached(1, (2,)) == cached(1, (2,)) == 1 and cached([1], 2) == 2 and cached([1], 2) == 3  # lists: no cache
