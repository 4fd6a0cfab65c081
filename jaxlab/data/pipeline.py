"""The training input pipeline: grain on the host, prefetch onto the devices, mixing on the devices.

Host side (grain): a `grain.MapDataset` over step numbers maps step `s` to this
process's part of the global batch of `s` (`Dataset.train_batch`: index
sampling, per-example decode/crop/RandAugment, batch augment), so the batch of
step `s` depends only on `(seed, s)` however it is computed. With
`data.workers = N > 0` grain's `mp_prefetch` computes whole batches in N worker
processes (spawned; order is kept); with `data.workers = 0` they are computed
in this process, on a grain read thread when `data.read_threads > 0`.

Device side: the next `data.prefetch` batches are placed on the devices
(sharded over the mesh's `data` axis) while the current step runs, then
`Dataset.device_preprocess` (uint8 -> normalised float) and, for training,
Mixup/CutMix and random erasing (`jaxlab.data.mixing`) run as one jitted
function whose key is `fold_in(key(seed), step)`: also a function of
`(seed, step)` only, so a killed run restarted from a checkpoint sees the same
batches bit for bit.
"""

from __future__ import annotations

import collections
from collections.abc import Iterator

import grain
import jax
import numpy as np

from jaxlab import sharding
from jaxlab.data import base, images, mixing


class _BatchOfStep:
  """`step -> this process's part of the global batch of step` (picklable for grain's worker processes)."""

  def __init__(self, dataset: base.Dataset, batch_size: int, seed: int, process_index: int, process_count: int):
    self.dataset, self.batch_size, self.seed = dataset, batch_size, seed
    self.process_index, self.process_count = process_index, process_count

  def __call__(self, step) -> dict[str, np.ndarray]:
    return self.dataset.train_batch(
      int(step), self.batch_size, self.seed, process_index=self.process_index, process_count=self.process_count
    )


def host_batches(
  dataset: base.Dataset,
  *,
  start: int,
  total: int,
  batch_size: int,
  seed: int,
  workers: int = 0,
  read_threads: int = 0,
  buffer: int = 2,
  process_index: int = 0,
  process_count: int = 1,
) -> grain.IterDataset:
  """A grain `IterDataset` of this process's host batches for steps `start .. total - 1`.

  Args:
    workers: worker processes (grain `mp_prefetch`); 0 computes batches in this process.
    read_threads: with `workers=0`, grain read threads computing batches ahead (0 = on the caller's thread).
    buffer: batches each worker (or the read threads) keeps ready.
  """
  if workers < 0 or read_threads < 0:
    raise ValueError(f"config.data.workers={workers} / data.read_threads={read_threads}: must be >= 0")
  ds = grain.MapDataset.range(start, total).map(_BatchOfStep(dataset, batch_size, seed, process_index, process_count))
  threads = 0 if workers else read_threads
  it = ds.to_iter_dataset(grain.ReadOptions(num_threads=threads, prefetch_buffer_size=max(1, buffer) if threads else 0))
  if workers:
    _ensure_absl_flags_parsed()
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers, per_worker_buffer_size=max(1, buffer)))
  return it


def _ensure_absl_flags_parsed():
  """grain reads its absl flags when it starts workers; outside an absl app (tests, notebooks) take defaults."""
  from absl import flags

  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


class DeviceStage:
  """The jitted per-step function on the devices: normalise, then (training) Mixup/CutMix and random erasing."""

  def __init__(self, dataset: base.Dataset, data_cfg, seed: int, train: bool = True):
    self.dataset = dataset
    settings = dataset.info.get("preprocessing") or images.resolve(data_cfg)
    self.mix = mixing.MixConfig.from_settings(settings) if train else mixing.MixConfig()
    self.key = jax.random.key(seed)
    self._fn = jax.jit(self._apply) if (self.mix.active or dataset.normalize is not None) else None

  def _apply(self, batch, step):
    batch = self.dataset.device_preprocess(batch)
    if self.mix.active:
      key = jax.random.fold_in(jax.random.fold_in(self.key, step), 3)
      batch = mixing.apply(batch, key, self.mix, self.dataset.num_classes)
    return batch

  def __call__(self, batch, step: int):
    return batch if self._fn is None else self._fn(batch, np.int32(step))


class TrainBatches:
  """Iterator of device batches for steps `start, start + 1, ...`, `prefetch` of them placed ahead.

  Use as a context manager (or call `close()`) so worker processes stop.
  """

  def __init__(
    self,
    dataset: base.Dataset,
    data_cfg,
    *,
    start: int,
    total: int,
    batch_size: int,
    seed: int,
    mesh,
    process_index: int | None = None,
    process_count: int | None = None,
  ):
    get = data_cfg.get
    self.prefetch = int(get("prefetch", 2) or 0)
    if self.prefetch < 0:
      raise ValueError(f"config.data.prefetch={self.prefetch}: must be >= 0")
    self.mesh = mesh
    self.device_stage = DeviceStage(dataset, data_cfg, seed, train=True)
    pi = jax.process_index() if process_index is None else process_index
    pc = jax.process_count() if process_count is None else process_count
    self._host = iter(
      host_batches(
        dataset,
        start=start,
        total=total,
        batch_size=batch_size,
        seed=seed,
        workers=int(get("workers", 0) or 0),
        read_threads=int(get("read_threads", 0) or 0),
        buffer=max(2, self.prefetch),
        process_index=pi,
        process_count=pc,
      )
    )
    self._copy_host = int(get("workers", 0) or 0) > 0
    self._step = start
    self._total = total
    self._queue: collections.deque = collections.deque()

  def _put_next(self) -> bool:
    if self._step >= self._total:
      return False
    host = next(self._host)
    if self._copy_host:  # grain workers hand over shared-memory arrays: own the data, release the segment now
      host = {k: np.array(v, copy=True) for k, v in host.items()}
    self._queue.append(self.device_stage(sharding.put_batch(host, self.mesh), self._step))
    self._step += 1
    return True

  def __iter__(self) -> Iterator[dict]:
    return self

  def __next__(self) -> dict:
    while len(self._queue) <= self.prefetch and self._put_next():
      pass
    if not self._queue:
      raise StopIteration
    return self._queue.popleft()

  def close(self):
    self._queue.clear()
    closer = getattr(self._host, "close", None)
    if closer is not None:
      closer()
    self._host = iter(())

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()
