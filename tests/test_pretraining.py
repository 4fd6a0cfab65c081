"""Self-pretraining: masking statistics, loss only on masked positions, head drop, the ntfs pipeline."""

import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from conftest import ROOT

from jaxlab import checkpoint, configs, objectives, train, transforms, trees
from jaxlab.losses import pretraining as pt

CFG = {"mask_rate": 0.1, "mask_id": 16, "pad_id": 0}


def _tokens(b=256, length=200, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.integers(1, 16, size=(b, length)).astype(np.int32)
  lengths = rng.integers(length // 2, length, size=b)
  x[np.arange(length)[None] >= lengths[:, None]] = 0  # right padding with pad id 0
  return jnp.asarray(x)


def test_registered():
  objectives.get_preparer({"prepare": "mask_denoise"})
  for t in ("denoise_ce", "denoise_l1", "causal_ce", "causal_l1"):
    assert t in objectives.active_terms({"weights": {t: 1.0}})
  assert objectives.get_eval({"eval": "per_position"}) is pt.per_position_eval
  assert "drop_pretraining_head" in transforms.names()


@pytest.mark.parametrize("rate", [0.1, 0.5])
def test_masked_fraction_near_rate_tokens(rate):
  x = _tokens()
  out = pt.mask_denoise({"inputs": x}, jax.random.key(1), {**CFG, "mask_rate": rate})
  m = np.asarray(out["target_mask"])
  valid = np.asarray(x) != 0
  n = valid.sum()
  frac = m[valid].mean()
  assert abs(frac - rate) < 5 * np.sqrt(rate * (1 - rate) / n)  # i.i.d. Bernoulli(rate)
  assert m[~valid].sum() == 0  # padding is never masked
  inp = np.asarray(out["inputs"])
  assert (inp[m == 1] == 16).all()  # the mask id = vocab_size
  np.testing.assert_array_equal(inp[m == 0], np.asarray(x)[m == 0])
  np.testing.assert_array_equal(np.asarray(out["targets"]), np.asarray(x))
  # Counts vary per sequence (i.i.d. masking, not a fixed number per sequence).
  assert len(np.unique(m.sum(1))) > 5


def test_mask_values_channel_layout():
  x = jax.random.uniform(jax.random.key(0), (64, 100, 2))
  out = pt.mask_denoise({"inputs": x, "label": jnp.zeros(64, jnp.int32)}, jax.random.key(2), {"mask_rate": 0.5})
  m = np.asarray(out["target_mask"])
  inp = np.asarray(out["inputs"])
  assert inp.shape == (64, 100, 3) and abs(m.mean() - 0.5) < 5 * np.sqrt(0.25 / m.size)
  np.testing.assert_array_equal(inp[..., 2], m)  # mask flag last
  np.testing.assert_allclose(inp[..., :2], np.asarray(x) * (1 - m)[..., None])
  np.testing.assert_array_equal(np.asarray(out["targets"]), np.asarray(x))


def test_causal_shift():
  x = _tokens(4, 10)
  out = pt.causal_shift({"inputs": x}, None, {"pad_id": 0})
  np.testing.assert_array_equal(np.asarray(out["targets"])[:, :-1], np.asarray(x)[:, 1:])
  tm = np.asarray(out["target_mask"])
  assert (tm[:, -1] == 0).all()
  np.testing.assert_array_equal(tm[:, :-1], (np.asarray(x)[:, 1:] != 0).astype(np.float32))


def test_unmasked_positions_do_not_enter_the_loss():
  b, length, k = 8, 30, 17
  batch = pt.mask_denoise({"inputs": _tokens(b, length)}, jax.random.key(3), {**CFG, "mask_rate": 0.3})
  logits = jax.random.normal(jax.random.key(4), (b, length, k))
  tm = np.asarray(batch["target_mask"])
  loss = lambda lg: pt.denoise_ce(objectives.Context(logits=lg, batch=batch), {})  # noqa: E731
  g = np.asarray(jax.grad(loss)(logits))
  assert np.abs(g[tm == 0]).max() == 0.0 and np.abs(g[tm == 1]).min() > 0.0
  # Changing the logits of unmasked positions leaves the loss unchanged ...
  noise = jax.random.normal(jax.random.key(5), logits.shape) * (1 - tm)[..., None]
  assert float(loss(logits + 10 * noise)) == pytest.approx(float(loss(logits)), abs=1e-6)
  # ... and the value is the mean CE over masked positions.
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
  assert float(loss(logits)) == pytest.approx(float(np.asarray(ce)[tm == 1].mean()), rel=1e-5)


def test_l1_and_pixel_ce_on_values():
  x = jnp.asarray(np.random.default_rng(0).random((4, 20, 1)), jnp.float32)
  batch = pt.mask_denoise({"inputs": x}, jax.random.key(0), {"mask_rate": 0.5})
  tm = np.asarray(batch["target_mask"])
  pred = jnp.zeros_like(x)
  l1 = pt.denoise_l1(objectives.Context(logits=pred, batch=batch), {})
  assert float(l1) == pytest.approx(float(np.abs(np.asarray(x))[..., 0][tm == 1].mean()), rel=1e-5)
  # 256-way CE: targets are grey levels round(x * 255).
  np.testing.assert_array_equal(np.asarray(pt.class_targets(jnp.asarray([[[0.0], [1.0], [0.5]]]), 256))[0],
                                [0, 255, 128])
  logits = jnp.zeros((4, 20, 256))
  assert float(pt.denoise_ce(objectives.Context(logits=logits, batch=batch), {})) == pytest.approx(np.log(256))
  # per_position eval: mae for L1 models, accuracy/loss for CE models; count = scored positions.
  batch = {**batch, "mask": jnp.asarray([1, 1, 1, 0], jnp.float32)}
  batch["target_mask"] = batch["target_mask"] * batch["mask"][:, None]
  sums = pt.per_position_eval(pred, batch)
  assert float(sums["count"]) == tm[:3].sum()
  ev = objectives.finalize_eval({k: float(v) for k, v in sums.items()})
  assert ev["mae"] == pytest.approx(float(np.abs(np.asarray(x))[:3, :, 0][tm[:3] == 1].mean()), rel=1e-5)


@pytest.mark.parametrize("batch, cfg, match", [
    ({"inputs": jnp.ones((2, 5), jnp.int32)}, {"mask_rate": 0.0}, "mask_rate"),
    ({"inputs": jnp.ones((2, 5), jnp.int32)}, {"mask_rate": 0.2}, "mask_id"),
    ({"inputs": jnp.ones((2, 5), jnp.float32)}, {"mask_rate": 0.2}, r"\[B, L, C\]"),
])
def test_bad_preparer_inputs(batch, cfg, match):
  with pytest.raises(ValueError, match=match):
    pt.mask_denoise(batch, jax.random.key(0), cfg)


def test_bad_term_inputs():
  batch = {"inputs": jnp.ones((2, 5), jnp.int32), "label": jnp.zeros(2, jnp.int32)}
  with pytest.raises(ValueError, match="objective.prepare"):
    pt.denoise_ce(objectives.Context(logits=jnp.zeros((2, 5, 3)), batch=batch), {})
  prepared = pt.causal_shift(batch, None, {})
  with pytest.raises(ValueError, match="per_position"):
    pt.causal_ce(objectives.Context(logits=jnp.zeros((2, 3)), batch=prepared), {})
  with pytest.raises(ValueError, match="L1 loss"):
    pt.causal_l1(objectives.Context(logits=jnp.zeros((2, 5, 1)), batch=prepared), {})


# ----------------------------------------------------------------------------
# Pretrain -> drop head -> fine-tune (tiny S4D on sequential digits: value input, mask channel)
# ----------------------------------------------------------------------------


def _seq_config(steps, pretrain):
  c = configs.base()
  c.data = ml_collections.ConfigDict(dict(name="seq_digits", batch_size=16, eval_batch_size=400))
  c.model = ml_collections.ConfigDict(dict(name="s4d_seq", d_model=8, n_layers=1, d_state=4, vocab_size=0,
                                           input_channels=1, norm="batch", prenorm=False,
                                           output="per_position" if pretrain else "classify",
                                           out_dim=1 if pretrain else 0, mask_channel=pretrain))
  c.total_steps = steps
  c.progress = False
  c.log_every = steps
  if pretrain:
    c.objective.prepare = "mask_denoise"
    c.objective.weights = ml_collections.ConfigDict({"denoise_l1": 1.0})
    c.objective.mask_rate = 0.5
    c.objective.eval = "per_position"
    c.objective.eval_prepare = True
  return c


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
  wd = str(tmp_path_factory.mktemp("spt"))
  summary = train.train_and_evaluate(_seq_config(3, True), wd)
  return wd, summary


def test_pretraining_run_reports_masked_metrics(pretrained):
  _, summary = pretrained
  test = summary["metrics"]["test"]
  assert 0.0 < test["mae"] < 10.0 and np.isfinite(test["mae"])
  assert abs(test["count"] / (360 * 64) - 0.5) < 0.05  # eval masks at the same rate, padding rows excluded


def test_drop_pretraining_head(pretrained):
  wd, _ = pretrained
  loaded = checkpoint.load(wd)
  out = transforms.apply("drop_pretraining_head", [loaded], {"seed": 1})
  src, dst = trees.flatten(loaded.params), trees.flatten(out.theta)
  assert out.meta["model"]["output"] == "classify" and not out.meta["model"]["mask_channel"]
  assert src["encoder/kernel"].shape == (2, 8) and dst["encoder/kernel"].shape == (1, 8)
  np.testing.assert_array_equal(np.asarray(dst["encoder/kernel"]), np.asarray(src["encoder/kernel"])[:1])
  for k in dst:
    if k.startswith("decoder/"):
      continue
    if k != "encoder/kernel":
      np.testing.assert_array_equal(np.asarray(dst[k]), np.asarray(src[k]))
  assert dst["decoder/kernel"].shape == (8, 10) and src["decoder/kernel"].shape == (8, 1)
  assert out.report["mask_channel_row_removed"] and out.report["dropped"] == ["decoder/bias", "decoder/kernel"]
  assert trees.allclose(out.model_state, loaded.model_state)  # batch statistics kept
  # A classify checkpoint is refused with a clear error.
  with pytest.raises(ValueError, match="per_position"):
    transforms.apply("drop_pretraining_head", [checkpoint.Loaded(**{**loaded.__dict__, "meta": {
        **loaded.meta, "model": out.meta["model"]}})], {})


def test_finetune_loads_pretrained_encoder_exactly(pretrained, tmp_path):
  wd, _ = pretrained
  c = _seq_config(1, False)
  c.init_from.path = wd
  c.init_from.transform = "drop_pretraining_head"
  c.init_from.dont_load = ("decoder/.*",)
  c.optimizer.frozen = (".*",)  # one step that changes nothing: the loaded weights are what we read back
  train.train_and_evaluate(c, str(tmp_path / "ft"))
  ft, pre = trees.flatten(checkpoint.load(str(tmp_path / "ft")).params), trees.flatten(checkpoint.load(wd).params)
  np.testing.assert_array_equal(np.asarray(ft["encoder/kernel"]), np.asarray(pre["encoder/kernel"])[:-1])
  for k in ft:
    if not k.startswith(("decoder/", "encoder/kernel")):
      np.testing.assert_array_equal(np.asarray(ft[k]), np.asarray(pre[k]), err_msg=k)


# ----------------------------------------------------------------------------
# The ntfs pipeline, smoke settings, through main.run
# ----------------------------------------------------------------------------


def test_ntfs_smoke_pipeline(tmp_path):
  import importlib.util

  from jaxlab import main
  spec = importlib.util.spec_from_file_location("ntfs_cfg", os.path.join(ROOT, "ml_collections_configs", "ntfs.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  cfg = mod.get_config("smoke")
  cfg.ntfs.models = ("s4d_seq",)
  cfg.ntfs.finetune_lr = 1e-3
  wd = str(tmp_path / "ntfs")
  result = main.run(cfg, wd)
  assert result["runs"] == 2
  res = json.load(open(os.path.join(wd, "results.json")))
  assert {r["pretraining"] for r in res["rows"]} == {"none", "denoise"}
  for r in res["rows"]:
    assert {"name", "task", "model", "init", "pretraining", "seed", "test_acc"} <= set(r)
    # matched labelled steps: scratch trains finetune_steps on labels, SPT pretrain + the same finetune_steps
    assert 0.0 <= r["test_acc"] <= 1.0 and r["labelled_steps"] == 3
    assert r["steps"] == (6 if r["pretraining"] == "denoise" else 3)
  spt = [r for r in res["rows"] if r["pretraining"] == "denoise"]
  assert len(spt) == 1 and 0.0 <= spt[0]["masked_accuracy"] <= 1.0 and spt[0]["masked_loss"] > 0
  assert os.path.exists(os.path.join(wd, "ntfs.png"))
  md = open(os.path.join(wd, "results.md")).read()
  assert "| listops | s4d_seq |" in md
  # each stage names its learning rate; the SSM rule follows it (peak min(1e-3, lr) / lr)
  over = {s["name"].split("/")[2]: s["request"]["overrides"] for s in res["stages"]}
  assert [over[a]["optimizer.lr"] for a in ("scratch", "spt_pretrain", "spt_finetune")] == [3e-3, 1e-2, 1e-3]
  assert over["scratch"]["optimizer.lr_rules"][0][1] == pytest.approx(1 / 3)
  assert over["spt_finetune"]["optimizer.lr_rules"][0][1] == pytest.approx(1.0)
  assert over["spt_pretrain"]["objective.mask_rate"] == 0.1 and over["spt_pretrain"]["model"]["out_dim"] == 16
  pre = {p["name"]: p for p in res["preconditions"]}
  assert pre["listops: labelled steps, most minus fewest over both arms' runs"]["holds"]
  floor = res["pretraining_baselines"]["listops"]  # unigram over the test split's real tokens, fitted on train
  p = pre["listops/s4d_seq: pretraining masked_accuracy at least the unigram predictor's + 2 points"]
  assert p["threshold"] == pytest.approx(floor["unigram"]["accuracy"] + 0.02)
  assert p["value"] == pytest.approx(spt[0]["masked_accuracy"])
  # the fine-tune started from the pretrained encoder
  ft_meta = checkpoint.load_meta(os.path.join(wd, "listops/s4d_seq/spt_finetune/seed0"))
  assert ft_meta["provenance"]["transform"] == "drop_pretraining_head"
  # Re-running skips every finished stage.
  again = main.run(cfg, wd)
  assert again["runs"] == 2
  assert all(s["skipped"] for s in json.load(open(os.path.join(wd, "results.json")))["stages"])


def test_ntfs_bad_objective(tmp_path):
  from jaxlab import main
  cfg = configs.base()
  cfg.job, cfg.pipeline = "pipeline", "ntfs"
  cfg.ntfs = ml_collections.ConfigDict(dict(objective="bert", pixel_loss="l1", tasks=(), models=(), seeds=()))
  with pytest.raises(ValueError, match="objective"):
    main.run(cfg, str(tmp_path))


def test_claims_are_not_tested_for_a_task_nothing_learned(tmp_path):
  from jaxlab.experiments import Experiment, Report
  from jaxlab.pipelines import ntfs
  at = lambda t, m, a, mean: {"task": t, "model": m, "pretraining": a, "mean": mean, "std": 0.005, "n": 3}  # noqa: E731
  table = [at("pf", "s4d_seq", "none", 0.50), at("pf", "s4d_seq", "denoise", 0.497),
           at("pf", "transformer_seq", "none", 0.493), at("pf", "transformer_seq", "denoise", 0.50),
           at("lo", "s4d_seq", "none", 0.20), at("lo", "s4d_seq", "denoise", 0.25),
           at("lo", "transformer_seq", "none", 0.30), at("lo", "transformer_seq", "denoise", 0.40)]
  rep = Report(Experiment(ml_collections.ConfigDict({"ntfs": {"x": 1}}), str(tmp_path), "ntfs"), "t")
  trivial = {"pf": {"majority class": 0.5}, "lo": {"majority class": 0.15, "first token": 0.3}}
  ntfs.claims(rep, table, "denoise", trivial, {})
  assert [p["holds"] for p in rep.preconditions] == [False, True]
  assert rep.preconditions[1]["value"] == pytest.approx(0.10)  # 0.40 - the first-token predictor's 0.30
  verdicts = [c["verdict"] for c in rep.claims]
  assert verdicts == ["not tested"] * 3 + ["holds", "holds", "does not hold"]
  assert "Transformer +10.0, S4D +5.0 points" in rep.claims[3]["evidence"]
  assert "-10.0 points from scratch, -15.0 with SPT" in rep.claims[5]["evidence"]
  # a failed precondition of the task (pretraining no better than a trivial predictor) makes every claim untested
  from jaxlab.experiments import precondition
  rep = Report(Experiment(ml_collections.ConfigDict({"ntfs": {"x": 1}}), str(tmp_path), "ntfs"), "t")
  ntfs.claims(rep, table, "denoise", trivial, {"lo": [precondition("lo/s4d_seq: pretraining", 0.16, 0.173)]})
  assert [c["verdict"] for c in rep.claims[3:]] == ["not tested"] * 3
  assert "lo/s4d_seq: pretraining" in rep.claims[3]["evidence"]
  # both arms losing: the Transformer losing less is not "gaining more"
  lose = [dict(g, mean=g["mean"] - (0.2 if g["pretraining"] == "denoise" else 0)) for g in table]
  rep = Report(Experiment(ml_collections.ConfigDict({"ntfs": {"x": 1}}), str(tmp_path), "ntfs"), "t")
  ntfs.claims(rep, lose, "denoise", {"pf": {"majority class": 0.5}, "lo": {"majority class": 0.15}}, {})
  assert [c["verdict"] for c in rep.claims[3:5]] == ["does not hold", "does not hold"]  # gains -0.10 and -0.15


def test_pretraining_baselines_are_the_trivial_predictors():
  from jaxlab.pipelines import ntfs

  class Split:
    def __init__(self, x):
      self.arrays = {"inputs": x}

  class DS:
    def __init__(self, tr, te, info):
      self.splits, self.info = {"train": Split(tr), "test": Split(te)}, info

  # tokens: pad 0 is never scored; token 5 is the most frequent real token on train (3 of 5), and 2 of the 4
  # real test tokens
  tr, te = np.array([[5, 5, 6, 0], [5, 7, 0, 0]]), np.array([[5, 6, 0, 0], [5, 7, 0, 0]])
  got = ntfs.pretraining_baselines(DS(tr, te, {"vocab_size": 8, "pad_id": 0}), "l1")
  assert got["metric"] == "masked_accuracy" and not got["at_most"] and got["unigram"]["token"] == 5
  assert got["threshold"] == pytest.approx(0.5 + 0.02)
  # values: the position mean of train is (0.5, 0.0); test MAE (0 + 0.5 + 0 + 0) / 4 against it, 1.5 / 4 against 0
  tr, te = np.array([[1.0, 0.0], [0.0, 0.0]])[..., None], np.array([[0.5, 0.5], [0.5, 0.0]])[..., None]
  got = ntfs.pretraining_baselines(DS(tr, te, {"vocab_size": 0, "pad_id": -1}), "l1")
  assert got["metric"] == "masked_mae" and got["at_most"]
  assert got["position_mean_mae"] == pytest.approx(0.125) and got["all_zero_mae"] == pytest.approx(0.375)
  assert got["threshold"] == pytest.approx(0.95 * 0.125)
