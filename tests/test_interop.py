"""Import / export of timm, PyTorch and big_vision checkpoints (jaxlab.interop), against the real timm's logits.

The fixtures under tests/fixtures/timm/ were made with timm 1.0.31 by tools/make_timm_fixtures.py (tiny random
models, 16x16 images); no test needs torch or timm.
"""

from __future__ import annotations

import json
import os
import pickle
import warnings
import zipfile

import jax
import numpy as np
import pytest
from conftest import ROOT, run_main
from safetensors.numpy import load_file, save_file

from jaxlab import build, checkpoint, trees
from jaxlab.interop import jobs, names, readers, resample

FIX = os.path.join(ROOT, "tests", "fixtures", "timm")
REF = np.load(os.path.join(FIX, "reference.npz"))

# file, reference logits, what it exercises
FIXTURES = [
  ("vit_token.safetensors", "vit_token"),  # class token, token pooling
  ("vit_token.pth", "vit_token"),  # the same as a torch.save zip archive
  ("vit_avg.safetensors", "vit_avg"),  # class token, average pooling with fc_norm
  ("vit_avg_nocls.safetensors", "vit_avg_nocls"),
  ("deit3_ls.safetensors", "deit3_ls"),  # LayerScale, no_embed_class
  ("deit_distilled.pth", "deit_distilled"),  # {'model': sd, 'args': Namespace}, dist_token, head_dist
  ("bv_gap.npz", "bv_gap"),  # big_vision naming, GAP
  ("bv_token.npz", "bv_token"),  # big_vision naming, class token outside pos_embedding
  ("wrn_mixturegrowth.pth", "wrn_mixturegrowth"),  # MixtureGrowth WRN, BatchNorm running stats
]


def _apply(model_cfg, num_classes, theta, model_state, x_nchw):
  module = build.model(model_cfg, num_classes)
  return np.asarray(module.apply({"params": theta, **model_state}, np.transpose(x_nchw, (0, 2, 3, 1))))


def _logits(imp: jobs.Imported, x):
  return _apply(imp.meta["model"], imp.meta["data"]["num_classes"], imp.theta, imp.model_state, x)


def _import(name, **kw):
  kw.setdefault("num_heads", 2)
  return jobs.import_file(os.path.join(FIX, name), **kw)


@pytest.mark.parametrize("name,ref", FIXTURES, ids=[f[0] for f in FIXTURES])
def test_imported_logits_equal_timm(name, ref):
  imp = _import(name)
  out = _logits(imp, REF["x16"])
  assert out.dtype == np.float32
  assert np.abs(out - REF[f"logits_{ref}"]).max() <= 1e-5
  prov = imp.meta["provenance"]["import"]
  assert prov["sha256"] == readers.sha256(os.path.join(FIX, name))
  assert imp.meta["preprocessing"]["image_size"] == ([32, 32] if "wrn" in name else [16, 16])  # WRN: CIFAR size


def test_inferred_configs():
  cases = {
    "vit_token.safetensors": dict(pool="cls", final_norm="tokens", class_token=True, no_embed_class=False),
    "vit_avg.safetensors": dict(pool="gap", final_norm="pooled", class_token=True),
    "vit_avg_nocls.safetensors": dict(pool="gap", final_norm="pooled", class_token=False),
    "deit3_ls.safetensors": dict(pool="cls", no_embed_class=True, layer_scale=1e-5),
    "deit_distilled.pth": dict(pool="cls", distilled=True),
    "bv_token.npz": dict(pool="cls", no_embed_class=True),
  }
  for name, want in cases.items():
    model = _import(name).meta["model"]
    assert {k: model[k] for k in want} == want, name
    assert (model["width"], model["depth"], model["patch_size"], model["mlp_dim"]) == (24, 2, 8, 48)
  wrn = _import("wrn_mixturegrowth.pth").meta["model"]
  assert wrn == dict(name="wrn", depth=10, widen_factor=0.5, stem_width=16, mid_bn=False, head_bias=True)


def test_heads_default_to_width_over_64_and_else_must_be_given():
  with pytest.raises(ValueError, match=r"width 24 is not a multiple of the usual head size 64; give config.num_heads"):
    jobs.import_file(os.path.join(FIX, "vit_token.safetensors"))


def test_torch_zip_and_safetensors_read_the_same_tensors():
  with (
    readers.open_source(os.path.join(FIX, "vit_token.safetensors")) as a,
    readers.open_source(os.path.join(FIX, "vit_token.pth")) as b,
  ):
    assert sorted(a.keys()) == sorted(b.keys())
    for k in a.keys():
      x, y = a.get(k), b.get(k)
      assert x.dtype == y.dtype and x.shape == y.shape and np.array_equal(x, y), k


def test_torch_reader_never_runs_code_from_the_pickle(tmp_path):
  """A pickle that calls os.system when unpickled normally: our reader resolves no such global."""
  marker = tmp_path / "pwned"

  class Evil:
    def __reduce__(self):
      return (os.system, (f"touch {marker}",))

  path = tmp_path / "evil.pth"
  with zipfile.ZipFile(path, "w") as z:
    z.writestr("evil/data.pkl", pickle.dumps({"model": Evil(), "x": Evil()}, protocol=2))
  with pytest.raises(readers.ReadError, match="no state dict found"):
    readers.open_source(str(path))
  assert not marker.exists()


