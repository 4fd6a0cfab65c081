"""Import a timm / PyTorch / big_vision checkpoint file as an ordinary jaxlab checkpoint.

    python -m jaxlab.main --config=ml_collections_configs/import.py \
        --config.source=deit_small.safetensors --workdir=runs/deit_s
    python -m jaxlab.main --config=ml_collections_configs/import.py:smoke --workdir=/tmp/jaxlab_import_smoke

The model config (width, depth, patch and image size, pooling, class / distillation tokens, LayerScale,
`no_embed_class`) is read off the tensors; heads default to width / 64. Any of it can be given. Strict:
missing, unexpected or mis-shaped tensors stop the job with one error line and nothing written. The smoke
variant imports the committed tiny timm fixture (width 24, 2 heads) in a few seconds on a CPU. See
docs/interop.md.
"""

import os

import ml_collections

FIXTURES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "fixtures", "timm")


def get_config(arg=None):
  c = ml_collections.ConfigDict()
  c.job = "import"
  c.source = ""  # the file: .safetensors, .pth / .pt / .bin (torch zip), .npz (big_vision)
  c.format = "auto"  # auto (by extension) | safetensors | torch | npz
  c.family = "auto"  # auto (by tensor names) | timm_vit | big_vision_vit | mixturegrowth_wrn | jaxlab
  c.num_heads = 0  # 0 = width / 64
  c.num_classes = 0  # 0 = from the head; set with init_missing='params/head/.*' for a new head
  c.image_size = 0  # 0 = the checkpoint's; another size resamples the position embeddings
  c.resample = ""  # '' = the family's: bicubic (timm) | big_vision (scipy zoom, order 1)
  c.pool = ""  # '' = inferred: cls | gap
  c.ln_eps = 0.0  # 0 = 1e-6 (timm and big_vision ViTs)
  c.skip_unexpected = ()  # regexes of file keys that may stay unused
  c.init_missing = ()  # regexes of jaxlab paths initialised fresh if absent or mis-shaped
  c.seed = 0  # init of `init_missing` leaves
  c.preprocessing = ml_collections.ConfigDict()  # written to meta["preprocessing"]; '' / () = family default
  c.preprocessing.mean = ()
  c.preprocessing.std = ()
  c.preprocessing.interpolation = ""
  c.preprocessing.crop_pct = 0.0
  c.data = ml_collections.ConfigDict()  # optional: the model's data set, recorded in meta (evaluate job default)
  c.data.name = ""  # e.g. 'tfds'
  c.data.tfds_name = ""  # e.g. 'imagenet2012' (prepared with `tfds build`)
  c.data.data_dir = ""  # tfds data_dir ('' = tfds default)
  if arg == "smoke":
    c.source = os.path.join(FIXTURES, "vit_token.safetensors")
    c.num_heads = 2
  elif arg:
    raise ValueError(f"unknown config argument {arg!r}; use :smoke or nothing")
  return c
