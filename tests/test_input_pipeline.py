"""The input pipeline: (seed, step) batches through grain workers and prefetch, image preprocessing,
Mixup/CutMix with soft labels, random erasing, RandAugment, presets and checkpoint preprocessing."""

import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import run_main, run_python, tiny_config
from PIL import Image

from jaxlab import checkpoint, data, objectives, sharding, train
from jaxlab.data import images, mixing, pipeline, randaugment

tfds = pytest.importorskip("tensorflow_datasets")


def _host(ds, start, total, **kw):
  return [dict(b) for b in pipeline.host_batches(ds, start=start, total=total, batch_size=16, seed=5, **kw)]


@pytest.fixture(scope="module")
def digits():
  return data.get_dataset({"name": "digits", "aug_shift": 1, "aug_noise": 0.1})


def test_grain_batches_equal_train_batch_and_resume_with_workers_and_prefetch(digits):
  """Workers + prefetch give exactly `train_batch(step)`, and a restart at step 3 continues bitwise."""
  mesh = sharding.make_mesh()
  cfg = {"workers": 2, "prefetch": 2}
  with data.TrainBatches(digits, cfg, start=0, total=6, batch_size=16, seed=5, mesh=mesh) as it:
    full = [jax.device_get(b) for b in it]
  with data.TrainBatches(digits, cfg, start=3, total=6, batch_size=16, seed=5, mesh=mesh) as it:
    resumed = [jax.device_get(b) for b in it]
  assert len(full) == 6 and len(resumed) == 3
  for s in range(6):
    ref = digits.train_batch(s, 16, 5)
    for k in ("inputs", "label"):
      np.testing.assert_array_equal(full[s][k], ref[k])
  for a, b in zip(full[3:], resumed, strict=True):
    np.testing.assert_array_equal(a["inputs"], b["inputs"])
  # in-process with a read thread: the same batches
  threaded = _host(digits, 0, 6, read_threads=1)
  for s in range(6):
    np.testing.assert_array_equal(threaded[s]["inputs"], full[s]["inputs"])


def _mock_imagenet(**cfg):
  return data.get_dataset(
    {"name": "tfds", "tfds_name": "imagenet2012", "split_map": {"train": "train", "validation": "validation"}, **cfg}
  )


def test_two_processes_give_the_global_batch_of_one():
  """Per-example augmentation streams follow global positions, so 2 processes' halves make the 1-process batch."""
  with tfds.testing.mock_data(num_examples=24):
    ds = _mock_imagenet(preset="deit", image_size=32)
    one = _host(ds, 2, 4)
    halves = [_host(ds, 2, 4, process_index=p, process_count=2) for p in (0, 1)]
  for s in range(2):
    for k in ("inputs", "label"):
      np.testing.assert_array_equal(np.concatenate([halves[0][s][k], halves[1][s][k]]), one[s][k])
  assert one[0]["inputs"].shape == (16, 32, 32, 3) and one[0]["inputs"].dtype == np.uint8


