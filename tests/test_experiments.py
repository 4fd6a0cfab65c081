"""The experiment runner and report: derive, the done-marker, aggregation, baselines, command line, claims."""

import json
import os

import numpy as np
import pytest

from jaxlab import configs
from jaxlab.experiments import (
    Experiment,
    Report,
    TrainStage,
    TransformStage,
    aggregate,
    bars,
    check_rows,
    claim,
    command,
    compare,
    derive,
    dotted,
    figure,
    learned,
    machine,
    majority_baseline,
    matches,
    precondition,
    split_labels,
    stats,
)


def _config():
  c = configs.base()
  c.job, c.pipeline = "pipeline", "toy"
  c.toy = {"steps": 3, "lr": 0.5}
  return c


def test_derive_refuses_unknown_keys_and_replaces_sections():
  c = _config()
  with pytest.raises(ValueError, match=r"optimizer has no key 'lrr'"):
    derive(c, **{"optimizer.lrr": 1e-3})
  with pytest.raises(ValueError, match=r"the config has no key 'modle'"):
    derive(c, modle={"name": "vit"})
  d = derive(c, **{"optimizer.lr": 0.25, "model": {"name": "vit", "depth": 3}})
  assert d.optimizer.lr == 0.25 and d.model.to_dict() == {"name": "vit", "depth": 3}
  assert c.optimizer.lr == 1e-3 and "depth" not in c.model  # the base is untouched
  assert dotted({"optimizer": {"lr": 0.1, "b1": 0.8}, "seed": 3}) == {"optimizer.lr": 0.1, "optimizer.b1": 0.8,
                                                                       "seed": 3}


@pytest.fixture
def fake_jobs(monkeypatch):
  """Counts train / transform runs; a stage 'trains' by returning its lr as its accuracy."""
  calls = {"train": 0, "transform": 0}

  def train(config, workdir):
    calls["train"] += 1
    return {"workdir": workdir, "test_accuracy": float(config.optimizer.lr), "steps": int(config.total_steps)}

  def transform(config, workdir):
    calls["transform"] += 1
    return {"workdir": workdir, "transform": config.transform, "report": {"n": len(config.inputs)}}

  from jaxlab import train as train_mod
  from jaxlab.transforms import engine
  monkeypatch.setattr(train_mod, "train_and_evaluate", train)
  monkeypatch.setattr(engine, "run", transform)
  return calls


def test_stages_record_overrides_and_are_skipped_when_done(tmp_path, fake_jobs):
  wd = str(tmp_path)
  for attempt in (1, 2):
    exp = Experiment(_config(), wd, "toy")
    assert "toy" not in exp.base and "pipeline" not in exp.base and exp.base.job == "train"
    s = exp.run(TrainStage("a/s0", {"optimizer.lr": exp.section.lr, "total_steps": exp.section.steps,
                                    "model": {"name": "vit", "depth": 3}}))
    t = exp.run(TransformStage("soup", "uniform_soup", [exp.path("a/s0"), exp.path("a/s0")], {"scale": 1.0}))
    assert s["test_accuracy"] == 0.5 and s["steps"] == 3 and t["report"] == {"n": 2}
    assert [st["skipped"] for st in exp.stages] == [attempt == 2] * 2
  assert fake_jobs == {"train": 1, "transform": 1}  # the second pass ran nothing
  req = json.load(open(tmp_path / "a" / "s0" / "overrides.json"))
  assert req == {"kind": "train", "overrides": {"optimizer.lr": 0.5, "total_steps": 3,
                                                "model": {"name": "vit", "depth": 3}}}
  assert json.load(open(tmp_path / "soup" / "stage.json"))["request"]["args"] == {"scale": 1.0}
  # a done stage asked for something else is refused, naming the key
  with pytest.raises(ValueError, match=r"stage 'a/s0' is done with optimizer.lr=0.5 but is now asked for"):
    Experiment(_config(), wd, "toy").run(TrainStage("a/s0", {"optimizer.lr": 0.1, "total_steps": 3,
                                                             "model": {"name": "vit", "depth": 3}}))
  # a moved workdir resumes: paths inside it are compared relative to it
  moved = str(tmp_path.parent / (tmp_path.name + "_moved"))
  os.rename(wd, moved)
  exp2 = Experiment(_config(), moved, "toy")
  exp2.run(TrainStage("a/s0", {"optimizer.lr": 0.5, "total_steps": 3, "model": {"name": "vit", "depth": 3}}))
  exp2.run(TransformStage("soup", "uniform_soup", [exp2.path("a/s0"), exp2.path("a/s0")], {"scale": 1.0}))
  assert fake_jobs == {"train": 1, "transform": 1} and all(st["skipped"] for st in exp2.stages)
  os.rename(moved, wd)
  # results.md shows the overrides of every stage
  rep = Report(exp, "Toy")
  rep.write()
  md = open(tmp_path / "results.md").read()
  assert "`a/s0` | `optimizer.lr=0.5`, `total_steps=3`, `model~{\"depth\":3}`" in md  # only what differs
  assert "`uniform_soup(a/s0, a/s0; scale=1)`" in md