def test_resampled_position_embeddings_equal_timm():
  pe = readers.open_source(os.path.join(FIX, "vit_token.safetensors")).get("pos_embed")
  assert np.abs(resample.resample_pos_embed(pe, 1, (2, 2), (3, 3)) - REF["pos_embed_24"]).max() < 1e-6
  imp = _import("vit_token.safetensors", image_size=24)
  assert imp.meta["data"]["input_shape"] == [24, 24, 3]
  assert imp.meta["provenance"]["import"]["resampled_pos_embed"] == {"from": [2, 2], "to": [3, 3], "method": "bicubic"}
  assert np.abs(_logits(imp, REF["x24"]) - REF["logits_vit_token_24"]).max() <= 1e-5


def test_resampling_to_the_same_grid_is_the_identity_and_big_vision_zoom_keeps_corners():
  grid = np.random.default_rng(0).standard_normal((3, 3, 4)).astype(np.float32)
  assert np.array_equal(resample.resample_grid(grid, (3, 3)), grid)
  up = resample.resample_grid(grid, (5, 5), "big_vision")
  assert np.allclose(up[[0, 0, -1, -1], [0, -1, 0, -1]], grid[[0, 0, -1, -1], [0, -1, 0, -1]], atol=1e-6)
  # a constant grid stays constant under the antialiased bicubic weights (they sum to one)
  assert np.allclose(resample.resample_grid(np.ones((4, 4, 2), np.float32), (7, 3)), 1.0, atol=1e-6)


def _save(imp: jobs.Imported, workdir) -> checkpoint.Loaded:
  checkpoint.save_weights(str(workdir), 0, imp.theta, imp.meta, imp.model_state)
  return checkpoint.load(str(workdir))


@pytest.mark.parametrize(
  "name", ["vit_token.safetensors", "vit_avg.safetensors", "deit3_ls.safetensors", "deit_distilled.pth"]
)
def test_export_has_exactly_timm_keys_shapes_and_values(name, tmp_path):
  loaded = _save(_import(name), tmp_path / "ckpt")
  tensors, metadata = jobs.export_tensors(loaded, "timm")
  with readers.open_source(os.path.join(FIX, name)) as src:
    assert sorted(tensors) == sorted(src.keys())
    for k in src.keys():
      ref = src.get(k)
      assert tensors[k].shape == ref.shape and tensors[k].dtype == ref.dtype and np.array_equal(tensors[k], ref), k
  kw = json.loads(metadata["timm_kwargs"])
  assert kw["embed_dim"] == 24 and kw["depth"] == 2 and kw["img_size"] == 16


def test_export_then_import_round_trips_bitwise(tmp_path):
  imp = _import("deit3_ls.safetensors")
  loaded = _save(imp, tmp_path / "a")
  out = tmp_path / "x.safetensors"
  tensors, metadata = jobs.export_tensors(loaded, "timm")
  jobs.write_safetensors(tensors, str(out), metadata)
  again = jobs.import_file(str(out), num_heads=2)
  assert again.meta["model"] == imp.meta["model"]
  for a, b in zip(jax.tree.leaves(imp.theta), jax.tree.leaves(again.theta)):
    assert a.dtype == b.dtype and np.array_equal(a, b)
  assert trees.flatten(imp.theta).keys() == trees.flatten(again.theta).keys()


def test_host_load_gives_the_same_bits_as_numpy_arrays(tmp_path):
  """checkpoint.load(host=True) (what the export job uses): numpy arrays equal bit for bit to the default
  load's jax arrays, params and batch stats alike, and the same logits; host=True with a sharding is refused."""
  for name, workdir in (("deit3_ls.safetensors", tmp_path / "vit"), ("wrn_mixturegrowth.pth", tmp_path / "wrn")):
    on_device = _save(_import(name), workdir)
    on_host = checkpoint.load(str(workdir), host=True)
    a = trees.flatten({"theta": on_device.theta, "state": on_device.model_state})
    b = trees.flatten({"theta": on_host.theta, "state": on_host.model_state})
    assert a.keys() == b.keys() and any(k.startswith("state/") for k in b) == (name.endswith(".pth"))
    for k in a:
      assert type(b[k]) is np.ndarray and b[k].dtype == a[k].dtype and np.array_equal(np.asarray(a[k]), b[k]), k
    x = np.random.default_rng(0).standard_normal((2, *on_host.meta["data"]["input_shape"])).astype(np.float32)
    assert np.array_equal(np.asarray(on_device.apply(x)), np.asarray(on_host.apply(x)))
  with pytest.raises(ValueError, match="either sharding or host=True"):
    checkpoint.load(str(tmp_path / "vit"), sharding=jax.sharding.SingleDeviceSharding(jax.devices()[0]), host=True)
  # weights that do not fit the model in meta (one more class): refused on the host as on the device
  meta_dir = tmp_path / "vit" / "checkpoints" / "0" / "meta"
  meta_file = next(f for f in meta_dir.iterdir() if not f.name.startswith("_"))
  meta = json.loads(meta_file.read_text())
  meta["data"]["num_classes"] += 1
  meta_file.write_text(json.dumps(meta))
  for host in (False, True):
    with pytest.raises(checkpoint.CheckpointReadError, match="weights do not match the model its meta describes"):
      checkpoint.load(str(tmp_path / "vit"), host=host)
  with pytest.raises(checkpoint.CheckpointReadError, match=r"shape of theta/head/bias: model \[6\], stored \[5\]"):
    checkpoint.load(str(tmp_path / "vit"), host=True)


