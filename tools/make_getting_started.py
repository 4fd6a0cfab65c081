"""Writes colabs/getting_started.ipynb without outputs (run: python tools/make_getting_started.py; then execute it at
its default settings and commit it with its outputs); `header_cells` is the badge and setup cell every notebook in
colabs/ starts with."""

import nbformat as nbf

# No repository URL is recorded in setup.cfg/README: one placeholder org, to be replaced by the real one everywhere.
REPO = "https://github.com/jaxlab-org/jaxlab"
BRANCH = "main"

SETUP = f"""# Setup: install jaxlab when it is not importable (a fresh Colab runtime); a local checkout with
# `pip install -e '.[notebooks]'` and the notebook test skip the install.
import importlib.metadata
import importlib.util
import os
import subprocess
import sys

REPO = '{REPO}'
if importlib.util.find_spec('jaxlab') is None:
  ROOT = os.path.abspath('jaxlab')  # the clone also holds the experiment configs and test fixtures
  if not os.path.isdir(ROOT):
    subprocess.run(['git', 'clone', '--depth=1', REPO, ROOT], check=True)
  # pin jax/jaxlib to the runtime's versions so pip keeps its accelerator (CUDA/TPU) build
  pins = []
  for package in ('jax', 'jaxlib'):
    try:
      pins.append(f'{{package}}=={{importlib.metadata.version(package)}}')
    except importlib.metadata.PackageNotFoundError:
      pass
  with open('jax_pins.txt', 'w') as f:
    f.write('\\n'.join(pins) + '\\n')
  subprocess.run([sys.executable, '-m', 'pip', 'install', '-q', '-c', 'jax_pins.txt', ROOT], check=True)
  importlib.invalidate_caches()
else:  # an editable install: the checkout is the package's parent
  ROOT = os.path.dirname(os.path.dirname(os.path.abspath(importlib.util.find_spec('jaxlab').origin)))
if not os.path.isdir(os.path.join(ROOT, 'ml_collections_configs')):
  raise FileNotFoundError(f'{{ROOT}}/ml_collections_configs not found: install jaxlab with '
                          "`pip install -e '.[notebooks]'` from a checkout")

import jax  # noqa: E402

import jaxlab  # noqa: E402

SMOKE = os.environ.get('JAXLAB_SMOKE') == '1'  # the notebook test sets it: a few steps on CPU
BACKEND = jax.default_backend()
SCALE = 'smoke' if SMOKE else ('cpu' if BACKEND == 'cpu' else 'accelerator')  # accelerator: the larger settings
print('jaxlab', jaxlab.__version__, '| jax', jax.__version__, '| devices', jax.devices(), '| settings', SCALE)"""


def header_cells(name, title):
  """The first two cells of colabs/<name>: a title with an "Open in Colab" badge, and the setup cell."""
  url = f"https://colab.research.google.com/github/{REPO.split('github.com/')[1]}/blob/{BRANCH}/colabs/{name}"
  badge = f"[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]({url})"
  return [nbf.v4.new_markdown_cell(f"{badge}\n\n# {title}"), nbf.v4.new_code_cell(SETUP)]


cells = header_cells("getting_started.ipynb", "jaxlab: getting started") + [
    nbf.v4.new_markdown_cell(
        "Train the default digits ViT through the same library call the command line "
        "uses, plot its curves, load the checkpoint from its meta alone and inspect the parameters.\n\n"
        "Set `JAXLAB_SMOKE=1` for a few-step run (the notebook test does)."),
    nbf.v4.new_code_cell(
        "import json\n"
        "import tempfile\n\n"
        "import matplotlib.pyplot as plt\n"
        "import numpy as np\n\n"
        "from jaxlab import checkpoint, main, trees\n\n"
        "WORKDIR = os.path.join(os.environ.get('JAXLAB_NOTEBOOK_WORKDIR', tempfile.mkdtemp()), 'digits_vit')\n"
        "spec = importlib.util.spec_from_file_location('cfg', os.path.join(ROOT, 'ml_collections_configs', "
        "'digits_vit.py'))\n"
        "cfg_module = importlib.util.module_from_spec(spec); spec.loader.exec_module(cfg_module)\n"
        "config = cfg_module.get_config('smoke' if SMOKE else None)\n"
        "config.progress = False\n"
        "config"),
    nbf.v4.new_markdown_cell("## Train (exactly what `python -m jaxlab.main` runs)"),
    nbf.v4.new_code_cell(
        "summary = main.run(config, WORKDIR)\n"
        "print(f\"test accuracy {summary['test_accuracy']:.4f}, params {summary['params']:,}, "
        "{summary['wall_s']:.1f}s\")"),
    nbf.v4.new_markdown_cell("## Curves from `metrics.jsonl`"),
    nbf.v4.new_code_cell(
        "rows = [json.loads(l) for l in open(os.path.join(WORKDIR, 'metrics.jsonl'))]\n"
        "train = [r for r in rows if 'train/loss' in r]\n"
        "val = [r for r in rows if 'validation/accuracy' in r]\n"
        "fig, ax = plt.subplots(1, 2, figsize=(9, 3))\n"
        "ax[0].plot([r['step'] for r in train], [r['train/loss'] for r in train]); ax[0].set_title('train loss')\n"
        "ax[1].plot([r['step'] for r in val], [r['validation/accuracy'] for r in val], 'o-')\n"
        "ax[1].set_title('validation accuracy'); ax[0].set_xlabel('step'); ax[1].set_xlabel('step')\n"
        "plt.tight_layout()"),
    nbf.v4.new_markdown_cell("## Load the checkpoint from its meta alone and inspect parameters"),
    nbf.v4.new_code_cell(
        "loaded = checkpoint.load(WORKDIR)\n"
        "print('step', loaded.step, 'model', loaded.meta['model']['name'], 'data', loaded.meta['data']['name'])\n"
        "for name, x in trees.flatten(loaded.params).items():\n"
        "    print(f'{name:40s} {str(x.shape):18s} std {float(np.std(x)):.3f}')\n"
        "print('total params', trees.count(loaded.params))"),
    nbf.v4.new_code_cell(
        "from jaxlab import data\n\n"
        "ds = data.get_dataset(loaded.meta['data']['config'])\n"
        "batch = next(ds.eval_batches('test', 16))\n"
        "pred = np.argmax(loaded.apply(batch['inputs']), -1)\n"
        "fig, axes = plt.subplots(2, 8, figsize=(10, 3))\n"
        "for a, img, p, y in zip(axes.flat, batch['inputs'], pred, batch['label']):\n"
        "    a.imshow(img[..., 0], cmap='gray'); a.axis('off')\n"
        "    a.set_title(f'{p} ({y})', color='k' if p == y else 'r')\n"
        "plt.tight_layout()"),
    nbf.v4.new_markdown_cell("## Version stamp\n\nThe code that produced the outputs above."),
    nbf.v4.new_code_cell(
        "print('jaxlab', jaxlab.__version__, '| code', checkpoint.code_version(), '| jax', jax.__version__, "
        "'| backend', BACKEND)"),
]
for i, cell in enumerate(cells):
  cell.id = f"c{i:02d}"  # stable ids: regenerating a notebook changes only what changed

KERNEL = {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}}

if __name__ == "__main__":
  nbf.write(nbf.v4.new_notebook(cells=cells, metadata=KERNEL), "colabs/getting_started.ipynb")
