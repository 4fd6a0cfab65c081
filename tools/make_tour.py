"""Writes colabs/tour.ipynb without outputs (run: python tools/make_tour.py); execute it to record its outputs."""

import nbformat as nbf
from make_getting_started import KERNEL, header_cells


def md(text):
  return nbf.v4.new_markdown_cell(text)


def code(text):
  return nbf.v4.new_code_cell(text)


cells = header_cells("tour.ipynb", "A tour of jaxlab: learngene -> descendants -> compression -> soup") + [
    md("One chain of weight-level methods on the digits data, each step a `jaxlab.main` job (the same calls the "
       "command line makes) and each model evaluated on the test split on the way:\n\n"
       "1. train a TLEG auxiliary net (`parameterization.name='linear_learngene'`: layer l is `A + (l/L) B`);\n"
       "2. expand its learngene to two depths (`expand_learngene`) and fine-tune both descendants;\n"
       "3. compress the deeper descendant with `lowrank_svd` (PELA's truncated SVD);\n"
       "4. fine-tune two copies of the compressed model (two seeds) and average them (`uniform_soup`);\n"
       "5. plot test accuracy against parameter count.\n\n"
       "The auxiliary net is trained by cross-entropy here, not distilled from a teacher as in TLEG's recipe "
       "(`colabs/learngene.ipynb` and `ml_collections_configs/learngene.py` run the full recipe). Sizes follow "
       "`SCALE` from the setup cell: `smoke` (the notebook test, a few steps), `cpu` (a few minutes), "
       "`accelerator` (a wider, deeper net and longer runs)."),
    code("import importlib.util\n"
         "import tempfile\n\n"
         "import matplotlib.pyplot as plt\n"
         "import ml_collections\n"
         "from IPython.display import Markdown, display\n\n"
         "from jaxlab import checkpoint, evaluate, main, trees\n\n"
         "WORK = os.path.join(os.environ.get('JAXLAB_NOTEBOOK_WORKDIR') or tempfile.mkdtemp(), 'tour')\n"
         "# aux net size, its steps, the descendants' depths, the steps of each fine-tune\n"
         "S = {'smoke': dict(width=16, heads=2, mlp_dim=32, aux_depth=4, aux_steps=6, depths=(2, 4), ft_steps=3),\n"
         "     'cpu': dict(width=64, heads=4, mlp_dim=128, aux_depth=6, aux_steps=600, depths=(3, 6), ft_steps=150),\n"
         "     'accelerator': dict(width=128, heads=4, mlp_dim=256, aux_depth=8, aux_steps=2000, depths=(4, 8),\n"
         "                         ft_steps=400)}[SCALE]\n"
         "print(SCALE, S)\n\n\n"
         "def config(name, arg=None):\n"
         "  \"\"\"ml_collections_configs/<name>.py:<arg> of the checkout.\"\"\"\n"
         "  spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, 'ml_collections_configs', "
         "name + '.py'))\n"
         "  mod = importlib.util.module_from_spec(spec)\n"
         "  spec.loader.exec_module(mod)\n"
         "  return mod.get_config(arg)\n\n\n"
         "def path(name):\n"
         "  return os.path.join(WORK, name)\n\n\n"
         "def train(name, steps, model, seed=0, lr=2e-3, warmup=50, init_from='', parameterization=None):\n"
         "  \"\"\"A training job: the default digits job's data and optimizer with this model, budget and init.\"\"\"\n"
         "  c = config('digits_vit')\n"
         "  c.model = ml_collections.ConfigDict(model)\n"
         "  c.total_epochs, c.total_steps, c.seed, c.progress = 0.0, int(steps), seed, False\n"
         "  c.optimizer.lr, c.optimizer.warmup_steps = lr, min(warmup, steps // 4)\n"
         "  c.eval_every = c.checkpoint_every = int(steps)\n"
         "  c.log_every = max(1, steps // 5)\n"
         "  c.init_from.path = init_from\n"
         "  if parameterization:\n"
         "    c.parameterization = ml_collections.ConfigDict(parameterization)\n"
         "  main.run(c, path(name))\n\n\n"
         "def transform(name, method, inputs, **args):\n"
         "  \"\"\"A transform job (ml_collections_configs/transform.py) writing checkpoint `name`.\"\"\"\n"
         "  c = config('transform', method)\n"
         "  c.inputs = ','.join(path(i) for i in inputs)\n"
         "  for k, v in args.items():\n"
         "    c.args[k] = v\n"
         "  main.run(c, path(name))\n\n\n"
         "rows = []  # one per model: its name, stored parameters and test accuracy\n\n\n"
         "def record(label, name, *parents):\n"
         "  \"\"\"Evaluates checkpoint `name` on the test split and adds it to the table; made from `parents`.\"\"\"\n"
         "  loaded = checkpoint.load(path(name))\n"
         "  acc = evaluate.evaluate_checkpoint(path(name), 'test')['accuracy']\n"
         "  rows.append(dict(model=label, name=name, params=trees.count(loaded.theta), accuracy=float(acc),\n"
         "                   parents=parents))\n"
         "  print(f'{label:32s} {rows[-1][\"params\"]:>8,} params   test accuracy {acc:.4f}')"),
    md("## 1. The TLEG auxiliary net\n\nIts blocks store only the learngene (`A`, `B` per block parameter) and "
       "the layers outside the blocks; layer l of L computes with `A + (l/L) B`."),
    code("aux_model = dict(config('digits_vit').model.to_dict(), width=S['width'], num_heads=S['heads'],\n"
         "                 mlp_dim=S['mlp_dim'], depth=S['aux_depth'])\n"
         "train('aux', S['aux_steps'], aux_model,\n"
         "      parameterization={'name': 'linear_learngene', 'coefficient': 'l/L'})\n"
         "record(f\"TLEG aux net (depth {S['aux_depth']})\", 'aux')"),
    md("## 2. Expand the learngene to two depths, fine-tune each descendant\n\n"
       "The expansion is an ordinary ViT checkpoint (evaluated as it comes out, then after a short fine-tune)."),
    code("for depth in S['depths']:\n"
         "  transform(f'expanded_d{depth}', 'expand_learngene', ['aux'], depth=depth)\n"
         "  record(f'descendant d{depth}, expanded', f'expanded_d{depth}', 'aux')\n"
         "  model = checkpoint.load_meta(path(f'expanded_d{depth}'))['model']\n"
         "  train(f'descendant_d{depth}', S['ft_steps'], model, lr=1e-3, warmup=0,\n"
         "        init_from=path(f'expanded_d{depth}'))\n"
         "  record(f'descendant d{depth}, fine-tuned', f'descendant_d{depth}', f'expanded_d{depth}')"),
    md("## 3. Compress the deeper descendant with `lowrank_svd`\n\n"
       "Every block Dense becomes two factors of rank `floor(d_in d_out / (2 (d_in + d_out)))` (ratio 2)."),
    code("deep = max(S['depths'])\n"
         "transform('lowrank', 'lowrank_svd', [f'descendant_d{deep}'], ratio=2.0)\n"
         "record(f'd{deep} low-rank (ratio 2)', 'lowrank', f'descendant_d{deep}')"),
    md("## 4. Fine-tune two copies of the compressed model and soup them"),
    code("low_model = checkpoint.load_meta(path('lowrank'))['model']\n"
         "for seed in (0, 1):\n"
         "  # PELA's recovery recipe (ml_collections_configs/pela.py): a lower peak rate after a short warm-up\n"
         "  train(f'lowrank_ft{seed}', S['ft_steps'], low_model, seed=seed, lr=5e-4, warmup=10, "
         "init_from=path('lowrank'))\n"
         "  record(f'd{deep} low-rank, fine-tune seed {seed}', f'lowrank_ft{seed}', 'lowrank')\n"
         "transform('soup', 'uniform_soup', ['lowrank_ft0', 'lowrank_ft1'])\n"
         "record(f'd{deep} low-rank, soup of the two', 'soup', 'lowrank_ft0', 'lowrank_ft1')"),
    md("## 5. Accuracy against parameters"),
    code("display(Markdown('| model | params | test accuracy |\\n|---|---:|---:|\\n' + '\\n'.join(\n"
         "    f\"| {r['model']} | {r['params']:,} | {r['accuracy']:.4f} |\" for r in rows)))\n"
         "fig, ax = plt.subplots(figsize=(9, 4))\n"
         "at = {r['name']: (r['params'], r['accuracy']) for r in rows}\n"
         "for r in rows:  # an arrow from each model to what was made from it\n"
         "  for p in r['parents']:\n"
         "    ax.annotate('', xy=at[r['name']], xytext=at[p], arrowprops=dict(arrowstyle='->', color='0.6', lw=0.8))\n"
         "for r, marker in zip(rows, 'os^Dv<>pPX*h'):\n"
         "  ax.scatter(*at[r['name']], s=40, marker=marker, zorder=3, label=f\"{r['model']} ({r['accuracy']:.3f})\")\n"
         "ax.legend(fontsize=7, loc='center left', bbox_to_anchor=(1.01, 0.5))\n"
         "ax.set_xlabel('stored parameters'); ax.set_ylabel('test accuracy (digits)'); ax.grid(alpha=0.3)\n"
         "ax.set_title(f'jaxlab tour ({SCALE} settings)')\n"
         "plt.tight_layout(); plt.show()"),
    md("## Version stamp\n\nThe code that produced the outputs above."),
    code("print('jaxlab', jaxlab.__version__, '| code', checkpoint.code_version(), '| jax', jax.__version__, "
         "'| backend', BACKEND)"),
]

for i, cell in enumerate(cells):
  cell.id = f"c{i:02d}"  # stable ids: regenerating a notebook changes only what changed

if __name__ == "__main__":
  nbf.write(nbf.v4.new_notebook(cells=cells, metadata=KERNEL), "colabs/tour.ipynb")