def test_lowrank_model_is_refused_for_timm_and_round_trips_as_jaxlab_state_dict(tmp_path):
  from jaxlab import transforms

  loaded = _save(_import("vit_token.safetensors"), tmp_path / "dense")
  out = transforms.apply("lowrank_svd", [loaded], {"rank": 1000})  # capped at full rank: exact
  meta = dict(loaded.meta, **out.meta)
  checkpoint.save_weights(str(tmp_path / "low"), 0, jax.device_get(out.theta), meta, out.model_state)
  low = checkpoint.load(str(tmp_path / "low"))
  # full-rank SVD of the imported model gives timm's logits, up to float32 SVD round-off (U S V^T of a 24x72
  # kernel reconstructs it to ~1e-6 relative; the logits here move by ~1e-5)
  x = np.transpose(REF["x16"], (0, 2, 3, 1))
  assert np.abs(np.asarray(low.apply(x)) - REF["logits_vit_token"]).max() <= 5e-5
  with pytest.raises(ValueError, match="low-rank .* no timm ViT equivalent; export it with config.format=jaxlab"):
    jobs.export_tensors(low, "timm")
  tensors, metadata = jobs.export_tensors(low, "jaxlab")
  assert "theta/blocks/attn/qkv/u" in tensors and tensors["theta/blocks/attn/qkv/u"].shape[0] == 2
  path = tmp_path / "low.safetensors"
  jobs.write_safetensors(tensors, str(path), metadata)
  back = jobs.import_file(str(path))
  assert back.meta["model"] == low.meta["model"]
  for (na, a), (nb, b) in zip(trees.flatten(low.theta).items(), trees.flatten(back.theta).items()):
    assert na == nb and np.array_equal(np.asarray(a), b)


def test_uniform_soup_of_one_imported_model_gives_its_logits(tmp_path):
  from jaxlab import transforms

  loaded = _save(_import("deit_distilled.pth"), tmp_path / "a")
  out = transforms.apply("uniform_soup", [loaded])
  y = _apply(loaded.meta["model"], 5, out.theta, out.model_state, REF["x16"])
  assert np.abs(y - REF["logits_deit_distilled"]).max() <= 1e-5


def test_wrn_import_fills_batch_stats():
  imp = _import("wrn_mixturegrowth.pth")
  stats = trees.flatten(imp.model_state)
  assert "batch_stats/stage1_block0/bn1/mean" in stats and "batch_stats/norm/var" in stats
  with readers.open_source(os.path.join(FIX, "wrn_mixturegrowth.pth")) as src:
    assert np.array_equal(stats["batch_stats/norm/var"], src.get("last_act.0.running_var"))
  assert all(k.endswith("num_batches_tracked") for k in imp.meta["provenance"]["import"]["skipped"])


def _renamed(tmp_path, rename=None, reshape=None) -> str:
  t = load_file(os.path.join(FIX, "vit_token.safetensors"))
  if rename:
    t[rename[1]] = t.pop(rename[0])
  if reshape:
    t[reshape] = np.zeros((7,) + t[reshape].shape[1:], np.float32)
  path = str(tmp_path / "bad.safetensors")
  save_file(t, path)
  return path


def test_mis_named_and_mis_shaped_files_are_refused_with_one_line(tmp_path):
  path = _renamed(tmp_path, rename=("blocks.1.mlp.fc2.bias", "blocks.1.mlp.fc2.b"))
  with pytest.raises(names.NameMapError) as e:
    jobs.import_file(path, num_heads=2)
  msg = str(e.value)
  assert "\n" not in msg
  assert "(1 missing, 1 unexpected, 0 mis-shaped): missing blocks.1.mlp.fc2.bias; unexpected blocks.1.mlp.fc2.b;" in msg
  assert "config.skip_unexpected" in msg and "config.init_missing" in msg
  # a head for another number of classes: refused, unless the head is initialised fresh
  with pytest.raises(names.NameMapError, match=r"shape of head.weight: model \[7, 24\], file \[5, 24\]"):
    _import("vit_token.safetensors", num_classes=7)
  imp = _import("vit_token.safetensors", num_classes=7, init_missing=("params/head/.*",))
  assert imp.theta["head"]["kernel"].shape == (24, 7)
  assert imp.meta["provenance"]["import"]["initialized"] == ["params/head/bias", "params/head/kernel"]


def test_import_and_export_jobs_smoke_and_bad_input_through_main(tmp_path):
  """import.py:smoke and export.py:smoke through `python -m jaxlab.main`; a bad file exits 2, writes nothing."""
  imp_dir, exp_dir = tmp_path / "imp", tmp_path / "exp"
  r = run_main("--config=ml_collections_configs/import.py:smoke", f"--workdir={imp_dir}")
  assert r.returncode == 0, r.stderr[-2000:]
  meta = checkpoint.load_meta(str(imp_dir))
  assert meta["preprocessing"] == {
    "image_size": [16, 16],
    "mean": [0.485, 0.456, 0.406],
    "std": [0.229, 0.224, 0.225],
    "interpolation": "bicubic",
    "crop_pct": 0.875,
  }
  assert meta["provenance"]["import"]["family"] == "timm_vit"
  out = tmp_path / "out.safetensors"
  r = run_main(
    "--config=ml_collections_configs/export.py:smoke",
    f"--config.checkpoint={imp_dir}",
    f"--config.out={out}",
    f"--workdir={exp_dir}",
  )
  assert r.returncode == 0, r.stderr[-2000:]
  a, b = load_file(str(out)), load_file(os.path.join(FIX, "vit_token.safetensors"))
  assert sorted(a) == sorted(b) and all(np.array_equal(a[k], b[k]) for k in a)

  bad = _renamed(tmp_path, reshape="blocks.0.attn.qkv.weight")
  before = readers.sha256(bad)
  r = run_main(
    "--config=ml_collections_configs/import.py",
    f"--config.source={bad}",
    "--config.num_heads=2",
    f"--workdir={tmp_path / 'bad_out'}",
  )
  assert r.returncode == 2
  errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
  assert len(errors) == 1 and "shape of blocks.0.attn.qkv.weight: model [72, 24], file [7, 24]" in errors[0]
  assert not (tmp_path / "bad_out").exists() and readers.sha256(bad) == before


