"""Regenerates the tiny timm / PyTorch / big_vision fixtures under `tests/fixtures/timm/` with the real timm.

    /work/main/.venv-bench/bin/python tools/make_timm_fixtures.py   (needs `pip install -e .[bench]`: torch, timm)

Every model is a real timm `VisionTransformer` (or DeiT's `VisionTransformerDistilled`) at a tiny size
(16x16 images, 8x8 patches, width 24, depth 2, 2 heads, 5 classes) whose parameters are all redrawn from
a seeded normal distribution, so that a swapped or mis-transposed tensor changes the logits. Files:

  vit_token.safetensors / vit_token.pth   class token, `global_pool='token'` (plain state dict)
  vit_avg.safetensors                     class token, `global_pool='avg'` with `fc_norm`
  vit_avg_nocls.safetensors               no class token, `global_pool='avg'`
  deit3_ls.safetensors                    LayerScale (`ls1`/`ls2`) and `no_embed_class`
  deit_distilled.pth                      DeiT distilled (`dist_token`, `head_dist`), saved as DeiT ships it:
                                          `{'model': state_dict, 'epoch': .., 'args': argparse.Namespace}`
  bv_gap.npz, bv_token.npz                big_vision naming (`params/...`), checked here to load into timm
                                          with timm's own big_vision loader (`_load_weights`)
  wrn_mixturegrowth.pth                   a WRN-10-0.5 in the MixtureGrowth code's naming (`conv_stem`,
                                          `group_{g}.{b}.bn1`, `last_act.0`, `fc`), BatchNorm running stats
  views.pth                               tensors sharing one storage (transposed, strided), fp16, bf16, 0-d
  vit_token_jaxlab.pth                    written by jaxlab without torch: `vit_token.safetensors` imported
                                          and exported with `config.out=*.pth`; checked here to load with
                                          `torch.load(weights_only=True)` bitwise and into timm with the
                                          reference logits (tests compare jaxlab's export with it)
  reference.npz                           inputs `x16` [2,3,16,16] and `x24` [2,3,24,24] and each
                                          model's eval logits `logits_<name>`; `vit_token` resampled to 24x24
                                          by timm (`pos_embed_24`, `logits_vit_token_24`)

Runs offline in a few seconds; the files total well under 1 MB.
"""

from __future__ import annotations

import argparse
import os

import numpy as np
import safetensors.torch
import timm
import torch
from timm.models import deit, vision_transformer
from torch import nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "tests", "fixtures", "timm")
TINY = dict(img_size=16, patch_size=8, embed_dim=24, depth=2, num_heads=2, mlp_ratio=2.0, num_classes=5)


