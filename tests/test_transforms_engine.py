"""The transform engine: schema validation, input checks, provenance, disk round trip, CLI, README table."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from typing import Literal

import jax
import ml_collections
import numpy as np
import pytest

from jaxlab import build, checkpoint, configs, data, train, transforms, trees
from jaxlab.transforms import engine, registry, table

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@transforms.register("_test_scale", idea="multiply every leaf by a factor", reference="test", inputs="1",
                     params={"factor": transforms.Param(float, 1.0, "multiplier"),
                             "times": transforms.Param(int, transforms.REQUIRED, "how often"),
                             "mode": transforms.Param(str, "a", "mode", choices=("a", "b")),
                             "flag": transforms.Param(bool, False, "a flag"),
                             "names": transforms.Param(tuple, (), "names")})
def _scale(inputs, *, factor, times, mode, flag, names):
  del mode, flag, names
  return transforms.Output(theta=jax.tree.map(lambda x: x * factor ** times, inputs[0].theta))


def _config(width=16):
  c = configs.base()
  c.model = ml_collections.ConfigDict(dict(name="vit", patch_size=4, width=width, depth=1, num_heads=2, mlp_dim=32))
  return c


def _save(workdir, config, params, dataset, init_from="/pretrained"):
  meta = train.make_meta(config, dataset, 0, {}, {"init_from": init_from, "step": 1})
  checkpoint.save_weights(str(workdir), 0, jax.device_get(params), meta)
  return str(workdir)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
  root = tmp_path_factory.mktemp("engine")
  dataset = data.get_dataset(_config().data)
  out = {}
  for width in (16, 8):
    module = build.model(_config(width).model, 10)
    p = build.init_variables(module, jax.random.key(width), dataset.input_shape)["params"]
    out[f"w{width}"] = p
  a = out["w16"]
  b = jax.tree.map(lambda x: x + 0.1, a)
  paths = {"a": _save(root / "a", _config(), a, dataset), "b": _save(root / "b", _config(), b, dataset),
           "narrow": _save(root / "narrow", _config(8), out["w8"], dataset),
           "other_init": _save(root / "other", _config(), b, dataset, init_from="/another_pretrained")}
  return dict(root=root, paths=paths, a=a, b=b)


def _snapshot(path):
  return sorted((os.path.relpath(os.path.join(d, f), path), os.path.getsize(os.path.join(d, f)),
                 os.path.getmtime(os.path.join(d, f))) for d, _, fs in os.walk(path) for f in fs)


def test_schema_validation_and_registration():
  t = transforms.get("_test_scale")
  assert t.validate({"times": "3"}) == {"factor": 1.0, "times": 3, "mode": "a", "flag": False, "names": ()}
  got = t.validate({"times": 2, "factor": "0.5", "flag": "true", "names": ("x,y", "z"), "mode": "b"})
  assert got == {"factor": 0.5, "times": 2, "mode": "b", "flag": True, "names": ("x", "y", "z")}
  for args, msg in (({}, "'times' is required"), ({"times": 1, "depht": 3}, r"unknown argument\(s\) \['depht'\]"),
                    ({"times": "many"}, "'times'='many' is not a int"), ({"times": 1.5}, "is not a int"),
                    ({"times": 1, "mode": "c"}, r"not in \['a', 'b'\]"), ({"times": 1, "flag": "maybe"}, "bool")):
    with pytest.raises(ValueError, match=msg):
      t.validate(args)
  with pytest.raises(ValueError, match="takes exactly one input checkpoint, got 2"):
    t.validate({"times": 1}, 2)
  with pytest.raises(ValueError, match="registered twice"):
    transforms.register("_test_scale", idea="x", reference="y")(lambda inputs: None)
  with pytest.raises(ValueError, match="inputs must be"):
    transforms.register("_bad", idea="x", reference="y", inputs="3")
  with pytest.raises(ValueError, match="unknown transform 'nope'; known: .*uniform_soup"):
    transforms.get("nope")
  assert {"uniform_soup", "greedy_soup", "interpolate", "materialize"} <= set(transforms.names())
  assert t.params["times"].describe() == "int, required"
  assert t.params["mode"].describe() == "str = 'a' (one of 'a', 'b')"


def test_markdown_table_lists_every_transform_and_parameter():
  md = table.markdown_table()
  lines = md.strip().splitlines()
  assert lines[0] == "| transform | idea | inputs | parameters | reference |"
  assert len(lines) == 2 + len(table.public_transforms())
  assert "_test_scale" not in md  # private (test) transforms stay out of the README
  for t in table.public_transforms():
    row = next(line for line in lines if line.startswith(f"| `{t.name}` |"))
    assert t.reference.replace("|", "\\|") in row
    for key in t.params:
      assert f"`{key}`" in row
  assert table.readme_block().startswith(table.BEGIN) and table.readme_block().rstrip().endswith(table.END)


def test_job_errors_are_clear_and_come_before_loading(ckpts, tmp_path):
  p = ckpts["paths"]
  run = lambda transform, inputs, out="out", args=None: engine.run(  # noqa: E731
      ml_collections.ConfigDict({"transform": transform, "inputs": tuple(inputs), "args": args or {}}),
      str(tmp_path / out))
  with pytest.raises(ValueError, match="no input checkpoints given"):
    run("uniform_soup", ("",))
  with pytest.raises(ValueError, match="unknown argument"):  # the schema is checked before the paths
    run("uniform_soup", ("/does/not/exist",), args={"wieghts": 1})
  with pytest.raises(checkpoint.CheckpointError, match="/does/not/exist: no jaxlab checkpoint found"):
    run("uniform_soup", (p["a"], "/does/not/exist"))
  with pytest.raises(ValueError, match="is the input checkpoint"):
    engine.run(ml_collections.ConfigDict({"transform": "uniform_soup", "inputs": (p["a"], p["b"]), "args": {}}),
               p["b"])
  inputs = engine.Inputs([p["a"], p["narrow"]])
  with pytest.raises(trees.TreeMismatchError, match=r"narrow does not have the same parameter tree.*shape of"):
    transforms.apply("uniform_soup", inputs)
  assert inputs.num_loads == 0  # refused from meta alone
  with pytest.warns(engine.DifferentInitWarning, match="2 different initialisations"):
    out = transforms.apply("uniform_soup", [p["a"], p["other_init"]])
  assert trees.allclose(out.theta, jax.tree.map(lambda x: x + 0.05, ckpts["a"]), atol=1e-6)
  run("interpolate", (p["a"], p["b"]), out="done")
  with pytest.raises(ValueError, match="already holds a checkpoint"):
    run("interpolate", (p["a"], p["b"]), out="done")


def test_round_trip_through_disk_records_provenance_and_never_touches_inputs(ckpts, tmp_path):
  p = ckpts["paths"]
  before = {k: _snapshot(v) for k, v in p.items()}
  cfg = ml_collections.ConfigDict({"transform": "uniform_soup", "inputs": (f"{p['a']},{p['b']}",),
                                   "args": {"weights": (1.0, 1.0)}})
  res = engine.run(cfg, str(tmp_path / "soup"))
  meta = checkpoint.load_meta(str(tmp_path / "soup"))
  prov = meta["provenance"]
  assert prov["transform"] == "uniform_soup" and prov["args"]["weights"] == [1.0, 1.0]
  assert [i["path"] for i in prov["inputs"]] == [os.path.abspath(p["a"]), os.path.abspath(p["b"])]
  assert prov["inputs"][0]["hash"] == checkpoint.content_hash(checkpoint.load(p["a"]).theta)
  assert prov["code"] and meta["model"]["width"] == 16 and res["report"]["num_ingredients"] == 2
  soup = checkpoint.load(str(tmp_path / "soup"))
  assert trees.allclose(soup.theta, jax.tree.map(lambda x: x + 0.05, ckpts["a"]), atol=1e-6)
  acc = train.evaluate_checkpoint(str(tmp_path / "soup"), "heldout")["accuracy"]
  assert 0.0 <= acc <= 1.0
  # the output transforms again like any other checkpoint
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # a soup of fine-tunes of one init keeps that init: no warning
    again = transforms.apply("interpolate", [str(tmp_path / "soup"), p["a"]], {"alpha": 1.0})
  assert trees.allclose(again.theta, ckpts["a"], atol=1e-6)
  out = transforms.apply("_test_scale", [checkpoint.load(str(tmp_path / "soup"))], {"times": 2, "factor": 2.0})
  assert trees.allclose(out.theta, jax.tree.map(lambda x: 4 * x, soup.theta), atol=1e-5)
  assert {k: _snapshot(v) for k, v in p.items()} == before


def test_cli_transform_and_one_line_error(ckpts, tmp_path):
  p = ckpts["paths"]
  env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
  cmd = [sys.executable, "-m", "jaxlab.main", "--config=ml_collections_configs/transform.py:interpolate",
         f"--config.inputs={p['a']},{p['b']}", "--config.args.alpha=0.25", f"--workdir={tmp_path / 'cli'}"]
  proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  out = checkpoint.load(str(tmp_path / "cli")).theta
  want = jax.tree.map(lambda a, b: 0.75 * np.asarray(a) + 0.25 * np.asarray(b), ckpts["a"], ckpts["b"])
  assert trees.allclose(out, want, atol=1e-6)
  assert checkpoint.load_meta(str(tmp_path / "cli"))["provenance"]["args"] == {"alpha": 0.25}
  cmd = [sys.executable, "-m", "jaxlab.main", "--config=ml_collections_configs/transform.py:uniform_soup",
         f"--config.inputs={p['a']},{tmp_path / 'missing'}", f"--workdir={tmp_path / 'bad'}"]
  proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
  assert proc.returncode == 2
  err = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
  assert len(err) == 1 and "missing: no jaxlab checkpoint found" in err[0]
  assert not os.path.exists(tmp_path / "bad")  # nothing half-written


def test_registry_module_is_backward_compatible():
  t = registry.Transform("x", lambda inputs: None, "idea", "ref", "1", {})  # old positional construction
  assert t.streaming is False and t.same_tree is False


def test_schema_is_read_from_the_signature_and_the_args_docstring():
  def fn(inputs, *, depth: int, mode: Literal["a", "b"] = "a", names: tuple[str, ...] = ("x",),
         scale: float = 0.5):
    """Does something.

    Args:
      inputs: the checkpoints.
      depth: target depth
        (>= 1)
      mode (str): how
      names: which leaves

    Returns:
      nothing.
    """
  schema = registry.schema_from_signature("_t", fn, docs={"scale": "a shared line", "depth": "overridden"})
  assert list(schema) == ["depth", "mode", "names", "scale"]
  assert schema["depth"] == transforms.Param(int, transforms.REQUIRED, "target depth (>= 1)")
  assert schema["mode"] == transforms.Param(str, "a", "how", ("a", "b"))
  assert schema["names"] == transforms.Param(tuple, ("x",), "which leaves")
  assert schema["scale"] == transforms.Param(float, 0.5, "a shared line")

  def undocumented(inputs, *, k: int = 1):
    """No Args section."""
  with pytest.raises(ValueError, match="parameter 'k' has no line in the docstring's Args: section"):
    registry.schema_from_signature("_t", undocumented)

  def untyped(inputs, *, k=1):
    """Args:
      k: a k
    """
  with pytest.raises(ValueError, match="parameter 'k' needs a type annotation"):
    registry.schema_from_signature("_t", untyped)


def test_every_registered_default_is_its_signature_default():
  import inspect
  for t in table.public_transforms():  # the built-ins (the test transform above passes an explicit schema)
    sig = inspect.signature(t.fn).parameters
    for key, p in t.params.items():
      want = transforms.REQUIRED if sig[key].default is inspect.Parameter.empty else sig[key].default
      assert p.default == want or (p.required and want is transforms.REQUIRED), (t.name, key)
    assert set(t.params) == {k for k, v in sig.items() if v.kind is inspect.Parameter.KEYWORD_ONLY}, t.name