def test_mixturegrowth_transform_runs_on_an_imported_official_wrn(tmp_path):
  """grow_net2net (function preserving) on a WRN in the MixtureGrowth code's naming keeps its logits."""
  from jaxlab import transforms

  loaded = _save(_import("wrn_mixturegrowth.pth"), tmp_path / "wrn")
  out = transforms.apply("grow_net2net", [loaded])
  assert out.meta["model"]["widen_factor"] == 1.0 and out.meta["model"]["stem_width"] == 32
  y = _apply(out.meta["model"], 5, out.theta, out.model_state, REF["x16"])
  assert np.abs(y - REF["logits_wrn_mixturegrowth"]).max() <= 1e-5


def test_imported_model_on_tfds_images_of_varied_sizes_with_the_preprocessing_in_its_meta(tmp_path):
  """Mock tf_flowers images (5 classes, varied sizes) through the data layer, preprocessed as the meta says."""
  tfds = pytest.importorskip("tensorflow_datasets")
  import math

  import jax.numpy as jnp
  from PIL import Image

  from jaxlab import data, train

  loaded = _save(_import("vit_avg.safetensors"), tmp_path / "m")
  cfg = {"name": "tfds", "tfds_name": "tf_flowers", "split_map": {"train": "train", "test": "train"}}
  with tfds.testing.mock_data(num_examples=6):
    raw = tfds.data_source("tf_flowers", split="train")
    images = [np.asarray(raw[i]["image"]) for i in range(6)]
    labels = np.array([int(raw[i]["label"]) for i in range(6)])
    metrics = train.evaluate_checkpoint(loaded.path, "test", 3, data_cfg=cfg)
    ds = data.get_dataset(cfg, loaded.meta)
    batch = next(ds.eval_batches("test", 6))
  assert len({im.shape[:2] for im in images}) > 1  # the mock images really vary in size
  assert ds.input_shape == (16, 16, 3) and ds.num_classes == 5
  # eval transform as timm's for crop_pct 0.875: shorter side to floor(16 / 0.875) = 18 (PIL bicubic), center 16
  h, w = images[0].shape[:2]
  short = math.floor(16 / 0.875)
  nh, nw = (short, int(w * short / h)) if h <= w else (int(h * short / w), short)  # torchvision Resize(int)
  resized = np.asarray(Image.fromarray(images[0]).resize((nw, nh), Image.BICUBIC))
  top, left = round((nh - 16) / 2), round((nw - 16) / 2)
  np.testing.assert_array_equal(batch["inputs"][0], resized[top : top + 16, left : left + 16])
  x = np.asarray(ds.device_preprocess({"inputs": jnp.asarray(batch["inputs"])})["inputs"])
  mean, std = np.array(loaded.meta["preprocessing"]["mean"]), np.array(loaded.meta["preprocessing"]["std"])
  np.testing.assert_allclose(x, (batch["inputs"] / 255.0 - mean) / std, rtol=1e-5, atol=1e-5)
  logits = np.asarray(loaded.apply(x))
  assert metrics["count"] == 6
  assert sorted(batch["label"].tolist()) == sorted(labels.tolist())
  assert metrics["accuracy"] == pytest.approx(float(np.mean(logits.argmax(-1) == batch["label"])))


def test_fine_tuning_starts_from_an_imported_model_with_its_preprocessing(tmp_path, tiny):
  """`init_from` an imported checkpoint on mock tfds images; at lr 0 the trained weights are the imported ones."""
  tfds = pytest.importorskip("tensorflow_datasets")
  import ml_collections

  from jaxlab import train

  loaded = _save(_import("deit3_ls.safetensors"), tmp_path / "imported")
  cfg = tiny(steps=2)
  cfg.model = ml_collections.ConfigDict(loaded.meta["model"])
  cfg.data.name, cfg.data.tfds_name = "tfds", "tf_flowers"
  cfg.data.split_map = {"train": "train", "validation": "train", "test": "train"}
  cfg.data.batch_size, cfg.data.eval_batch_size = 4, 4
  cfg.optimizer.lr, cfg.optimizer.weight_decay = 0.0, 0.0
  cfg.init_from.path = str(tmp_path / "imported")
  with tfds.testing.mock_data(num_examples=8):
    summary = train.train_and_evaluate(cfg, str(tmp_path / "ft"))
  assert summary["steps"] == 2
  tuned = checkpoint.load(str(tmp_path / "ft"))
  assert tuned.meta["provenance"]["init_from"] == str(tmp_path / "imported")
  assert tuned.meta["data"]["input_shape"] == [16, 16, 3]  # the imported model's size, from its meta
  for (na, a), (nb, b) in zip(trees.flatten(loaded.theta).items(), trees.flatten(tuned.theta).items()):
    assert na == nb and np.array_equal(np.asarray(a), np.asarray(b)), na