def randomize(model: nn.Module, seed: int) -> nn.Module:
  """Redraws every parameter and buffer: weights N(0, 0.3^2) (convs N(0, 2 / fan_in)), norm scales 1 + N(0, 0.1^2)."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=g)
      is_gain = name.endswith(".weight") and p.ndim == 1
      std = (2.0 / p[0].numel()) ** 0.5 if p.ndim == 4 else 0.3  # convs: He scale, so WRN logits stay O(1)
      p.copy_(1.0 + 0.1 * noise if is_gain else std * noise)
    for name, b in model.named_buffers():
      if name.endswith("running_mean"):
        b.copy_(0.1 * torch.randn(b.shape, generator=g))
      elif name.endswith("running_var"):
        b.copy_(0.5 + torch.rand(b.shape, generator=g))
  return model.eval()


def timm_vit(seed: int, distilled: bool = False, **kw) -> nn.Module:
  cls = deit.VisionTransformerDistilled if distilled else vision_transformer.VisionTransformer
  return randomize(cls(**{**TINY, **kw}), seed)


def logits(model: nn.Module, x: np.ndarray) -> np.ndarray:
  with torch.no_grad():
    return model(torch.from_numpy(x)).numpy()


def big_vision_npz(model: nn.Module, token: bool) -> dict[str, np.ndarray]:
  """A timm ViT's weights in big_vision's ViT naming (scan off: `encoderblock_{i}`, heads split)."""
  sd = {k: v.numpy() for k, v in model.state_dict().items()}
  d, h = TINY["embed_dim"], TINY["num_heads"]
  out = {
    "embedding/kernel": sd["patch_embed.proj.weight"].transpose(2, 3, 1, 0),
    "embedding/bias": sd["patch_embed.proj.bias"],
    "pos_embedding": sd["pos_embed"],
    "Transformer/encoder_norm/scale": sd["norm.weight"],
    "Transformer/encoder_norm/bias": sd["norm.bias"],
    "head/kernel": sd["head.weight"].T,
    "head/bias": sd["head.bias"],
  }
  if token:
    out["cls"] = sd["cls_token"]
  for i in range(TINY["depth"]):
    s, t = f"blocks.{i}.", f"Transformer/encoderblock_{i}/"
    for j, ln in enumerate(("norm1", "norm2")):
      out[f"{t}LayerNorm_{j}/scale"], out[f"{t}LayerNorm_{j}/bias"] = sd[s + ln + ".weight"], sd[s + ln + ".bias"]
    qkv_w = sd[s + "attn.qkv.weight"].reshape(3, h, d // h, d)
    qkv_b = sd[s + "attn.qkv.bias"].reshape(3, h, d // h)
    mha = t + "MultiHeadDotProductAttention_0/"
    for j, n in enumerate(("query", "key", "value")):
      out[f"{mha}{n}/kernel"] = qkv_w[j].transpose(2, 0, 1)
      out[f"{mha}{n}/bias"] = qkv_b[j]
    out[f"{mha}out/kernel"] = sd[s + "attn.proj.weight"].T.reshape(h, d // h, d)
    out[f"{mha}out/bias"] = sd[s + "attn.proj.bias"]
    for j, fc in enumerate(("fc1", "fc2")):
      out[f"{t}MlpBlock_0/Dense_{j}/kernel"] = sd[f"{s}mlp.{fc}.weight"].T
      out[f"{t}MlpBlock_0/Dense_{j}/bias"] = sd[f"{s}mlp.{fc}.bias"]
  return {"params/" + k: np.ascontiguousarray(v) for k, v in out.items()}


class _WrnBlock(nn.Module):
  """Pre-activation basic block named as the MixtureGrowth code names it (bn1, conv1, [bn2], conv2, shortcut)."""

  def __init__(self, cin: int, cout: int, stride: int):
    super().__init__()
    self.bn1 = nn.BatchNorm2d(cin)
    self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
    self.bn2 = nn.Identity()
    self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
    self.shortcut = nn.Conv2d(cin, cout, 1, stride, bias=False) if cin != cout else None

  def forward(self, x):
    pre = torch.relu(self.bn1(x))
    out = self.conv2(torch.relu(self.bn2(self.conv1(pre))))
    return out + (self.shortcut(pre) if self.shortcut is not None else x)


class _Wrn(nn.Module):
  """WRN-(6n+4)-k with the MixtureGrowth code's module names: conv_stem, group_{1,2,3}, last_act, fc."""

  def __init__(self, depth: int, width: float, num_classes: int):
    super().__init__()
    dims = [16, int(16 * width), int(32 * width), int(64 * width)]
    n = (depth - 4) // 6
    self.conv_stem = nn.Conv2d(3, dims[0], 3, 1, 1, bias=False)
    for g, stride in zip((1, 2, 3), (1, 2, 2)):
      setattr(
        self,
        f"group_{g}",
        nn.Sequential(
          *[_WrnBlock(dims[g - 1] if b == 0 else dims[g], dims[g], stride if b == 0 else 1) for b in range(n)]
        ),
      )
    self.last_act = nn.Sequential(nn.BatchNorm2d(dims[3]), nn.ReLU())
    self.fc = nn.Linear(dims[3], num_classes)

  def forward(self, x):
    x = self.group_3(self.group_2(self.group_1(self.conv_stem(x))))
    return self.fc(self.last_act(x).mean(dim=(2, 3)))