def test_mock_images_of_varied_sizes_and_colour_modes_decode_resize_normalise():
  with tfds.testing.mock_data(num_examples=8):
    raw = tfds.data_source("imagenet2012", split="train")
    sizes = {np.asarray(raw[i]["image"]).shape[:2] for i in range(8)}
    assert len(sizes) > 1  # the mock images really vary in size
    rgb = _mock_imagenet(image_size=24, interpolation="bicubic", crop_pct=1.0)
    gray = data.get_dataset(
      {
        "name": "tfds",
        "tfds_name": "mnist",
        "image_size": 16,
        "channels": 3,
        "split_map": {"train": "train", "test": "test"},
      }
    )
    assert rgb.input_shape == (24, 24, 3) and gray.input_shape == (16, 16, 3)
    b = rgb.train_batch(0, 8, seed=0)
    e = next(rgb.eval_batches("validation", 8))
    g = next(gray.eval_batches("test", 8))
    first_eval = np.asarray(tfds.data_source("imagenet2012", split="validation")[0]["image"])
  assert b["inputs"].shape == (8, 24, 24, 3) and b["inputs"].dtype == np.uint8 and b["label"].dtype == np.int32
  assert e["inputs"].shape == (8, 24, 24, 3) and g["inputs"].shape == (8, 16, 16, 3)
  np.testing.assert_array_equal(g["inputs"][..., 0], g["inputs"][..., 2])  # gray copied to 3 channels
  # eval with crop_pct=1: shorter side resized to 24 with PIL bicubic, then the center 24 x 24
  h, w = first_eval.shape[:2]
  nh, nw = (24, int(w * 24 / h)) if h <= w else (int(h * 24 / w), 24)  # torchvision Resize(int): long side truncated
  ref = np.asarray(Image.fromarray(first_eval).resize((nw, nh), Image.BICUBIC))
  top, left = round((nh - 24) / 2), round((nw - 24) / 2)
  np.testing.assert_array_equal(e["inputs"][0], ref[top : top + 24, left : left + 24])
  # normalisation on the device: (x / 255 - mean) / std with ImageNet's statistics
  out = np.asarray(rgb.device_preprocess({"inputs": jnp.asarray(e["inputs"])})["inputs"])
  expect = (e["inputs"].astype(np.float32) / 255 - np.array(images.IMAGENET_MEAN)) / np.array(images.IMAGENET_STD)
  np.testing.assert_allclose(out, expect, rtol=1e-5, atol=1e-5)


def test_random_resized_crop_box_within_image_and_scale():
  rng = np.random.default_rng(0)
  for _ in range(200):
    h, w = rng.integers(8, 300, size=2)
    top, left, ch, cw = images.random_resized_crop_box(rng, int(h), int(w), (0.08, 1.0), (3 / 4, 4 / 3))
    assert 0 <= top and top + ch <= h and 0 <= left and left + cw <= w and ch > 0 and cw > 0


def _mix_batch(b=8, k=10, h=16):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(b, h, h, 3)).astype(np.float32))
  y = jnp.asarray(rng.permutation(k)[:b].astype(np.int32))  # distinct labels: each soft row names its pair
  return {"inputs": x, "label": y}


@pytest.mark.parametrize("kind", ["mixup", "cutmix"])
def test_mixup_cutmix_soft_labels_sum_to_one_and_mix_the_right_pairs(kind):
  batch = _mix_batch()
  x, y = np.asarray(batch["inputs"]), np.asarray(batch["label"])
  cfg = mixing.MixConfig(mixup=0.8 if kind == "mixup" else 0.0, cutmix=1.0 if kind == "cutmix" else 0.0)
  for seed in range(4):
    out = jax.device_get(jax.jit(lambda bt, kk, c=cfg: mixing.mix_batch(bt, kk, c, 10))(batch, jax.random.key(seed)))
    soft = out["soft_label"]
    np.testing.assert_allclose(soft.sum(-1), 1.0, atol=1e-6)
    lam = soft[np.arange(8), y]
    np.testing.assert_allclose(soft[np.arange(8), y[::-1]], 1.0 - lam, atol=1e-6)  # partner = reversed batch
    assert np.ptp(lam) < 1e-6 and 0.0 <= lam[0] <= 1.0
    if kind == "mixup":
      np.testing.assert_allclose(out["inputs"], lam[0] * x + (1 - lam[0]) * x[::-1], rtol=1e-5, atol=1e-5)
    else:
      from_self = np.all(out["inputs"] == x, axis=-1)
      from_partner = np.all(out["inputs"] == x[::-1], axis=-1)
      assert np.all(from_self | from_partner)
      np.testing.assert_allclose(1.0 - from_partner[0].mean(), lam[0], atol=1e-6)  # lam = area kept