def test_tleg_learngene_exports_the_network_it_materializes_and_the_gene_as_jaxlab(tmp_path):
  """A TLEG checkpoint: `format=timm` writes the depth-L ViT that A + (l/L) B gives; `format=jaxlab` the gene."""
  imp = _import("vit_token.safetensors")
  meta = dict(imp.meta, parameterization={"name": "linear_learngene"})
  param = build.parameterization(meta["parameterization"], meta["model"])
  theta = jax.device_get(param.init(jax.random.key(0), imp.theta))
  checkpoint.save_weights(str(tmp_path / "tleg"), 0, theta, meta, imp.model_state)
  tleg = checkpoint.load(str(tmp_path / "tleg"))
  assert "learngene" in tleg.theta
  tensors, metadata = jobs.export_tensors(tleg, "timm")
  jobs.write_safetensors(tensors, str(tmp_path / "tleg.safetensors"), metadata)
  back = jobs.import_file(str(tmp_path / "tleg.safetensors"), num_heads=2)
  want = np.asarray(tleg.apply(np.transpose(REF["x16"], (0, 2, 3, 1))))
  assert np.abs(_logits(back, REF["x16"]) - want).max() <= 1e-5
  gene, gmeta = jobs.export_tensors(tleg, "jaxlab")
  assert "theta/learngene/A/attn/qkv/kernel" in gene and gene["theta/learngene/A/attn/qkv/kernel"].shape == (24, 72)
  assert json.loads(gmeta["jaxlab_meta"])["parameterization"]["name"] == "linear_learngene"


def test_bfloat16_safetensors_import_as_float32(tmp_path):
  """bf16 files (numpy has no bfloat16; read through ml_dtypes) become float32 params, values exact."""
  import struct

  import ml_dtypes

  src = load_file(os.path.join(FIX, "vit_token.safetensors"))
  tensors = {k: v.astype(ml_dtypes.bfloat16) for k, v in src.items()}
  header, blobs, offset = {}, [], 0
  for k, v in tensors.items():  # the safetensors layout: u64 header size, JSON header, raw little-endian data
    blob = v.tobytes()
    header[k] = {"dtype": "BF16", "shape": list(v.shape), "data_offsets": [offset, offset + len(blob)]}
    blobs.append(blob)
    offset += len(blob)
  head = json.dumps(header).encode()
  head += b" " * (-len(head) % 8)
  path = tmp_path / "bf16.safetensors"
  path.write_bytes(struct.pack("<Q", len(head)) + head + b"".join(blobs))
  imp = jobs.import_file(str(path), num_heads=2)
  assert imp.meta["provenance"]["import"]["source_dtypes"] == ["bfloat16"]
  kernel = imp.theta["blocks"]["attn"]["qkv"]["kernel"]
  assert kernel.dtype == np.float32
  want = np.stack([tensors[f"blocks.{i}.attn.qkv.weight"].astype(np.float32).T for i in range(2)])
  assert np.array_equal(kernel, want)
  assert np.abs(_logits(imp, REF["x16"]) - REF["logits_vit_token"]).max() < 0.1  # bf16 rounding of the weights


def test_torch_reader_views_sharing_a_storage_half_bfloat16_and_scalars():
  """torch.save keeps views as (storage, offset, shape, strides): each must read as the tensor it was."""
  with readers.open_source(os.path.join(FIX, "views.pth")) as src:
    assert src.dtype("fp16") == np.float16 and src.dtype("bf16").name == "bfloat16"
    for k in ("base", "transposed", "strided", "fp16", "bf16", "scalar"):
      got = src.get(k)
      assert got.shape == REF[f"views_{k}"].shape, k
      assert np.array_equal(got.astype(np.float32), REF[f"views_{k}"]), k