def export_pth(source: str, out: str) -> None:
  """jaxlab's import of `source` and its export job to the PyTorch state dict `out` (no torch involved)."""
  import tempfile

  import ml_collections

  from jaxlab import checkpoint
  from jaxlab.interop import jobs

  with tempfile.TemporaryDirectory() as tmp:
    imp = jobs.import_file(source, num_heads=TINY["num_heads"])
    checkpoint.save_weights(os.path.join(tmp, "ckpt"), 0, imp.theta, imp.meta, imp.model_state)
    if os.path.exists(out):
      os.remove(out)
    cfg = ml_collections.ConfigDict(dict(checkpoint=os.path.join(tmp, "ckpt"), format="timm", out=out))
    jobs.run_export(cfg, os.path.join(tmp, "export"))


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default=OUT)
  args = parser.parse_args()
  os.makedirs(args.out, exist_ok=True)
  rng = np.random.default_rng(0)
  ref = {f"x{s}": rng.standard_normal((2, 3, s, s)).astype(np.float32) for s in (16, 24)}

  def save_st(name, model):
    safetensors.torch.save_file(model.state_dict(), os.path.join(args.out, f"{name}.safetensors"))

  models = {
    "vit_token": timm_vit(1, global_pool="token"),
    "vit_avg": timm_vit(2, global_pool="avg"),
    "vit_avg_nocls": timm_vit(3, global_pool="avg", class_token=False),
    "deit3_ls": timm_vit(4, global_pool="token", init_values=0.1, no_embed_class=True),
    "deit_distilled": timm_vit(5, distilled=True),
  }
  for name, model in models.items():
    ref[f"logits_{name}"] = logits(model, ref["x16"])
  for name in ("vit_token", "vit_avg", "vit_avg_nocls", "deit3_ls"):
    save_st(name, models[name])
  torch.save(models["vit_token"].state_dict(), os.path.join(args.out, "vit_token.pth"))
  deit_args = argparse.Namespace(model="deit_tiny_distilled_patch16_224", lr=5e-4, distillation_type="hard")
  torch.save(
    {"model": models["deit_distilled"].state_dict(), "epoch": 299, "args": deit_args},
    os.path.join(args.out, "deit_distilled.pth"),
  )

  # timm's own position-embedding resampling to 24x24 images (3x3 grid), and the logits there.
  big = vision_transformer.VisionTransformer(**{**TINY, "img_size": 24}).eval()
  sd = vision_transformer.checkpoint_filter_fn(models["vit_token"].state_dict(), big)
  big.load_state_dict(sd)
  ref["pos_embed_24"] = sd["pos_embed"].numpy()
  ref["logits_vit_token_24"] = logits(big, ref["x24"])

  # big_vision naming, verified with timm's big_vision loader.
  for name, token in (("bv_gap", False), ("bv_token", True)):
    kw = (
      dict(global_pool="token", no_embed_class=True)
      if token
      else dict(global_pool="avg", class_token=False, fc_norm=False)
    )
    model = timm_vit(6 + token, **kw)
    path = os.path.join(args.out, f"{name}.npz")
    np.savez(path, **big_vision_npz(model, token))
    check = vision_transformer.VisionTransformer(**{**TINY, **kw}).eval()
    vision_transformer._load_weights(check, path)
    for k, v in model.state_dict().items():
      assert torch.equal(v, check.state_dict()[k]), f"big_vision naming of {k} does not load in timm"
    ref[f"logits_{name}"] = logits(check, ref["x16"])

  wrn = randomize(_Wrn(10, 0.5, 5), 8)
  torch.save(wrn.state_dict(), os.path.join(args.out, "wrn_mixturegrowth.pth"))
  ref["logits_wrn_mixturegrowth"] = logits(wrn, ref["x16"])

  # torch.save corner cases for the reader: views sharing one storage (transposed, strided slice), fp16,
  # bf16 and a 0-d tensor; reference.npz holds their float32 values (`views_<name>`).
  g = torch.Generator().manual_seed(9)
  base = torch.randn(4, 6, generator=g)
  views = {
    "base": base,
    "transposed": base.t(),
    "strided": base[1:, ::2],
    "fp16": base.half(),
    "bf16": base.bfloat16(),
    "scalar": torch.tensor(3.5),
  }
  torch.save(views, os.path.join(args.out, "views.pth"))
  ref.update({f"views_{k}": v.float().numpy() for k, v in views.items()})

  export_pth(os.path.join(args.out, "vit_token.safetensors"), os.path.join(args.out, "vit_token_jaxlab.pth"))
  check = timm.create_model(
    "vit_tiny_patch16_224",
    pretrained=True,
    pretrained_cfg_overlay=dict(file=os.path.join(args.out, "vit_token_jaxlab.pth"), num_classes=5),
    **{**TINY, "global_pool": "token"},
  ).eval()
  assert np.array_equal(logits(check, ref["x16"]), ref["logits_vit_token"]), "timm: jaxlab's .pth, other logits"
  loaded = torch.load(os.path.join(args.out, "vit_token_jaxlab.pth"), weights_only=True)
  original = models["vit_token"].state_dict()
  assert sorted(loaded) == sorted(original), "jaxlab's .pth: other keys"
  for k, v in original.items():
    assert loaded[k].dtype == v.dtype and loaded[k].shape == v.shape and torch.equal(loaded[k], v), k

  np.savez(os.path.join(args.out, "reference.npz"), **ref)
  total = sum(os.path.getsize(os.path.join(args.out, f)) for f in os.listdir(args.out))
  print(
    f"wrote {len(os.listdir(args.out))} files, {total / 1e3:.0f} kB, timm {timm.__version__}, "
    f"torch {torch.__version__} to {args.out}"
  )


if __name__ == "__main__":
  main()
