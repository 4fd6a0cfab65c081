"""Writes colabs/getting_started.ipynb (run: python tools/make_getting_started.py)."""

import nbformat as nbf

cells = [
    nbf.v4.new_markdown_cell(
        "# jaxlab: getting started\n\nTrain the default digits ViT through the same library call the command line "
        "uses, plot its curves, load the checkpoint from its meta alone and inspect the parameters.\n\n"
        "Set `JAXLAB_SMOKE=1` for a few-step run (the notebook test does)."),
    nbf.v4.new_code_cell(
        "import json, os, tempfile\n"
        "import matplotlib.pyplot as plt\n"
        "import numpy as np\n"
        "from jaxlab import checkpoint, main, trees\n"
        "from ml_collections import config_dict\n"
        "import importlib.util\n\n"
        "SMOKE = os.environ.get('JAXLAB_SMOKE') == '1'\n"
        "WORKDIR = os.path.join(os.environ.get('JAXLAB_NOTEBOOK_WORKDIR', tempfile.mkdtemp()), 'digits_vit')\n"
        "root = os.path.dirname(os.path.dirname(os.path.abspath(main.__file__)))\n"
        "spec = importlib.util.spec_from_file_location('cfg', os.path.join(root, 'ml_collections_configs', "
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
        "from jaxlab import data\n"
        "ds = data.get_dataset(loaded.meta['data']['config'])\n"
        "batch = next(ds.eval_batches('test', 16))\n"
        "pred = np.argmax(loaded.apply(batch['inputs']), -1)\n"
        "fig, axes = plt.subplots(2, 8, figsize=(10, 3))\n"
        "for a, img, p, y in zip(axes.flat, batch['inputs'], pred, batch['label']):\n"
        "    a.imshow(img[..., 0], cmap='gray'); a.axis('off')\n"
        "    a.set_title(f'{p} ({y})', color='k' if p == y else 'r')\n"
        "plt.tight_layout()"),
]
nb = nbf.v4.new_notebook(cells=cells, metadata={"kernelspec": {"name": "python3", "display_name": "Python 3",
                                                               "language": "python"}})
nbf.write(nb, "colabs/getting_started.ipynb")
