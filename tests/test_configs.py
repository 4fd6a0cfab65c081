"""Every config file loads (plain and :smoke), names registered things, and has a smoke run in some test."""

import glob
import importlib.util
import os

import pytest
from conftest import ROOT

from jaxlab import data, models, pipelines

CONFIGS = sorted(glob.glob(os.path.join(ROOT, "ml_collections_configs", "*.py")))
NO_SMOKE = {"evaluate.py", "transform.py"}  # job wrappers: exercised by the engine tests


def _load(path, arg):
  spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config(arg)


@pytest.mark.parametrize("path", CONFIGS, ids=[os.path.basename(p) for p in CONFIGS])
def test_config_loads_and_names_exist(path):
  name = os.path.basename(path)
  cfgs = [_load(path, None)]
  if name not in NO_SMOKE:
    cfgs.append(_load(path, "smoke"))
  for cfg in cfgs:
    job = cfg.get("job", "train")
    if job == "train":
      assert cfg.model.name in models.names()
      assert cfg.data.name in data.names()
    elif job == "pipeline":
      assert cfg.pipeline in pipelines.names()


@pytest.mark.parametrize("path", [p for p in CONFIGS if os.path.basename(p) not in NO_SMOKE],
                         ids=[os.path.basename(p) for p in CONFIGS if os.path.basename(p) not in NO_SMOKE])
def test_every_config_has_a_smoke_run_in_the_tests(path):
  name = os.path.basename(path)
  texts = [open(t).read() for t in glob.glob(os.path.join(ROOT, "tests", "test_*.py"))
           if not t.endswith("test_configs.py")]
  stem = name[:-3]  # pipelines may build the same config through their default_config(smoke=True)
  assert any((name in t or f'"{stem}"' in t) and "smoke" in t for t in texts), f"no test runs {name}:smoke"


def test_readme_tables_are_current():
  import sys
  sys.path.insert(0, os.path.join(ROOT, "tools"))
  import update_readme
  text = open(os.path.join(ROOT, "README.md")).read()
  assert update_readme.render(text) == text, "README tables are stale: run `python tools/update_readme.py`"