def test_soft_label_cross_entropy():
  logits = jnp.asarray(np.random.default_rng(1).normal(size=(4, 5)).astype(np.float32))
  y = jnp.asarray([0, 3, 1, 4])
  hard = objectives.cross_entropy(objectives.Context(logits=logits, batch={"label": y}), {})
  onehot = objectives.cross_entropy(
    objectives.Context(logits=logits, batch={"label": y, "soft_label": jax.nn.one_hot(y, 5)}), {}
  )
  np.testing.assert_allclose(hard, onehot, rtol=1e-6)
  soft = 0.3 * jax.nn.one_hot(y, 5) + 0.7 * jax.nn.one_hot(y[::-1], 5)
  got = objectives.cross_entropy(objectives.Context(logits=logits, batch={"label": y, "soft_label": soft}), {})
  expect = -(soft * jax.nn.log_softmax(logits)).sum(-1).mean()
  np.testing.assert_allclose(got, expect, rtol=1e-6)


def test_random_erasing_boxes():
  x = jnp.zeros((64, 20, 20, 3))
  out = np.asarray(mixing.random_erase(x, jax.random.key(0), 1.0))
  erased = np.any(out != 0, axis=-1)
  fracs = erased.reshape(64, -1).mean(-1)
  assert np.all(fracs > 0) and np.all(fracs <= 1.0)
  for m in erased:  # one axis-aligned box per image
    rows, cols = np.where(m.any(1))[0], np.where(m.any(0))[0]
    assert m[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1].all()
  np.testing.assert_array_equal(np.asarray(mixing.random_erase(x, jax.random.key(0), 0.0)), 0.0)


def test_randaugment_spec_and_ops():
  spec = randaugment.parse("rand-m9-mstd0.5-inc1")
  assert (spec.num_ops, spec.magnitude, spec.magnitude_std) == (2, 9.0, 0.5)
  assert spec.ops == randaugment.INCREASING_OPS
  with pytest.raises(ValueError, match="config.data.randaugment"):
    randaugment.parse("rand-q9")
  img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (20, 24, 3), dtype=np.uint8))
  for name in randaugment.INCREASING_OPS + randaugment.DEFAULT_OPS:
    for level in (0.0, 9.0, 10.0):  # the whole magnitude range (mstd noise is clipped to [0, 10])
      for im in (img, img.convert("L")):
        out = randaugment._op(name, im, level, np.random.default_rng(0))
        assert out.size == im.size and out.mode == im.mode, (name, level, im.mode)
  # Invert is exact; PosterizeIncreasing at m=10 keeps 0 bits
  np.testing.assert_array_equal(np.asarray(randaugment._op("Invert", img, 5, None)), 255 - np.asarray(img))
  np.testing.assert_array_equal(np.asarray(randaugment._op("PosterizeIncreasing", img, 10, None)), 0)
  np.testing.assert_array_equal(np.asarray(randaugment._op("Posterize", img, 5, None)), np.asarray(img) & 0xC0)
  a = randaugment.apply(img, spec, np.random.default_rng(3))
  b = randaugment.apply(img, spec, np.random.default_rng(3))
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # a function of the generator's state


def test_settings_rule_explicit_over_checkpoint_over_preset():
  meta = {
    "preprocessing": {
      "image_size": [48, 48],
      "mean": [0.5, 0.5, 0.5],
      "std": [0.5, 0.5, 0.5],
      "interpolation": "bicubic",
      "crop_pct": 0.9,
    }
  }
  s = images.resolve({"preset": "deit"}, meta)
  assert (s["image_size"], s["mean"], s["interpolation"], s["crop_pct"]) == (48, (0.5, 0.5, 0.5), "bicubic", 0.9)
  assert s["mixup"] == 0.8 and s["randaugment"] == "rand-m9-mstd0.5-inc1"  # the rest from the preset
  s = images.resolve({"preset": "deit", "image_size": 32, "mean": (0.1, 0.2, 0.3), "mixup": 0.0}, meta)
  assert (s["image_size"], s["mean"], s["mixup"]) == (32, (0.1, 0.2, 0.3), 0.0)
  s = images.resolve({"preset": "cifar"})
  assert (s["crop"], s["crop_padding"], s["mixup"], s["mean"]) == ("pad", 4, 0.0, images.CIFAR_MEAN)
  with pytest.raises(ValueError, match="config.data.preset: unknown preset 'imagenet'"):
    images.resolve({"preset": "imagenet"})
  with pytest.raises(ValueError, match="config.data.interpolation"):
    images.resolve({"interpolation": "cubic"})


