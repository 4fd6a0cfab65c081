"""The one registry type: registration, the discovery rule, errors."""

from __future__ import annotations

import sys

import pytest

from jaxlab.registry import Registry


def test_register_get_names_and_errors():
  reg = Registry("widget", key="config.widget.name")
  reg.register("b", 2)

  @reg.register("a")
  def make_a():
    return 1

  assert reg.names() == ["a", "b"] and reg.get("a") is make_a and reg.get("b") == 2
  assert "a" in reg and "c" not in reg and len(reg) == 2 and list(reg) == ["a", "b"]
  with pytest.raises(ValueError, match=r"^config.widget.name: unknown widget 'c'; known: a, b$"):
    reg.get("c")
  with pytest.raises(ValueError, match=r"^config.widget.name: give a widget name; known: a, b$"):
    reg.get("")
  reg.register("a")(make_a)  # the same function again (a re-import) is fine
  with pytest.raises(ValueError, match="widget 'a' is registered twice"):
    reg.register("a")(lambda: 3)
  assert reg.get("a") is make_a


def test_discovery_imports_every_module_of_the_package_once(tmp_path, monkeypatch):
  pkg = tmp_path / "plugpkg"
  pkg.mkdir()
  (pkg / "__init__.py").write_text("from jaxlab.registry import Registry\n"
                                   "REG = Registry('plug', key='config.plug', package='plugpkg', skip=('skipped',))\n")
  (pkg / "one.py").write_text("from plugpkg import REG\nREG.register('one', 1)\n")
  (pkg / "two.py").write_text("from plugpkg import REG\nREG.register('two', 2)\nprint(REG.names())\n")
  (pkg / "skipped.py").write_text("raise RuntimeError('must not be imported')\n")
  (pkg / "_private.py").write_text("raise RuntimeError('must not be imported')\n")
  monkeypatch.syspath_prepend(str(tmp_path))
  import plugpkg
  try:
    assert plugpkg.REG._entries == {}  # nothing is imported before the first lookup
    assert plugpkg.REG.names() == ["one", "two"]
    assert plugpkg.REG.get("two") == 2 and "plugpkg.skipped" not in sys.modules
  finally:
    for name in [m for m in sys.modules if m.split(".")[0] == "plugpkg"]:
      del sys.modules[name]


def test_every_plugin_kind_uses_the_one_registry_and_names_its_config_key():
  from jaxlab import data, main, models, objectives, parameterizations, transforms, validate
  from jaxlab.data import base
  cases = [
      (models.MODELS, lambda: models.build({"name": "nope"}, 10), "config.model.name: unknown model 'nope'", "vit"),
      (base.DATASETS, lambda: data.get_dataset({"name": "nope"}), "config.data.name: unknown data set 'nope'",
       "digits"),
      (parameterizations.PARAMETERIZATIONS, lambda: parameterizations.build({"name": "nope"}),
       "config.parameterization.name: unknown parameterization 'nope'", "linear_learngene"),
      (objectives.PREPARERS, lambda: objectives.get_preparer({"prepare": "nope"}),
       "config.objective.prepare: unknown preparer 'nope'", None),
      (objectives.EVALS, lambda: objectives.get_eval({"eval": "nope"}), "config.objective.eval: unknown eval 'nope'",
       "classification"),
      (transforms.TRANSFORMS, lambda: transforms.get("nope"), "config.transform: unknown transform 'nope'",
       "uniform_soup"),
      (main.JOBS, lambda: main.JOBS.get("nope"), "config.job: unknown job 'nope'", "train"),
      (validate.JOB_CHECKS, lambda: validate.JOB_CHECKS.get("nope"), "config.job: unknown job 'nope'", "pipeline"),
  ]
  for reg, call, message, builtin in cases:
    assert isinstance(reg, Registry)
    with pytest.raises(ValueError, match="^" + message.replace(".", r"\.") + "; known: "):
      call()
    if builtin is not None:  # found by the discovery rule, not by an explicit import
      assert builtin in reg.names()
  assert "cross_entropy" in objectives.TERMS and objectives.TERMS.get("soft_distill").needs == ("teacher",)
  assert set(main.JOBS.names()) == set(validate.JOB_CHECKS.names())  # every job is run and checked