def test_aggregate_is_sample_std_over_seeds():
  rows = [{"name": "a", "seed": s, "test_acc": v} for s, v in enumerate((0.5, 0.7, 0.9))]
  rows += [{"name": "b", "seed": 0, "test_acc": 0.4}, {"name": "b", "seed": 1, "test_acc": None}]
  a, b = aggregate(rows, by="name")
  assert a["name"] == "a" and a["n"] == 3 and a["mean"] == pytest.approx(0.7)
  assert a["std"] == pytest.approx(0.2)  # ddof=1: sqrt((0.04 + 0 + 0.04) / 2); ddof=0 would be 0.163
  assert b["n"] == 1 and b["std"] == 0.0 and b["seeds"] == [0]
  assert aggregate(rows, by="name", seeds=(0, 1))[0]["values"] == [0.5, 0.7]
  with pytest.raises(ValueError, match="more than once"):
    aggregate(rows + [{"name": "a", "seed": 0, "test_acc": 1.0}])
  assert stats([1.0, 2.0, 4.0])["std"] == pytest.approx(np.std([1.0, 2.0, 4.0], ddof=1))


def test_majority_baseline_is_the_most_frequent_label_of_the_split():
  base = majority_baseline(np.array([0, 1, 1, 2, 1, 3, 3, 1, 0, 2]))
  assert base == {"label": 1, "accuracy": 0.4, "n": 10}  # not 1/K = 0.25
  with pytest.raises(ValueError, match="no labels"):
    majority_baseline([])


def test_command_line_has_the_config_argument_and_the_overrides(tmp_path):
  wd = tmp_path / "run"
  (wd / "attempts" / "001").mkdir(parents=True)
  (wd / "attempts" / "002").mkdir()
  (wd / "attempts" / "002" / "command.txt").write_text(
      "/usr/bin/python jaxlab/main.py --config=ml_collections_configs/learngene.py:methods=sws "
      f"--workdir={wd} --config.learngene.seeds=0,1\n")
  (wd / "overrides.txt").write_text("--config.learngene.seeds=0,1\n--config.x=('a','b')\n")
  line = command(str(wd), "learngene.py")
  assert line.startswith("python -m jaxlab.main --config=ml_collections_configs/learngene.py:methods=sws ")
  assert line.endswith(" --config.learngene.seeds=0,1 \"--config.x=('a','b')\"")
  # without a recorded attempt (a library call): the default config file
  assert command(str(tmp_path), "pela.py").startswith("python -m jaxlab.main --config=ml_collections_configs/pela.py")


def test_machine_line_names_devices_and_cpu_count():
  line = machine()
  assert f"{os.cpu_count()} CPU cores" in line and "cpu" in line.lower()


def test_a_failed_precondition_makes_a_claim_not_tested():
  ok = precondition("teacher beats plain", 0.95, 0.9)
  bad = precondition("loss below unigram", 2.5, 2.0, at_most=True)
  assert ok["holds"] and not bad["holds"]
  assert precondition("at threshold", 36 / 360, 0.1)["holds"]
  assert claim("A beats B", True, "+3 pp", requires=[ok])["verdict"] == "holds"
  assert claim("A beats B", False, "-1 pp", requires=[ok])["verdict"] == "does not hold"
  c = claim("A beats B", True, "+3 pp", requires=[ok, bad])
  assert c == {"claim": "A beats B", "verdict": "not tested", "evidence": "precondition failed: loss below unigram"}