def test_image_settings_from_checkpoint_meta_through_get_dataset():
  """An imported model's meta sets size, mean/std and interpolation of a tfds image set unless data.* says."""
  meta = {
    "preprocessing": {
      "image_size": [20, 20],
      "mean": [0.5, 0.5, 0.5],
      "std": [0.25, 0.25, 0.25],
      "interpolation": "bicubic",
      "crop_pct": 1.0,
    }
  }
  with tfds.testing.mock_data(num_examples=4):
    ds = data.get_dataset({"name": "tfds", "tfds_name": "imagenet2012", "split_map": {"train": "train"}}, meta)
    own = data.get_dataset(
      {"name": "tfds", "tfds_name": "imagenet2012", "split_map": {"train": "train"}, "image_size": 12}, meta
    )
    x = ds.sample_batch(2)["inputs"]
  assert ds.input_shape == (20, 20, 3) and own.input_shape == (12, 12, 3) and x.shape == (2, 20, 20, 3)
  assert ds.normalize == ((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
  assert ds.info["preprocessing"]["interpolation"] == "bicubic"
  out = np.asarray(ds.device_preprocess({"inputs": jnp.asarray(x)})["inputs"])
  np.testing.assert_allclose(out, (x / 255.0 - 0.5) / 0.25, rtol=1e-5, atol=1e-5)


def test_deit_preset_trains_end_to_end_on_mock_images(tmp_path):
  """A tiny ViT through train_and_evaluate with the DeiT recipe (RandAugment, erasing, Mixup/CutMix)."""
  cfg = tiny_config(steps=2, eval_every=0, checkpoint_every=0)
  cfg.data.name, cfg.data.tfds_name = "tfds", "imagenet2012"
  cfg.data.split_map = {"train": "train", "validation": "validation", "test": "validation"}
  cfg.data.preset, cfg.data.image_size, cfg.data.batch_size, cfg.data.eval_batch_size = "deit", 16, 8, 8
  cfg.model.patch_size = 8
  with tfds.testing.mock_data(num_examples=16):
    summary = train.train_and_evaluate(cfg, str(tmp_path / "deit"))
    again = train.evaluate_checkpoint(str(tmp_path / "deit"), "test")  # settings rebuilt from the meta alone
  assert summary["steps"] == 2 and math.isfinite(summary["metrics"]["test"]["loss"])
  assert summary["metrics"]["test"]["count"] == 16
  assert again["loss"] == pytest.approx(summary["metrics"]["test"]["loss"], rel=1e-5)
  meta = checkpoint.load_meta(str(tmp_path / "deit"))
  assert meta["data"]["preprocessing"]["mixup"] == 0.8 and meta["data"]["preprocessing"]["image_size"] == 16


# ----------------------------------------------------------------------------
# Long Range Arena release directory
# ----------------------------------------------------------------------------

LISTOPS_ROWS = [("( ( [MAX 2 9 ) 3 ] )", 9), ("[MIN 4 ( [SM 5 6 ] ) 1 ]", 1), ("7", 7)]


def _write_lra(root):
  """A few files in the layout of lra_release.gz (with its nested lra_release/ folder)."""
  rel = root / "lra_release" / "lra_release"
  lo = rel / "listops-1000"
  lo.mkdir(parents=True)
  for name in ("basic_train.tsv", "basic_val.tsv", "basic_test.tsv"):
    (lo / name).write_text("Source\tTarget\n" + "".join(f"{s}\t{t}\n" for s, t in LISTOPS_ROWS))
  pf = rel / "pathfinder32" / "curv_contour_length_14"
  rng = np.random.default_rng(0)
  labels = []
  for k in range(2):
    (pf / "imgs" / str(k)).mkdir(parents=True)
    lines = []
    for n in range(5):
      img = rng.integers(0, 256, (32, 32), dtype=np.uint8)
      Image.fromarray(img).save(pf / "imgs" / str(k) / f"sample_{n}.png")
      label = int(rng.integers(0, 2))
      labels.append((f"imgs/{k}/sample_{n}.png", label, img))
      lines.append(f"imgs/{k} sample_{n}.png {n} {label} 14 1.5 0\n")
    (pf / "metadata").mkdir(exist_ok=True)
    (pf / "metadata" / f"{k}.npy").write_text("".join(lines))
  return root / "lra_release", labels


def test_lra_release_listops_and_pathfinder(tmp_path):
  from jaxlab.data import sequences

  lra_dir, pf_truth = _write_lra(tmp_path)
  ds = data.get_dataset({"name": "lra_listops", "lra_dir": str(lra_dir), "max_length": 8})
  tr = ds.split("train").arrays
  np.testing.assert_array_equal(tr["label"], [9, 1, 7])
  np.testing.assert_array_equal(tr["length"], [5, 8, 1])  # parentheses dropped
  t = sequences.TOKEN_ID
  np.testing.assert_array_equal(tr["inputs"][0], [t["[MAX"], t["2"], t["9"], t["3"], t["]"], 0, 0, 0])
  assert ds.info["vocab_size"] == 16 and ds.info["pad_id"] == 0 and ds.input_shape == (8,)
  short = data.get_dataset({"name": "lra_listops", "lra_dir": str(lra_dir), "max_length": 4})
  assert short.split("test").arrays["length"].tolist() == [4, 4, 1]  # truncated to max_length

  pf = data.get_dataset({"name": "lra_pathfinder", "lra_dir": str(lra_dir / "lra_release")})
  assert pf.input_shape == (1024, 1) and pf.info["split_sizes"] == {"test": 1, "validation": 1, "train": 8}
  truth = {p: (label, img) for p, label, img in pf_truth}
  for split in ("train", "validation", "test"):
    src = pf.split(split)
    for i in range(len(src)):
      rel = os.path.relpath(src.paths[i], str(lra_dir / "lra_release" / "pathfinder32" / "curv_contour_length_14"))
      label, img = truth[rel]
      ex = src[i]
      assert int(ex["label"]) == label
      np.testing.assert_allclose(ex["inputs"][:, 0], img.reshape(-1) / 255.0, rtol=1e-6)

  with pytest.raises(FileNotFoundError, match="config.data.lra_dir=.*lra_release.gz"):
    data.get_dataset({"name": "lra_listops", "lra_dir": str(tmp_path / "nowhere")})
  bad = tmp_path / "bad" / "listops-1000"
  bad.mkdir(parents=True)
  for name in ("basic_train.tsv", "basic_val.tsv", "basic_test.tsv"):
    (bad / name).write_text("Source\tTarget\n[MAX 2 FOO ]\t2\n")
  with pytest.raises(ValueError, match=r"basic_train.tsv:2: unknown ListOps token 'FOO'"):
    data.get_dataset({"name": "lra_listops", "lra_dir": str(tmp_path / "bad")})


def test_sequence_pooling_over_real_tokens_ignores_padding():
  """A causal S4D with pool_pad_id=0 gives the same logits however much padding follows the tokens."""
  from jaxlab import build

  cfg = {
    "name": "s4d_seq",
    "d_model": 8,
    "n_layers": 1,
    "d_state": 4,
    "vocab_size": 16,
    "causal": True,
    "pool_pad_id": 0,
  }
  model = build.model(cfg, 10)
  tokens = np.array([[2, 7, 9, 5, 6]], np.int32)
  short, long_ = np.pad(tokens, ((0, 0), (0, 3))), np.pad(tokens, ((0, 0), (0, 11)))
  params = model.init(jax.random.key(0), short)
  a, b = model.apply(params, short), model.apply(params, long_)
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
  plain = build.model({**cfg, "pool_pad_id": -1}, 10)  # default: every position pooled, padding changes it
  assert not np.allclose(np.asarray(plain.apply(params, short)), np.asarray(plain.apply(params, long_)), atol=1e-4)


def test_lra_smoke_config_through_the_entry_point_with_two_workers(tmp_path):
  """lra.py:smoke on release-layout files via `python -m jaxlab.main`, with 2 grain workers (spawned)."""
  lra_dir, _ = _write_lra(tmp_path)
  wd = str(tmp_path / "run")
  r = run_main(
    "--config=ml_collections_configs/lra.py:smoke",
    f"--workdir={wd}",
    f"--config.data.lra_dir={lra_dir}",
    "--config.data.workers=2",
    "--config.progress=False",
  )
  assert r.returncode == 0, r.stderr[-3000:]
  summary = json.load(open(os.path.join(wd, "summary.json")))
  assert summary["steps"] == 3 and summary["metrics"]["test"]["count"] == 3
  meta = checkpoint.load_meta(wd)
  assert meta["model"]["pool_pad_id"] == 0 and meta["data"]["name"] == "lra_listops"


MIX_SNIPPET = """
import json, jax, numpy as np
from jaxlab import data, sharding
ds = data.get_dataset({"name": "digits"})
cfg = {"mixup": 0.8, "cutmix": 1.0, "random_erase": 0.5, "prefetch": 1}
out = {}
for n in (1, 8):
  with data.TrainBatches(ds, cfg, start=2, total=5, batch_size=16, seed=1, mesh=sharding.make_mesh(n)) as it:
    out[n] = [jax.device_get(b) for b in it]
assert len(jax.devices()) == 8
for a, b in zip(out[1], out[8]):
  for k in ("inputs", "soft_label", "label"):
    np.testing.assert_array_equal(a[k], b[k])
print("RESULT", json.dumps({"mixed": float(np.mean(out[8][0]["soft_label"].max(-1) < 1))}))
"""


def test_device_mixing_is_the_same_on_one_and_eight_devices():
  """Mixup/CutMix pair example i with B-1-i of the *global* batch, also when it is sharded over 8 devices."""
  r = run_python(MIX_SNIPPET, env_extra={"XLA_FLAGS": "--xla_force_host_platform_device_count=8"})
  assert r.returncode == 0, r.stderr[-3000:]
  mixed = json.loads(next(x for x in r.stdout.splitlines() if x.startswith("RESULT"))[6:])["mixed"]
  assert mixed > 0  # the batch really was mixed


def test_repeated_augmentation_copies_and_epoch_length():
  plain = data.get_dataset({"name": "digits"})
  ds = data.get_dataset({"name": "digits", "repeated_aug": 3})
  per_epoch = 1077 // 12
  seen = []
  for s in range(per_epoch):
    idx = ds.train_indices(s, 12, seed=4)
    blocks = idx.reshape(3, 4)  # copy j of each image sits in block j: every process's slice is distinct
    assert (blocks == blocks[0]).all() and len(set(blocks[0])) == 4
    seen.append(blocks[0])
  seen = np.concatenate(seen)
  assert len(np.unique(seen)) == len(seen) == per_epoch * 4  # n / 3 distinct images an epoch, no repeats
  first = np.asarray(plain.train_indices(0, 1077, 4))  # the same epoch order as without repeats
  np.testing.assert_array_equal(seen, first[: len(seen)])
  with pytest.raises(ValueError, match="config.data.repeated_aug=-1"):
    data.get_dataset({"name": "digits", "repeated_aug": -1})