def test_evaluate_job_on_an_imported_model_with_its_recorded_data_set(tmp_path):
  """import.py with data.name/tfds_name records the data set; the evaluate job then needs only the checkpoint."""
  tfds = pytest.importorskip("tensorflow_datasets")
  import importlib.util

  from jaxlab import main

  def config(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "ml_collections_configs", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config("smoke" if name == "import" else None)

  imp = config("import")
  imp.data.name, imp.data.tfds_name = "tfds", "tf_flowers"
  main.run(imp, str(tmp_path / "imported"))
  ev = config("evaluate")
  ev.checkpoint, ev.splits, ev.batch_size = str(tmp_path / "imported"), ("train",), 4
  (tmp_path / "eval").mkdir()
  from jaxlab import data

  meta = checkpoint.load_meta(str(tmp_path / "imported"))
  assert meta["data"]["config"] == {"name": "tfds", "tfds_name": "tf_flowers"}
  with tfds.testing.mock_data(num_examples=10):
    out = main.run(ev, str(tmp_path / "eval"))
    n = data.get_dataset(meta["data"]["config"], meta).num_examples("train")
  report = json.load(open(tmp_path / "eval" / "eval.json"))
  assert report["metrics"]["train"]["count"] == n > 0
  assert 0.0 <= out["train_accuracy"] <= 1.0


def test_a_headless_backbone_needs_a_fresh_head_explicitly(tmp_path):
  t = load_file(os.path.join(FIX, "vit_avg.safetensors"))
  del t["head.weight"], t["head.bias"]
  path = str(tmp_path / "backbone.safetensors")
  save_file(t, path)
  with pytest.raises(ValueError, match=r"no classifier head; set config.num_classes and config.init_missing"):
    jobs.import_file(path, num_heads=2)
  headless = r"\(2 missing, 0 unexpected, 0 mis-shaped\): missing head.weight; missing head.bias;"
  with pytest.raises(names.NameMapError, match=headless):
    jobs.import_file(path, num_heads=2, num_classes=3)
  imp = jobs.import_file(path, num_heads=2, num_classes=3, init_missing="params/head/.*", seed=1)
  assert imp.theta["head"]["kernel"].shape == (24, 3)
  assert np.array_equal(imp.theta["norm"]["scale"], t["fc_norm.weight"])  # fc_norm is jaxlab's pooled norm


def _npz_variant(tmp_path, name, rename) -> str:
  with np.load(os.path.join(FIX, name)) as z:
    t = {k: z[k] for k in z.files}
  path = str(tmp_path / f"variant_{name}")
  np.savez(path, **rename(t))
  return path


def test_big_vision_scanned_blocks_and_augreg_numbering_import_the_same_model(tmp_path):
  """big_vision with scan=True (one `encoderblock` with a depth axis) and AugReg's vit_jax numbering."""

  def scanned(t):
    out = {k: v for k, v in t.items() if "encoderblock_" not in k}
    for k in [k for k in t if "encoderblock_0/" in k]:
      out[k.replace("encoderblock_0/", "encoderblock/")] = np.stack(
        [t[k.replace("encoderblock_0/", f"encoderblock_{i}/")] for i in range(2)]
      )
    return out

  imp = jobs.import_file(_npz_variant(tmp_path, "bv_token.npz", scanned), num_heads=2)
  assert np.abs(_logits(imp, REF["x16"]) - REF["logits_bv_token"]).max() <= 1e-5

  def augreg(t):
    subs = (
      ("LayerNorm_1", "LayerNorm_2"),
      ("MultiHeadDotProductAttention_0", "MultiHeadDotProductAttention_1"),
      ("MlpBlock_0", "MlpBlock_3"),
      ("params/pos_embedding", "params/Transformer/posembed_input/pos_embedding"),
    )
    out = {}
    for k, v in t.items():
      for a, b in subs:
        k = k.replace(a, b)
      out[k] = v
    return out

  imp = jobs.import_file(_npz_variant(tmp_path, "bv_gap.npz", augreg), num_heads=2)
  assert np.abs(_logits(imp, REF["x16"]) - REF["logits_bv_gap"]).max() <= 1e-5


def test_vit_shapes_from_the_config_equal_the_traced_model():
  """The import job's strict check takes a ViT's variable shapes from its config (no tracing): they must be
  exactly what `jax.eval_shape` of the model's init gives, for every ViT variant the readers infer."""
  from jaxlab.interop import vit_maps

  base = dict(name="vit", patch_size=8, width=24, depth=2, num_heads=2, mlp_dim=48, pool="cls", final_norm="tokens")
  variants = [
    dict(),
    dict(pool="gap", final_norm="pooled", class_token=True),
    dict(pool="gap", final_norm="pooled", class_token=False),
    dict(layer_scale=1e-5, no_embed_class=True),
    dict(distilled=True, class_token=True),
    dict(distilled=True, class_token=True, no_embed_class=True),
    dict(depth=1, patch_size=4, mlp_dim=40),
  ]
  for kw in variants:
    for k, shape in ((10, [16, 16, 3]), (0, [16, 16, 3]), (7, [24, 32, 1])):
      module = build.model(dict(base, **kw), k)
      traced = trees.flatten(build.abstract_variables(module, tuple(shape), "float32"))
      ours = vit_maps.vit_param_shapes(module, shape)
      assert {n: (s.shape, s.dtype) for n, s in ours.items()} == {n: (s.shape, s.dtype) for n, s in traced.items()}
  # refused like the model refuses them; other models are traced
  with pytest.raises(ValueError, match="needs model.pool='cls'"):
    vit_maps.vit_param_shapes(build.model(dict(base, pool="gap", distilled=True, class_token=True), 10), [16, 16, 3])
  with pytest.raises(ValueError, match="class_token=False needs"):
    vit_maps.vit_param_shapes(build.model(dict(base, class_token=False), 10), [16, 16, 3])
  assert vit_maps.vit_param_shapes(build.model(dict(base), 10), [16, 3]) is None
  wrn = dict(name="wrn", depth=10, widen_factor=0.5, stem_width=16, mid_bn=False, head_bias=True)
  assert vit_maps.vit_param_shapes(build.model(wrn, 10), [32, 32, 3]) is None


def test_threaded_memory_mapped_conversion_equals_the_sequential_one():
  """import_tree on two threads over the safetensors memory map gives the same arrays as one thread reading
  through `get` (DictSource), 64-byte aligned so that jax aliases them on a CPU."""
  path = os.path.join(FIX, "deit3_ls.safetensors")
  with readers.open_source(path) as src:
    info = jobs.FAMILIES["timm_vit"].infer({k: tuple(src.shape(k)) for k in src.keys()}, dict(num_heads=2))
    entries = jobs.vit_maps.timm_entries(info["model"], info["num_classes"])
    depth = info["model"]["depth"]
    abstract = jobs._abstract(info["model"], info["num_classes"], list(info["input_shape"]))
    shapes = {n: tuple(s.shape) for n, s in abstract.items()}
    threaded = names.import_tree(src, entries, depth, {}, set(), {}, threads=2, shapes=shapes)
  plain = names.import_tree(readers.DictSource(load_file(path)), entries, depth, {}, set(), {}, threads=1)
  assert threaded.keys() == plain.keys()
  for n, a in threaded.items():
    assert a.dtype == plain[n].dtype and np.array_equal(a, plain[n]), n
    assert a.ctypes.data % 64 == 0 and a.flags.c_contiguous, n
  big = threaded["params/blocks/mlp/fc1/kernel"]
  assert jax.device_put(big).unsafe_buffer_pointer() == big.ctypes.data


def _floats_with_specials(shape, seed: int) -> np.ndarray:
  """Random float32 with signalling and quiet NaNs (with payloads), denormals, -0 and infinities mixed in."""
  rng = np.random.default_rng(seed)
  bits = rng.standard_normal(shape).astype(np.float32).view(np.uint32)
  special = [0x7F800001, 0xFFA00123, 0x7FC12345, 0x00000001, 0x807FFFFF, 0x80000000, 0x7F800000, 0xFF800000]
  flat = bits.reshape(-1)
  flat[rng.choice(flat.size, 4 * len(special), replace=False)] = np.resize(np.array(special, np.uint32), 32)
  return bits.view(np.float32)


@pytest.mark.parametrize("blas", [True, False])
def test_transposed_copies_keep_every_bit(blas, monkeypatch):
  """copy_into of a transposed view (BLAS somatcopy, or numpy's 128 x 128 tiles) gives numpy's transpose bit
  for bit, signalling NaNs and denormals included; a BLAS transpose that is not exact is not used."""
  if not blas:
    monkeypatch.setattr(names, "_SOMATCOPY", [None])
  for shape in ((300, 260), (2304, 768), (1, 70000)):
    for src in (np.random.default_rng(0).standard_normal(shape).astype(np.float32), _floats_with_specials(shape, 1)):
      dst = names.aligned_empty(shape[::-1], np.float32)
      names.copy_into(dst, src.T)
      assert np.array_equal(dst.view(np.uint32), src.T.view(np.uint32)), shape
  # float16 -> float32 and other dtypes take numpy's tiles (casting)
  half = np.random.default_rng(2).standard_normal((400, 300)).astype(np.float16)
  assert np.array_equal(names.copy_into(np.empty((300, 400), np.float32), half.T), half.T.astype(np.float32))
  if blas:
    somatcopy = names._load_somatcopy()
    if somatcopy is None:
      pytest.skip("numpy here bundles no OpenBLAS with cblas_somatcopy64_")
    # why the NaN check exists: OpenBLAS (0.3.x) computes 1.0 * x, which makes a signalling NaN quiet
    snan = np.array([[0x7F800001, 0x3F800000]], np.uint32).view(np.float32)
    raw = np.zeros((2, 1), np.float32)
    somatcopy(raw, snan)
    assert raw.view(np.uint32)[0, 0] in (0x7FC00001, 0x7F800001) and raw.view(np.uint32)[1, 0] == 0x3F800000
    with warnings.catch_warnings():
      warnings.simplefilter("error")  # and no RuntimeWarning from the NaN check
      assert names.transpose_into(raw, snan) and raw.view(np.uint32)[0, 0] == 0x7F800001
    monkeypatch.setenv("JAXLAB_NUMPY_TRANSPOSE", "1")
    assert names._load_somatcopy() is None
    # a transpose that flushes denormals (as on a thread in flush-to-zero mode) fails the probe: numpy instead
    def flushing(dst, src):
      dst[...] = np.where(np.abs(src.T) < np.finfo(np.float32).tiny, np.float32(0), src.T)

    monkeypatch.setattr(names, "_SOMATCOPY", [flushing])
    src = _floats_with_specials((300, 260), 3)
    dst = np.empty((260, 300), np.float32)
    assert not names.transpose_into(dst, src)
    assert np.array_equal(names.copy_into(dst, src.T).view(np.uint32), src.T.view(np.uint32))


def test_aligned_empty_gives_aligned_writable_arrays_that_jax_aliases():
  for shape, dtype in (((3, 5), "float32"), ((7,), "float16"), ((12, 768, 2304), "float32"), ((600, 1000), "bfloat16")):
    dtype = np.dtype(jax.numpy.dtype(dtype))
    a = names.aligned_empty(shape, dtype)
    assert a.shape == shape and a.dtype == dtype and a.flags.c_contiguous and a.flags.writeable
    assert a.ctypes.data % (4096 if a.nbytes >= 1 << 20 else 64) == 0
    a[...] = 1
    assert float(a.astype(np.float32).sum()) == a.size
  big = names.aligned_empty((1024, 1024), np.float32)
  big[...] = np.arange(big.size, dtype=np.float32).reshape(big.shape)
  on_device = jax.device_put(big)
  assert on_device.unsafe_buffer_pointer() == big.ctypes.data
  assert np.array_equal(np.asarray(on_device), big)


def test_import_tree_refuses_a_conversion_of_another_shape():
  """With the model's shapes given, a converted layer of another shape is refused naming the leaf and both
  shapes (not broadcast into the output)."""
  src = readers.DictSource({"blocks.0.w": np.ones((3, 5), np.float32), "blocks.1.w": np.ones((3, 5), np.float32)})
  entry = names.Entry("blocks/w", ("blocks.{i}.w",), names.LINEAR, stacked=True)
  with pytest.raises(names.NameMapError, match=r"converted tensors do not fit the model: shape of params/blocks/w "
                     r"\(one layer\): model \[5, 1\], converted \[5, 3\]; check config.num_heads"):
    names.import_tree(src, [entry], 2, {}, set(), {}, shapes={"params/blocks/w": (2, 5, 1)})
  out = names.import_tree(src, [entry], 2, {}, set(), {}, shapes={"params/blocks/w": (2, 5, 3)})
  assert out["params/blocks/w"].shape == (2, 5, 3) and np.all(out["params/blocks/w"] == 1)


def test_permutation_conversions_give_the_traced_foreign_shapes():
  """`Conversion.axes` (shapes without tracing) agrees with `jax.eval_shape` of `to_theirs` and inverts
  `to_ours`."""
  for conv, shape in ((names.SAME, (7, 5)), (names.LINEAR, (7, 5)), (names.CONV, (2, 3, 4, 5))):
    traced = [tuple(s.shape) for s in jax.eval_shape(conv.to_theirs, jax.ShapeDtypeStruct(shape, np.float32))]
    assert conv.theirs_shapes(shape, np.float32) == traced
    x = np.arange(np.prod(shape), dtype=np.float32).reshape(shape)
    assert np.array_equal(conv.to_ours(conv.to_theirs(x)), x)
  assert names.LINEAR.theirs_shapes((7, 5), np.float32) == [(5, 7)]
  assert names.CONV.theirs_shapes((2, 3, 4, 5), np.float32) == [(5, 4, 2, 3)]


def test_pth_export_equals_the_fixture_torch_and_timm_loaded(tmp_path):
  """The export job with config.out=*.pth writes, without torch, exactly the archive that
  tools/make_timm_fixtures.py loaded with torch.load(weights_only=True) (bitwise timm's state dict) and into
  timm (timm's logits): same entries, pickle and storages, each storage 64-byte aligned; it reads back as the
  timm file and re-imports bitwise."""
  import ml_collections

  imp = _import("vit_token.safetensors")
  checkpoint.save_weights(str(tmp_path / "ckpt"), 0, imp.theta, imp.meta, imp.model_state)
  out = tmp_path / "vit_token_jaxlab.pth"  # the fixture's name: the archive's folder is named after the file
  cfg = dict(checkpoint=str(tmp_path / "ckpt"), format="timm", out=str(out))
  jobs.run_export(ml_collections.ConfigDict(cfg), str(tmp_path / "export"))
  fixture = os.path.join(FIX, "vit_token_jaxlab.pth")
  with zipfile.ZipFile(out) as ours, zipfile.ZipFile(fixture) as ref:
    assert ours.namelist() == ref.namelist()
    assert "vit_token_jaxlab/data.pkl" in ours.namelist() and "vit_token_jaxlab/byteorder" in ours.namelist()
    for info in ours.infolist():
      assert info.compress_type == zipfile.ZIP_STORED and ours.read(info) == ref.read(info.filename), info.filename
  raw = out.read_bytes()
  with zipfile.ZipFile(out) as ours:
    for info in ours.infolist():
      name_len, extra_len = np.frombuffer(raw[info.header_offset + 26 : info.header_offset + 30], "<u2")
      assert (info.header_offset + 30 + int(name_len) + int(extra_len)) % 64 == 0, info.filename
  with readers.open_source(str(out)) as got, readers.open_source(os.path.join(FIX, "vit_token.safetensors")) as src:
    assert sorted(got.keys()) == sorted(src.keys())
    for k in src.keys():
      a, b = got.get(k), src.get(k)
      assert a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes(), k
  again = jobs.import_file(str(out), num_heads=2)
  for a, b in zip(jax.tree.leaves(imp.theta), jax.tree.leaves(again.theta)):
    assert a.dtype == b.dtype and np.array_equal(a, b)
  # format=jaxlab keeps its meta in safetensors metadata: a .pth is refused before anything is read
  with pytest.raises(ValueError, match="config.format=jaxlab writes .safetensors only"):
    jobs.run_export(ml_collections.ConfigDict(dict(cfg, format="jaxlab", out=str(tmp_path / "j.pth"))), str(tmp_path))
  assert not (tmp_path / "j.pth").exists()


def test_pth_writer_dtypes_shapes_and_big_integers(tmp_path):
  """pth.write_state_dict: every storage type (bf16, fp16, bool, ints), 0-d, empty and transposed tensors
  read back bitwise by the restricted reader; integers of every pickle width encode and decode."""
  import ml_dtypes

  from jaxlab.interop import pth

  rng = np.random.default_rng(0)
  base = rng.standard_normal((5, 3)).astype(np.float32)
  sd = {
    "t": base.T,
    "f64": rng.standard_normal(3),
    "f16": base.astype(np.float16),
    "bf16": base.astype(ml_dtypes.bfloat16),
    "i64": np.array(3, np.int64),
    "i8": np.arange(-4, 4, dtype=np.int8),
    "u8": np.arange(300, dtype=np.int64).astype(np.uint8),
    "bool": np.array([True, False]),
    "empty": np.zeros((0, 4), np.float32),
    "long": np.zeros(70000, np.int16),
  }
  path = tmp_path / "sd.pth"
  pth.write_state_dict(sd, str(path))
  with readers.open_source(str(path)) as src:
    assert src.keys() == list(sd)
    for k, v in sd.items():
      got = src.get(k)
      assert got.dtype == v.dtype and got.shape == v.shape and got.tobytes() == np.array(v, order="C").tobytes(), k
  for n in (0, 255, 256, 65535, 65536, -1, 2**31 - 1, 2**31, -(2**31) - 1, 2**40, 2**63):
    assert pickle.loads(b"\x80\x02" + pth._int(n) + b".") == n
  with pytest.raises(ValueError, match="tensor c: dtype complex64 has no torch storage type"):
    pth.write_state_dict({"c": np.zeros(2, np.complex64)}, str(tmp_path / "c.pth"))
  assert not (tmp_path / "c.pth").exists() and not (tmp_path / "c.pth.tmp").exists()
