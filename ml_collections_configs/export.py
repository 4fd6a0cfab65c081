"""Export a jaxlab checkpoint as safetensors or a PyTorch .pth in timm naming (or as a jaxlab-named state dict).

    python -m jaxlab.main --config=ml_collections_configs/export.py --config.checkpoint=runs/deit_s_pela \
        --config.format=timm --config.out=out.safetensors --workdir=runs/export

`format=timm` writes timm's keys and shapes for a `vit` model (blocks unstacked, kernels transposed), and
`export.json` in the workdir gives the `timm.create_model` arguments; load it in PyTorch with
`timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=out, num_classes=K), **timm_kwargs)`
(`export.json` has the exact call). Models timm cannot express
(low-rank ViT, WRN) are refused for `timm`; `format=jaxlab` writes any checkpoint as a plain state dict with
jaxlab's names and its meta, which the import job reads back bitwise. The smoke variant exports the
checkpoint the import smoke run writes to /tmp/jaxlab_import_smoke (or give --config.checkpoint):

    python -m jaxlab.main --config=ml_collections_configs/export.py:smoke --workdir=/tmp/jaxlab_export_smoke

See docs/interop.md.
"""

import ml_collections


def get_config(arg=None):
  c = ml_collections.ConfigDict()
  c.job = "export"
  c.checkpoint = ""  # jaxlab checkpoint (workdir) to export
  c.step = -1  # -1 = latest
  c.format = "timm"  # timm | jaxlab
  c.out = ""  # the file to write: .safetensors, or .pth/.pt/.bin (torch.save zip, format=timm only)
  c.overwrite = False  # replace an existing `out`
  if arg == "smoke":
    c.checkpoint = "/tmp/jaxlab_import_smoke"
    c.out = "/tmp/jaxlab_export_smoke.safetensors"
    c.overwrite = True
  elif arg:
    raise ValueError(f"unknown config argument {arg!r}; use :smoke or nothing")
  return c