def test_report_writes_rows_preconditions_claims_and_figures(tmp_path, fake_jobs):
  exp = Experiment(_config(), str(tmp_path), "toy")
  rep = Report(exp, "Toy experiment")
  rep.rows = [{"name": "a", "seed": s, "test_acc": v} for s, v in enumerate((0.5, 0.7))]
  g = aggregate(rep.rows)[0]
  rep.table(("model", "test acc (%)"), [("a", f"{100 * g['mean']:.1f} ± {100 * g['std']:.1f}")], "Test accuracy")
  p = rep.precondition("a learned", g["mean"], 0.9)
  rep.claim("a is good", True, "mean 60%", requires=[p])
  rep.figure("toy.png", lambda ax: ax.plot([0, 1], [0, 1]))
  res = rep.write()
  on_disk = json.load(open(tmp_path / "results.json"))
  assert on_disk["rows"] == res["rows"] and len(on_disk["rows"]) == 2
  assert on_disk["claims"][0]["verdict"] == "not tested" and on_disk["preconditions"][0]["holds"] is False
  assert "ddof=1" in on_disk["std"]
  md = open(tmp_path / "results.md").read()
  assert "60.0 ± 14.1" in md and "(mean ± sample std over seeds (ddof=1" in md and "**not tested**" in md
  assert os.path.getsize(tmp_path / "toy.png") > 0


def test_rows_follow_the_schema():
  check_rows([{"name": "a", "seed": 0, "test_acc": 0.5, "shift_acc": None, "params": 10}])
  with pytest.raises(ValueError, match=r"row 1 .*needs a str 'name' and an int 'seed'"):
    check_rows([{"name": "a", "seed": 0}, {"name": "b"}])
  with pytest.raises(ValueError, match=r"row 0 \(a\): test_acc=87.5 is not a fraction"):
    check_rows([{"name": "a", "seed": 0, "test_acc": 87.5}])  # a percentage where a fraction belongs


def test_readme_verdicts_table_quotes_the_claims_lists(tmp_path):
  import sys

  from conftest import ROOT
  sys.path.insert(0, os.path.join(ROOT, "tools"))
  import update_readme
  for name, claims in (("a", [{"claim": "A beats B", "verdict": "holds", "evidence": "+3"}]),
                       ("b", {"old_style": True}), ("c", [])):
    (tmp_path / "results" / name).mkdir(parents=True)
    (tmp_path / "results" / name / "results.json").write_text(json.dumps({"rows": [], "claims": claims}))
  lines = update_readme.verdict_table(str(tmp_path)).splitlines()
  assert lines[3] == "| [a](results/a/results.md) | A beats B | **holds** |" and len(lines) == 5  # b, c: no rows


def test_learned_compares_the_best_mean_with_the_majority_class_plus_a_margin():
  groups = aggregate([{"name": n, "seed": s, "test_acc": v} for n, s, v in
                      (("a", 0, 0.30), ("a", 1, 0.40), ("b", 0, 0.20), ("b", 1, 0.22))])
  p = learned("aux net", groups, {"accuracy": 0.3, "label": 1, "n": 10}, margin=0.05)
  assert p["value"] == pytest.approx(0.35) and p["threshold"] == pytest.approx(0.35) and p["holds"]
  assert "majority class (30.0%) by 5 points" in p["name"]
  assert not learned("aux net", 0.34, 0.3, margin=0.05)["holds"]
  with pytest.raises(ValueError, match="no accuracy"):
    learned("aux net", [], 0.3)


def test_report_baseline_takes_a_data_config_and_records_learned(tmp_path):
  exp = Experiment(_config(), str(tmp_path), "toy")
  rep = Report(exp, "Toy")
  own, other = rep.baseline("test"), rep.baseline("test", data=derive(exp.base.data, name="mnist1d"))
  digits = np.bincount(split_labels(exp.base.data))
  assert own["n"] == digits.sum() == 360 and own["accuracy"] == pytest.approx(digits.max() / 360)
  assert other["n"] == 1000 and exp.base.data.name == "digits"  # the experiment's own data is not changed
  p = rep.learned("toy", own["accuracy"] + 0.1, margin=0.1)
  assert p["holds"] and rep.preconditions == [p]


