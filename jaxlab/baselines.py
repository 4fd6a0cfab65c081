"""Trivial predictors: the scores a model must beat before a table says it learned anything (docs/fairness.md).

Classification (labels [N] int):
  `majority_class`  accuracy of always answering the most frequent label of the evaluated split (the best
                    constant answer on that split; `fit_labels` fits the class on another split instead).
  `first_token`     ListOps: the best label for each first token (the outermost operator), fitted on the
                    training split and scored on the evaluated one. ListOps' outermost operator alone
                    predicts a third of the labels (MAX answers 9 most often, MIN 0).
  `classification_baselines`  both of them for a `jaxlab.data` Dataset split, as table rows.

Pretraining objectives (targets [N, L] int tokens or [N, L] / [N, L, C] values, `target_mask` [N, L] of the
positions scored, 1 = scored, as `jaxlab.losses.pretraining` builds them):
  `unigram`         masked-token accuracy of always predicting the most frequent scored token, and the
                    cross entropy of the unigram distribution (the loss a model that ignores its input gets).
  `position_mean`   MAE / MSE of predicting every scored value by the mean of its position.
  `all_zero`        MAE / MSE of predicting 0 everywhere (for denoising values in [0, 1]: "no ink").

Every function fits on `fit_*` arrays when given (the training split) and otherwise on the evaluated arrays
themselves (an in-sample fit, an optimistic baseline). All are plain numpy.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def _labels(y, name: str) -> np.ndarray:
  y = np.asarray(y)
  if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
    raise ValueError(f"baselines: {name} must be a 1D integer label array, got {y.dtype} {y.shape}")
  if len(y) == 0:
    raise ValueError(f"baselines: {name} is empty")
  return y


def _mode(values: np.ndarray) -> int:
  """The most frequent value; ties go to the smallest."""
  vals, counts = np.unique(values, return_counts=True)
  return int(vals[np.argmax(counts)])


def majority_class(labels, fit_labels=None) -> dict[str, Any]:
  """Accuracy of always predicting one class.

  Args:
    labels: int [N], the evaluated split's labels.
    fit_labels: int [M] the class is fitted on (default: `labels`, the best constant answer on the split).

  Returns:
    `{'class': c, 'accuracy': fraction of labels equal to c}`.
  """
  y = _labels(labels, "labels")
  c = _mode(_labels(fit_labels, "fit_labels") if fit_labels is not None else y)
  return {"class": c, "accuracy": float(np.mean(y == c))}


def _first_tokens(inputs, name: str, position: int = 0) -> np.ndarray:
  x = np.asarray(inputs)
  if x.ndim != 2 or not np.issubdtype(x.dtype, np.integer):
    raise ValueError(f"baselines.first_token: {name} must be int tokens [N, L], got {x.dtype} {x.shape}")
  if not 0 <= position < x.shape[1]:
    raise ValueError(f"baselines.first_token: position {position} outside sequences of length {x.shape[1]}")
  return x[:, position]


def first_token(fit_inputs, fit_labels, inputs, labels, position: int = 0) -> dict[str, Any]:
  """Accuracy of answering the label most frequent (on the fit split) for the sequence's token at `position`.

  Args:
    fit_inputs: int tokens [M, L] of the split the table is fitted on (the training split).
    fit_labels: int [M].
    inputs: int tokens [N, L] of the evaluated split.
    labels: int [N].
    position: the token read (0: the first, for ListOps the outermost operator).

  Returns:
    `{'accuracy', 'table': {token: label}, 'fallback': label}`; a token never seen in the fit split gets
    `fallback`, the fit split's majority label.
  """
  ft, fy = _first_tokens(fit_inputs, "fit_inputs", position), _labels(fit_labels, "fit_labels")
  et, ey = _first_tokens(inputs, "inputs", position), _labels(labels, "labels")
  if len(ft) != len(fy) or len(et) != len(ey):
    raise ValueError(f"baselines.first_token: inputs and labels differ in length ({len(ft)} vs {len(fy)}, "
                     f"{len(et)} vs {len(ey)})")
  table = {int(t): _mode(fy[ft == t]) for t in np.unique(ft)}
  fallback = _mode(fy)
  pred = np.asarray([table.get(int(t), fallback) for t in et])
  return {"accuracy": float(np.mean(pred == ey)), "table": table, "fallback": fallback}


def classification_baselines(dataset, split: str, fit_split: str = "train") -> list[dict[str, Any]]:
  """Trivial-baseline rows for a `jaxlab.data` Dataset whose splits hold `inputs` / `label` arrays.

  Returns `[{'method': 'majority class', 'split', 'accuracy'}, ...]`: the majority class of the evaluated
  split, plus `first token` (fitted on `fit_split`) for token-sequence sets (`info['vocab_size'] > 0`).
  """
  def arrays(name):
    src = dataset.split(name)
    if not hasattr(src, "arrays"):
      raise ValueError(f"baselines: split {name!r} of {dataset.name!r} is not an in-memory array source")
    return np.asarray(src.arrays["inputs"]), np.asarray(src.arrays["label"])

  x, y = arrays(split)
  rows = [{"method": "majority class", "split": split, "accuracy": majority_class(y)["accuracy"]}]
  if int(dataset.info.get("vocab_size", 0) or 0) > 0 and x.ndim == 2:
    fx, fy = arrays(fit_split)
    rows.append({"method": "first token", "split": split, "fit_split": fit_split,
                 "accuracy": first_token(fx, fy, x, y)["accuracy"]})
  return rows


def _masked(targets, target_mask, name: str) -> tuple[np.ndarray, np.ndarray]:
  t = np.asarray(targets)
  m = np.asarray(target_mask, np.float64)
  if t.ndim < 2 or m.shape != t.shape[:2]:
    raise ValueError(f"baselines: {name} target_mask {m.shape} must be the first two axes of targets {t.shape}")
  if m.sum() <= 0:
    raise ValueError(f"baselines: {name} has no scored positions (target_mask is all 0)")
  return t, m


def unigram(targets, target_mask, fit_targets=None, fit_mask=None, vocab_size: int = 0) -> dict[str, Any]:
  """Masked-token accuracy and cross entropy of a predictor that ignores its input (token targets).

  Args:
    targets: int [N, L] token targets of the evaluated batch / split.
    target_mask: [N, L], 1 where a position is scored.
    fit_targets, fit_mask: where the token frequencies are counted (default: the evaluated positions).
    vocab_size: number of token ids (default: largest id seen + 1); frequencies get add-one smoothing
      only when fitted elsewhere (so an unseen token does not give an infinite loss).

  Returns:
    `{'token': most frequent token, 'accuracy', 'loss': mean -log p(target) under the unigram frequencies}`.
  """
  t, m = _masked(targets, target_mask, "unigram")
  if not np.issubdtype(t.dtype, np.integer) or t.ndim != 2:
    raise ValueError(f"baselines.unigram: targets must be int tokens [N, L], got {t.dtype} {t.shape}")
  if fit_targets is None:
    ft, fm, smooth = t, m, 0.0
  else:
    ft, fm = _masked(fit_targets, np.ones(np.shape(fit_targets)[:2]) if fit_mask is None else fit_mask, "fit")
    smooth = 1.0
  v = int(vocab_size or max(int(t.max()), int(ft.max())) + 1)
  counts = np.bincount(ft.ravel(), weights=fm.ravel(), minlength=v) + smooth
  p = counts / counts.sum()
  token = int(np.argmax(counts))
  w = m / m.sum()
  scored = m > 0  # unscored positions may hold tokens of probability 0 (padding)
  return {"token": token, "accuracy": float(np.sum(w * (t == token))),
          "loss": float(-np.sum(w[scored] * np.log(p[t[scored]])))}


def _values(targets) -> np.ndarray:
  t = np.asarray(targets, np.float64)
  return t[..., None] if t.ndim == 2 else t


def _errors(pred, t, m) -> dict[str, float]:
  """MAE / MSE over scored positions, averaged over their channels (as `masked_l1` does)."""
  err = pred - t
  w = m / m.sum()
  return {"mae": float(np.sum(w * np.abs(err).mean(-1))), "mse": float(np.sum(w * (err ** 2).mean(-1)))}


def position_mean(targets, target_mask, fit_targets=None, fit_mask=None) -> dict[str, Any]:
  """MAE / MSE of predicting each scored value by the (scored) mean of its position and channel.

  Args:
    targets: float [N, L] or [N, L, C] value targets.
    target_mask: [N, L], 1 where scored.
    fit_targets, fit_mask: where the means are taken (default: the evaluated positions). A position never
      scored in the fit arrays gets the overall mean.

  Returns:
    `{'mae', 'mse', 'mean': [L, C] means}`.
  """
  t, m = _masked(targets, target_mask, "position_mean")
  t = _values(t)
  ft, fm = (t, m) if fit_targets is None else _masked(
      fit_targets, np.ones(np.shape(fit_targets)[:2]) if fit_mask is None else fit_mask, "fit")
  ft = _values(ft)
  if ft.shape[1:] != t.shape[1:]:
    raise ValueError(f"baselines.position_mean: fit targets {ft.shape[1:]} and targets {t.shape[1:]} differ")
  counts = fm.sum(0)[:, None]
  overall = (fm[..., None] * ft).sum((0, 1)) / fm.sum()
  mean = np.where(counts > 0, (fm[..., None] * ft).sum(0) / np.maximum(counts, 1), overall)
  return {**_errors(mean[None], t, m), "mean": mean}


def all_zero(targets, target_mask) -> dict[str, float]:
  """MAE / MSE of predicting 0 for every scored value (float [N, L] or [N, L, C] targets)."""
  t, m = _masked(targets, target_mask, "all_zero")
  t = _values(t)
  return _errors(np.zeros_like(t), t, m)