def test_section_list_keys_are_normalised_to_tuples(tmp_path):
  c = _config()
  c.toy = {"seeds": "0,1,2", "tasks": ("a,b",), "aux": {"stages": [3, 2, 3]}, "ratios": "(0.5,2)"}
  exp = Experiment(c, str(tmp_path), "toy", lists={"seeds": int, "tasks": str, "aux.stages": int, "ratios": float})
  s = exp.section
  assert (s.seeds, s.tasks, s.aux.stages, s.ratios) == ((0, 1, 2), ("a", "b"), (3, 2, 3), (0.5, 2.0))
  with pytest.raises(ValueError, match=r"config.toy.aux.depths: missing"):
    Experiment(c, str(tmp_path), "toy", lists={"aux.depths": int})
  c.toy.seeds = "0,x"
  with pytest.raises(ValueError, match=r"config.toy.seeds='0,x': every item must be int"):
    Experiment(c, str(tmp_path), "toy", lists={"seeds": int})


def test_bars_and_a_grid_of_panels(tmp_path):
  groups = aggregate([{"name": n, "task": t, "seed": s, "test_acc": v} for n, t, s, v in
                      (("x", "t1", 0, 0.5), ("x", "t1", 1, 0.7), ("y", "t1", 0, 0.4), ("y", "t2", 0, 0.9))],
                     by=("task", "name"))
  drawn = {}

  def draw(axes):
    assert axes.shape == (2, 3)
    bars(axes[0, 0], groups, x="task", series="name", baselines={"majority": 0.3})
    drawn["heights"] = [round(p.get_height(), 6) for p in axes[0, 0].patches]
    drawn["line"] = axes[0, 0].lines[-1].get_ydata()[0]

  figure(str(tmp_path / "grid.png"), draw, ncols=3, nrows=2, size=(2, 2))
  assert drawn["heights"] == [60.0, 40.0, 90.0] and drawn["line"] == pytest.approx(30.0)
  assert os.path.getsize(tmp_path / "grid.png") > 0


def test_matches_allows_the_tolerance_below_the_reference():
  p = matches("aux vs plain", {"mean": 0.90}, 0.915, tolerance=0.02)
  assert p["holds"] and p["value"] == pytest.approx(-0.015) and p["threshold"] == -0.02
  assert "90.0% vs 91.5% (at most 2 points below)" in p["name"]
  assert not matches("aux vs plain", 0.89, 0.915, tolerance=0.02)["holds"]
  assert matches("x", 0.5, 0.5)["threshold"] == 0.0 and str(matches("x", 0.5, 0.5)["threshold"]) == "0.0"


def test_compare_counts_wins_per_value_and_their_majority():
  rows = [{"method": m, "depth": dd, "seed": s, "test_acc": v} for m, dd, s, v in (
      ("a", 2, 0, 0.8), ("a", 2, 1, 0.9), ("a", 4, 0, 0.6), ("a", 4, 1, 0.6), ("a", 6, 0, 0.7),
      ("b", 2, 0, 0.7), ("b", 2, 1, 0.7), ("b", 4, 0, 0.65), ("b", 4, 1, 0.65), ("b", 6, 0, 0.5))]
  table = aggregate(rows, by=("method", "depth"))
  c = compare(table, "a", "b", "depth")
  assert (c["wins"], c["n"], c["holds"]) == (2, 3, True)
  assert c["mean_diff"] == pytest.approx((0.15 - 0.05 + 0.2) / 3)
  assert "higher at 2/3 values of depth" in c["text"] and "+10.0 points" in c["text"]
  # within one std: depth 4 (-0.05) is within a's / b's std? both 0 there, so still a loss
  assert compare(table, "a", "b", "depth", within_std=True)["wins"] == 2
  tied = aggregate([{"method": m, "seed": s, "test_acc": 0.5} for m in "ab" for s in (0, 1)], by=("method", "seed"))
  assert compare(tied, "a", "b", "seed")["wins"] == 0 and compare(tied, "a", "b", "seed", ties_win=True)["holds"]
  assert compare(table, "a", "c", "depth") == {"wins": 0, "n": 0, "mean_diff": None, "holds": None,
                                                "text": "higher at 0/0 values of depth (holds at a majority); mean "
                                                        "difference - points"}
