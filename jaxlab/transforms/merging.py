"""Model merging over task vectors: task arithmetic, TIES, DARE, breadcrumbs, SLERP, Model Stock.

Transforms registered here (all streaming over the engine's lazy `Inputs`):
  task_arithmetic  base + lambda * sum_i w_i tau_i, tau_i = theta_i - base              1 pass
  ties_merge       trim each tau_i to its top `density` magnitudes, elect a sign per
                   entry by summed mass, disjoint mean of the agreeing entries          2 passes
  dare             drop tau_i entries with probability 1 - density, rescale the kept
                   by 1/density; combine linearly (1 pass) or with TIES election (2)
  breadcrumbs      drop the largest `gamma` and the smallest magnitudes per tensor
                   (keeping `density`), combine linearly                                1 pass
  slerp            spherical interpolation of two checkpoints per tensor                1 pass (2 inputs)
  model_stock      per-layer ratio t = N cos / (1 + (N - 1) cos) from the mean angle
                   between task vectors, theta = t * mean_i theta_i + (1 - t) base      1 pass

The base (the pre-trained model the inputs were fine-tuned from) is `args.base`
or, when empty, the `init_from` checkpoint that every input records in its
provenance (same path and step). It is checked against the inputs' tree.

"Per tensor" means per tensor of the original model: a leaf stacked on the
depth axis (`layer_leaves`, default `blocks/.*`) is one tensor per layer, so
trimming, dropping, angles and norms are computed per layer slice.

Coefficients (`scale` = the papers' lambda, `density`, `gamma`, `t`, each entry of `weights`) are
strings parsed as Python literals (`coefficient`): a number; a list of anchors
interpolated linearly across the depth axis (two anchors = a (start, end)
gradient, L anchors = one value per layer, as mergekit's gradients); or a list
of `(regex, value)` rules over `/` parameter paths of theta, first match wins,
each value a number or anchors. Leaves no rule matches get the default.

Memory (float32 working copies): the base, one accumulator per statistic and
one input at a time. Linear methods: about 3 models; TIES/DARE-TIES: about 5
(base, sign sums, numerator, denominator, one input) whatever N is; measured
peak RSS in docs/merging.md (benchmarks/merge.py). `merge_tensorwise` runs
the same code one tensor at a time for files that read single tensors.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import os
import re
import zlib
from collections.abc import Sequence
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from jaxlab import checkpoint, trees
from jaxlab.transforms.registry import Output, register

TASK_ARITHMETIC_REF = "Ilharco et al., Editing models with task arithmetic, ICLR 2023, arXiv:2212.04089"
TIES_REF = "Yadav et al., TIES-Merging: resolving interference when merging models, NeurIPS 2023, arXiv:2306.01708"
DARE_REF = "Yu et al., Language models are Super Mario (DARE), ICML 2024, arXiv:2311.03099"
BREADCRUMBS_REF = "Davari & Belilovsky, Model breadcrumbs, ECCV 2024, arXiv:2312.06795"
SLERP_REF = "Shoemake, Animating rotation with quaternion curves, SIGGRAPH 1985; as in mergekit (arcee-ai/mergekit)"
MODEL_STOCK_REF = "Jang et al., Model Stock: all we need is just a few fine-tuned models, ECCV 2024, arXiv:2403.19522"

DOT_THRESHOLD = 0.9995  # SLERP falls back to linear interpolation above this |cos| (mergekit's value)
NORM_EPS = 1e-8  # vectors with a smaller norm are not normalised (mergekit's `normalize`)
DEFAULT_LAYER_LEAVES = (r"blocks/.*",)


# ----------------------------------------------------------------------------
# Coefficients: numbers, depth gradients, (regex, value) rules
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Coefficient:
  """A parsed coefficient: `(regex, value)` rules, first match wins; a value is a float or a tuple of anchors."""

  name: str
  rules: tuple[tuple[str, float | tuple[float, ...]], ...]
  default: float


def _value(v, name: str, text):
  if isinstance(v, bool):
    raise ValueError(v)
  if isinstance(v, (int, float)):
    return float(v)
  if isinstance(v, (list, tuple)) and v and all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in v):
    return tuple(float(a) for a in v)
  raise ValueError(f"config.args.{name}={text!r}: {v!r} is neither a number nor a list of per-layer numbers")


def coefficient(spec, name: str, default: float) -> Coefficient:
  """Parses a coefficient spec (see the module docstring).

  Args:
    spec: a number, a string holding a Python literal, a list of per-layer
      anchors, or a list of `(regex, value)` rules; '' or None gives `default`.
    name: the argument's name (for errors).
    default: the value of leaves no rule matches.

  Raises:
    ValueError: naming `config.args.<name>` and what is wrong.
  """
  text = spec
  if spec is None or (isinstance(spec, str) and not spec.strip()):
    return Coefficient(name, (), float(default))
  if isinstance(spec, str):
    try:
      spec = ast.literal_eval(spec.strip())
    except (ValueError, SyntaxError) as e:
      raise ValueError(
        f"config.args.{name}={text!r}: not a number, a list of per-layer values or a list of "
        "(regex, value) rules (write them as Python literals)"
      ) from e
  is_rules = (
    isinstance(spec, (list, tuple))
    and spec
    and all(isinstance(r, (list, tuple)) and len(r) == 2 and isinstance(r[0], str) for r in spec)
  )
  if not is_rules:
    try:
      return Coefficient(name, ((".*", _value(spec, name, text)),), float(default))
    except ValueError as e:
      if str(e).startswith("config.args"):
        raise
      raise ValueError(f"config.args.{name}={text!r}: booleans are not coefficients") from e
  rules = []
  for regex, v in spec:
    try:
      re.compile(regex)
    except re.error as e:
      raise ValueError(f"config.args.{name}: rule regex {regex!r} does not compile ({e})") from e
    rules.append((regex, _value(v, name, text)))
  return Coefficient(name, tuple(rules), float(default))


def weights_spec(spec, n: int) -> list[Coefficient]:
  """Per-input weights: '' (all 1), one coefficient for all, or a list/tuple of `n` coefficients.

  Raises:
    ValueError: a list whose length is not the number of inputs.
  """
  if spec is None or (isinstance(spec, str) and not spec.strip()):
    return [Coefficient("weights", (), 1.0)] * n
  text = spec
  if isinstance(spec, str):
    try:
      spec = ast.literal_eval(spec.strip())
    except (ValueError, SyntaxError) as e:
      raise ValueError(f"config.args.weights={text!r}: give one weight per input, e.g. '(1.0, 0.5)'") from e
  if isinstance(spec, (int, float)) and not isinstance(spec, bool):
    return [coefficient(spec, "weights", 1.0)] * n
  if not isinstance(spec, (list, tuple)) or len(spec) != n:
    raise ValueError(
      f"config.args.weights={text!r}: got {len(spec) if isinstance(spec, (list, tuple)) else 1} "
      f"weights for {n} input checkpoints; give one per input"
    )
  return [coefficient(s, f"weights[{i}]", 1.0) for i, s in enumerate(spec)]


@dataclasses.dataclass
class Layout:
  """The float leaves of theta in tree order: names, shapes, dtypes, whether stacked on the depth axis."""

  names: list[str]
  shapes: list[tuple[int, ...]]
  dtypes: list
  stacked: tuple[bool, ...]

  @classmethod
  def of(cls, theta, layer_leaves: Sequence[str]) -> Layout:
    flat = trees.flatten(theta)
    names = [n for n, x in flat.items() if jnp.issubdtype(x.dtype, jnp.inexact)]
    shapes = [tuple(flat[n].shape) for n in names]
    stacked = tuple(trees.first_match(n, layer_leaves) is not None and len(s) >= 1 for n, s in zip(names, shapes))
    return cls(names, shapes, [flat[n].dtype for n in names], stacked)

  def rows(self, i: int) -> int:
    """Number of tensors of the original model in leaf `i` (its depth, or 1)."""
    return self.shapes[i][0] if self.stacked[i] else 1

  def size(self, i: int) -> int:
    """Entries per tensor (per layer for a stacked leaf)."""
    return int(np.prod(self.shapes[i], dtype=np.int64)) // max(self.rows(i), 1)

  def values(self, coef: Coefficient) -> list[np.ndarray]:
    """The coefficient per leaf as float64 arrays of shape [rows] (one value per layer of a stacked leaf).

    Raises:
      ValueError: per-layer values for a leaf without a depth axis.
    """
    out = []
    patterns = [r for r, _ in coef.rules]
    for i, name in enumerate(self.names):
      j = trees.first_match(name, patterns)
      v = coef.default if j is None else coef.rules[j][1]
      r = self.rows(i)
      if isinstance(v, tuple):
        if len(v) > 1 and not self.stacked[i]:
          raise ValueError(
            f"config.args.{coef.name}: per-layer values {list(v)} for {name}, which has no depth "
            "axis; add a rule for it, e.g. [('blocks/.*', [...]), ('.*', 1.0)]"
          )
        pos = np.linspace(0.0, 1.0, r) if r > 1 else np.zeros(1)
        out.append(np.interp(pos, np.linspace(0.0, 1.0, len(v)), np.asarray(v)) if len(v) > 1 else np.full(r, v[0]))
      else:
        out.append(np.full(r, float(v)))
    return out

  def unflatten_like(self, theta, leaves: list) -> dict:
    """theta with the float leaves replaced by `leaves` (reshaped to their shapes and cast to their dtypes)."""
    flat = dict(trees.flatten(theta))
    for n, s, d, x in zip(self.names, self.shapes, self.dtypes, leaves, strict=True):
      flat[n] = x.reshape(s).astype(d)
    return trees.unflatten(flat)


def _check_range(layout: Layout, coef: Coefficient, lo: float, hi: float, lo_open: bool = False) -> list[np.ndarray]:
  vals = layout.values(coef)
  for name, v in zip(layout.names, vals):
    bad = v[(v < lo) | (v > hi) | ((v == lo) if lo_open else False)]
    if bad.size:
      rng = f"{'(' if lo_open else '['}{lo}, {hi}]"
      raise ValueError(f"config.args.{coef.name}: {float(bad[0])} for {name} is outside {rng}")
  return vals


# ----------------------------------------------------------------------------
# Per-tensor kernels (row view: [rows, entries per tensor]), jit-compiled
# ----------------------------------------------------------------------------


def _rows(x, stacked: bool):
  return x.reshape((x.shape[0], -1) if stacked else (1, -1))


def _f32(x):
  return x.astype(jnp.float32)


def magnitude_threshold(a, kth):
  """The `kth`-smallest value of each row of non-negative float32 `a` (1-indexed, as the TIES reference's
  `kthvalue`), shape [rows].

  Exact, by bisection over the values' bit patterns (non-negative floats order like their int32 bits):
  32 counting passes over the row instead of a sort, which XLA's CPU backend does about 25x slower.
  """
  bits = jax.lax.bitcast_convert_type(a.astype(jnp.float32), jnp.int32)
  k = jnp.maximum(kth, 1)[:, None]
  lo = jnp.zeros((a.shape[0], 1), jnp.int32)
  hi = jnp.full((a.shape[0], 1), 0x7F800000, jnp.int32)  # +inf

  def halve(_, bounds):
    lo, hi = bounds
    mid = lo + (hi - lo) // 2
    enough = jnp.sum(bits <= mid, axis=-1, keepdims=True) >= k
    return jnp.where(enough, lo, mid + 1), jnp.where(enough, mid, hi)

  lo, _ = jax.lax.fori_loop(0, 32, halve, (lo, hi))
  return jax.lax.bitcast_convert_type(lo, jnp.float32)[:, 0]


@functools.partial(jax.jit, static_argnames=("stacked",))
def _thresholds(x, base, kth, *, stacked):
  """Per leaf, the TIES trim threshold of |x - base| per tensor (computed once per input, reused in pass 2)."""
  return [
    magnitude_threshold(jnp.abs(_rows(_f32(xi), s) - _rows(_f32(b), s)), k)
    for xi, b, k, s in zip(x, base, kth, stacked, strict=True)
  ]


def outlier_mask(a, n_bot, n_top):
  """Keep the entries ranked n_bot .. D - n_top - 1 by magnitude (stable sort: ties by position)."""
  order = jnp.argsort(a, axis=-1, stable=True)
  d = a.shape[-1]
  ranks = jnp.zeros_like(order).at[jnp.arange(a.shape[0])[:, None], order].set(jnp.arange(d)[None, :])
  return (ranks >= n_bot[:, None]) & (ranks < d - n_top[:, None])


def _sparsify(d, method: str, arg):
  if method == "none":
    return d
  if method == "magnitude":  # arg: (threshold per row, keep-all per row)
    thr, keep_all = arg
    return jnp.where((jnp.abs(d) >= thr[:, None]) | keep_all[:, None], d, 0.0)
  if method == "outliers":
    n_bot, n_top, keep_all = arg
    return jnp.where(outlier_mask(jnp.abs(d), n_bot, n_top) | keep_all[:, None], d, 0.0)
  if method == "random":
    key, density = arg
    keep = jax.random.bernoulli(key, density[:, None], d.shape)
    return jnp.where(density[:, None] >= 1.0, d, jnp.where(keep, d / density[:, None], 0.0))
  raise ValueError(method)


@functools.partial(jax.jit, static_argnames=("stacked", "method"), donate_argnums=0)
def _linear_step(acc, x, base, w, sparse_args, *, stacked, method):
  """acc + w * sparsify(x - base) per leaf (row view, float32)."""
  out = []
  for a, xi, b, wi, sa, s in zip(acc, x, base, w, sparse_args, stacked, strict=True):
    d = _sparsify(_rows(_f32(xi), s) - _rows(_f32(b), s), method, sa)
    out.append(d * wi[:, None] if a is None else a + d * wi[:, None])
  return out


@functools.partial(jax.jit, static_argnames=("stacked", "method"), donate_argnums=(0, 1))
def _agree_step(num, den, x, base, w, sign, sparse_args, *, stacked, method):
  """Disjoint merge: add w * sparsify(x - base) where it agrees with the elected sign (and w to the divisor)."""
  nums, dens = [], []
  for nu, de, xi, b, wi, sg, sa, s in zip(num, den, x, base, w, sign, sparse_args, stacked, strict=True):
    wd = _sparsify(_rows(_f32(xi), s) - _rows(_f32(b), s), method, sa) * wi[:, None]
    agree = jnp.where(sg > 0, wd > 0, wd < 0)
    nums.append(jnp.where(agree, wd, 0.0) if nu is None else nu + jnp.where(agree, wd, 0.0))
    wa = jnp.where(agree, wi[:, None], 0.0)
    dens.append(wa if de is None else de + wa)
  return nums, dens


@jax.jit
def elect_sign(total):
  """sign(sum of task vectors) per entry; a zero sum takes its tensor's majority sign (TIES reference)."""
  out = []
  for t in total:
    sg = jnp.sign(t)
    majority = jnp.sign(jnp.sum(sg, axis=-1, keepdims=True))
    out.append(jnp.where(sg == 0, majority, sg))
  return out


@functools.partial(jax.jit, static_argnames=("stacked",))
def _finish(base, mixed, lam, *, stacked):
  return [_rows(_f32(b), s) + lam_i[:, None] * m for b, m, lam_i, s in zip(base, mixed, lam, stacked, strict=True)]


@functools.partial(jax.jit, static_argnames=("stacked",))
def _slerp(x0, x1, t, *, stacked):
  """mergekit's slerp per tensor: normalised directions, lerp when |cos| > DOT_THRESHOLD."""
  out = []
  for a, b, ti, s in zip(x0, x1, t, stacked, strict=True):
    v0, v1, ti = _rows(_f32(a), s), _rows(_f32(b), s), ti[:, None]
    n0 = jnp.linalg.norm(v0, axis=-1, keepdims=True)
    n1 = jnp.linalg.norm(v1, axis=-1, keepdims=True)
    u0 = jnp.where(n0 > NORM_EPS, v0 / jnp.where(n0 > NORM_EPS, n0, 1.0), v0)
    u1 = jnp.where(n1 > NORM_EPS, v1 / jnp.where(n1 > NORM_EPS, n1, 1.0), v1)
    dot = jnp.sum(u0 * u1, axis=-1, keepdims=True)
    theta0 = jnp.arccos(jnp.clip(dot, -1.0, 1.0))
    sin0 = jnp.sin(theta0)
    safe = jnp.where(jnp.abs(dot) > DOT_THRESHOLD, 1.0, sin0)
    s0 = jnp.sin(theta0 - theta0 * ti) / safe
    s1 = jnp.sin(theta0 * ti) / safe
    lerp = (1.0 - ti) * v0 + ti * v1
    out.append(jnp.where(jnp.abs(dot) > DOT_THRESHOLD, lerp, s0 * v0 + s1 * v1))
  return out


@functools.partial(jax.jit, static_argnames=("stacked",), donate_argnums=(0, 1, 2))
def _stock_step(sum_x, sum_u, sum_uu, x, base, *, stacked):
  """Running sums of theta_i, of unit task vectors u_i and of |u_i|^2 (0 or 1) per tensor."""
  sx, su, suu = [], [], []
  for a, u, uu, xi, b, s in zip(sum_x, sum_u, sum_uu, x, base, stacked, strict=True):
    xr = _rows(_f32(xi), s)
    d = xr - _rows(_f32(b), s)
    n = jnp.linalg.norm(d, axis=-1, keepdims=True)
    unit = jnp.where(n > NORM_EPS, d / jnp.where(n > NORM_EPS, n, 1.0), 0.0)
    sx.append(xr if a is None else a + xr)
    su.append(unit if u is None else u + unit)
    norm2 = jnp.sum(unit * unit, axis=-1)
    suu.append(norm2 if uu is None else uu + norm2)
  return sx, su, suu


@functools.partial(jax.jit, static_argnames=("stacked", "n"))
def _stock_finish(sum_x, sum_u, sum_uu, base, *, stacked, n):
  """Mean pairwise cosine = (|sum u|^2 - sum |u|^2) / (N (N - 1)); t = N cos / (1 + (N - 1) cos)."""
  outs, ts = [], []
  for a, u, uu, b, s in zip(sum_x, sum_u, sum_uu, base, stacked, strict=True):
    cos = (jnp.sum(u * u, axis=-1) - uu) / (n * (n - 1))
    t = n * cos / (1.0 + (n - 1) * cos)
    outs.append(t[:, None] * (a / n) + (1.0 - t[:, None]) * _rows(_f32(b), s))
    ts.append(t)
  return outs, ts


# ----------------------------------------------------------------------------
# Inputs, base and streaming passes
# ----------------------------------------------------------------------------


def _metas(inputs) -> list[dict]:
  return list(inputs.metas) if hasattr(inputs, "metas") else [ld.meta for ld in inputs]


def _paths(inputs) -> list[str]:
  return (
    list(inputs.paths) if hasattr(inputs, "paths") else [str(getattr(ld, "path", i)) for i, ld in enumerate(inputs)]
  )


def resolve_base(inputs, base: str = "") -> tuple[str, int | None]:
  """The base checkpoint: `base` if given, else the `init_from` (path, step) every input records.

  Raises:
    ValueError: no `base` and the inputs do not all record the same `init_from`.
  """
  if base:
    return base, None
  recorded = []
  for m in _metas(inputs):
    prov = m.get("provenance") or {}
    recorded.append(
      (prov.get("init_from"), prov.get("step")) if prov.get("init_from") and not prov.get("transform") else (None, None)
    )
  if recorded and recorded[0][0] and all(r == recorded[0] for r in recorded):
    return recorded[0][0], recorded[0][1]
  listing = "; ".join(
    f"{os.path.basename(os.path.normpath(p))}: {r[0] or 'no init_from'}" + (f"@{r[1]}" if r[0] else "")
    for p, r in zip(_paths(inputs), recorded)
  )
  raise ValueError(
    "config.args.base: give the base (pre-trained) checkpoint; the inputs do not all record the "
    f"same init_from in their provenance ({listing})"
  )


def load_base(inputs, base: str, first_theta) -> tuple[dict, str]:
  """Loads the base's theta (placed like `first_theta`) and checks its tree against the inputs'.

  Raises:
    CheckpointError: a missing base checkpoint.
    trees.TreeMismatchError: a base whose tree differs from the inputs', listing the first differences.
  """
  path, step = resolve_base(inputs, base)
  try:
    ld = checkpoint.load(path, step)
  except checkpoint.CheckpointError as e:
    raise checkpoint.CheckpointError(f"config.args.base: {e}") from e
  d = trees.diff(jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), first_theta), ld.theta)
  if d:
    raise trees.mismatch_error(f"base {path} does not have the same parameter tree as the inputs", d,
                               "the base must be the model they were fine-tuned from")
  theta = jax.tree.map(
    lambda b, x: jax.device_put(b, x.sharding) if hasattr(x, "sharding") else b, ld.theta, first_theta
  )
  return theta, os.path.abspath(path)


def _check_same(ref_abstract, theta, ref_path: str, path: str) -> None:
  d = trees.diff(ref_abstract, theta)
  if d:
    raise trees.mismatch_error(f"merge: {path} does not have the same parameter tree as {ref_path}", d)


class _Stream:
  """Iterates over the inputs (one loaded at a time), checking each tree against the first's.

  Keeps the first input's theta structure, the base, the layout, and the
  running mean of the inputs' model_state (averaged in the first pass).
  """

  def __init__(self, inputs, base: str | None, layer_leaves: Sequence[str], base_theta=None):
    self.inputs, self.base_arg, self.layer_leaves = inputs, base, tuple(layer_leaves)
    self.base_theta = base_theta
    self.n = len(inputs)
    if self.n == 0:
      raise ValueError("merge: no input checkpoints given")
    self.paths = _paths(inputs)
    self.passes = 0
    self.theta0 = self.ref = self.base = self.base_path = self.layout = self.model_state = None

  def __iter__(self):
    """Yields `(i, float leaves of theta_i)`; the first pass also averages model_state (float64 on the host)."""
    self.passes += 1
    ms_sum = ms_dtypes = None
    for i in range(self.n):
      ld = self.inputs[i]
      theta = ld.theta
      if self.ref is None:
        self.ref = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), theta)
        self.theta0 = theta
        self.layout = Layout.of(theta, self.layer_leaves)
        if self.base_theta is not None:
          _check_same(self.ref, self.base_theta, self.paths[0], "the base")
          self.base = self.base_theta
        elif self.base_arg is not None:
          self.base, self.base_path = load_base(self.inputs, self.base_arg, theta)
      else:
        _check_same(self.ref, theta, self.paths[0], self.paths[i])
      if self.passes == 1:
        ms = jax.tree.map(np.asarray, dict(ld.model_state))
        if ms_sum is None:
          ms_dtypes = jax.tree.map(lambda x: x.dtype, ms)
          ms_sum = jax.tree.map(lambda x: x.astype(np.float64) if np.issubdtype(x.dtype, np.inexact) else x, ms)
        else:
          ms_sum = jax.tree.map(lambda a, b: a + b if np.issubdtype(a.dtype, np.inexact) else a, ms_sum, ms)
      flat = trees.flatten(theta)
      leaves = [flat[n] for n in self.layout.names]
      del ld, theta, flat
      yield i, leaves
      del leaves
    if self.passes == 1:
      self.model_state = jax.tree.map(
        lambda a, d: (a / self.n).astype(d) if np.issubdtype(d, np.inexact) else a, ms_sum, ms_dtypes
      )

  def base_leaves(self) -> list:
    """The base's float leaves as device arrays (transferred once, not at every kernel call)."""
    flat = trees.flatten(self.base)
    return [jnp.asarray(flat[n]) for n in self.layout.names]

  def output(self, leaves: list, report: dict) -> Output:
    theta = self.layout.unflatten_like(self.base if self.base is not None else self.theta0, leaves)
    report = {"num_inputs": self.n, "passes_over_inputs": self.passes, **report}
    if self.base_path:
      report["base"] = self.base_path
    return Output(theta=theta, model_state=self.model_state or {}, report=report)


def _sparse_args(
  layout: Layout, method: str, density: list[np.ndarray], gamma: list[np.ndarray] | None, seed: int, index: int
) -> list:
  """Per-leaf arguments of `_sparsify`, computed on the host with Python integers (as the references do)."""
  out = []
  for i, name in enumerate(layout.names):
    d, size = density[i], layout.size(i)
    if method == "none":
      out.append(None)
    elif method == "magnitude":  # TIES reference: k = D - int(D * density); keep |x| >= k-th smallest
      keep = np.array([size if v >= 1.0 else int(size * v) for v in d], np.int64)
      out.append(jnp.asarray(np.where(keep >= size, 0, size - keep), jnp.int32))
    elif method == "outliers":  # mergekit's magnitude_outliers
      n_bot, n_top = [], []
      for v, g in zip(d, gamma[i]):
        target, top = int(v * size), int(g * size)
        bot = size - target - top
        if bot < 0:
          top, bot = top + bot, 0
        n_bot.append(bot)
        n_top.append(top)
      out.append((jnp.asarray(n_bot, jnp.int32), jnp.asarray(n_top, jnp.int32), jnp.asarray(d >= 1.0)))
    elif method == "random":
      out.append((leaf_key(seed, index, name), jnp.asarray(d, jnp.float32)))
    else:
      raise ValueError(method)
  return out


def leaf_key(seed: int, index: int, name: str):
  """The DARE key of input `index`'s leaf `name`: fold_in(fold_in(key(seed), index), crc32(name))."""
  return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), index), zlib.crc32(name.encode()) & 0x7FFFFFFF)


def generalized_task_arithmetic(
  inputs,
  *,
  base: str | None,
  weights,
  lam,
  method: str = "none",
  density=None,
  gamma=None,
  seed: int = 0,
  consensus: bool = False,
  normalize: bool = False,
  layer_leaves: Sequence[str] = DEFAULT_LAYER_LEAVES,
  base_theta=None,
) -> Output:
  """theta = base + lambda * mix_i(w_i * sparsify(theta_i - base)), streamed over the inputs.

  Without `consensus`, mix is the sum (divided by sum_i w_i if `normalize`),
  one pass. With `consensus` (TIES sign election), a first pass sums the
  weighted sparsified task vectors to elect a sign per entry and a second pass
  keeps the entries that agree with it: their sum, divided by the sum of their
  weights if `normalize` (TIES' disjoint mean).

  Args:
    inputs: the engine's lazy `Inputs` or loaded checkpoints (fine-tunes of `base`).
    base: base checkpoint path ('' = the inputs' shared `init_from`).
    weights: per-input weight spec (`weights_spec`).
    lam: lambda spec (`coefficient`).
    method: 'none', 'magnitude' (TIES trim), 'random' (DARE), 'outliers' (breadcrumbs).
    density, gamma: specs of the kept fraction and of the largest fraction dropped.
    seed: DARE seed.
    consensus: TIES sign election and disjoint merge.
    normalize: divide by the (agreeing) weights' sum.
    layer_leaves: regexes of leaves stacked on the depth axis.
    base_theta: the base's theta tree itself (Python use, e.g. benchmarks over foreign files); overrides `base`.
  """
  st = _Stream(inputs, base or "", layer_leaves, base_theta)
  w_specs = weights_spec(weights, st.n)
  acc = sign = num = den = None
  lay = w = lam_v = dens = gam = None

  def setup():
    nonlocal lay, w, lam_v, dens, gam
    lay = st.layout
    w = [[jnp.asarray(v, jnp.float32) for v in lay.values(c)] for c in w_specs]
    lam_v = [jnp.asarray(v, jnp.float32) for v in lay.values(coefficient(lam, "scale", 1.0))]
    dens = _check_range(lay, coefficient(density, "density", 1.0), 0.0, 1.0, lo_open=True)
    gam = _check_range(lay, coefficient(gamma, "gamma", 0.01), 0.0, 1.0) if method == "outliers" else None

  thresholds = {}  # TIES: per input, per leaf, the trim threshold of each tensor (a few floats), found once

  def sparse_args(i, x):
    sa = _sparse_args(lay, method, dens, gam, seed, i)
    if method != "magnitude":
      return sa
    if i not in thresholds:
      thresholds[i] = _thresholds(x, base_leaves, sa, stacked=lay.stacked)
    return [(t, k <= 0) for t, k in zip(thresholds[i], sa, strict=True)]

  for i, x in st:
    if lay is None:
      setup()
      base_leaves = st.base_leaves()
    acc = _linear_step(
      acc or [None] * len(x), x, base_leaves, w[i], sparse_args(i, x), stacked=lay.stacked, method=method
    )
    del x  # before the next input is loaded
  if consensus:
    sign = elect_sign(acc)
    del acc
    for i, x in st:
      num, den = _agree_step(
        num or [None] * len(x),
        den or [None] * len(x),
        x,
        base_leaves,
        w[i],
        sign,
        sparse_args(i, x),
        stacked=lay.stacked,
        method=method,
      )
      del x
    del sign
    mixed = [nu / jnp.where(de == 0, 1.0, de) for nu, de in zip(num, den)] if normalize else num
  else:
    if normalize:
      total = [sum(w[i][j] for i in range(st.n)) for j in range(len(lay.names))]
      mixed = [a / jnp.where(jnp.abs(t) < 1e-8, 1.0, t)[:, None] for a, t in zip(acc, total)]
    else:
      mixed = acc
  out = _finish(base_leaves, mixed, lam_v, stacked=lay.stacked)
  return st.output(out, {"method": method, "consensus": consensus, "normalize": normalize})


class _OneTensor:
  """Inputs holding one named tensor each, read on demand (for `merge_tensorwise`)."""

  def __init__(self, read, n: int, name: str):
    self.read, self.n, self.name = read, n, name
    self.paths = [f"input {i}" for i in range(n)]
    self.metas = [{} for _ in range(n)]

  def __len__(self) -> int:
    return self.n

  def __getitem__(self, i):
    import types

    return types.SimpleNamespace(theta={self.name: self.read(i, self.name)}, model_state={}, meta={})


def merge_tensorwise(read, base_read, names: Sequence[str], n: int, **kw) -> dict[str, np.ndarray]:
  """`generalized_task_arithmetic` one tensor at a time, for files that read single tensors (safetensors).

  Memory: the merged tensors plus a few copies of one tensor, whatever N and the model size; the same
  formulas, coefficient rules (matched against the tensor names) and DARE keys as the model-streaming path.

  Args:
    read: `read(i, name) -> array`, tensor `name` of input i (0 <= i < n).
    base_read: `base_read(name) -> array`, the base's tensor.
    names: the tensor names to merge.
    n: number of inputs.
    **kw: `generalized_task_arithmetic` arguments (weights, lam, method, density, ...); `layer_leaves`
      default () (every tensor is one tensor of the model).

  Returns:
    `{name: merged numpy array}`.
  """
  kw.setdefault("layer_leaves", ())
  out = {}
  for name in names:
    res = generalized_task_arithmetic(_OneTensor(read, n, name), base=None, base_theta={name: base_read(name)}, **kw)
    out[name] = np.asarray(trees.flatten(res.theta)[name])
  return out


# ----------------------------------------------------------------------------
# Transforms
# ----------------------------------------------------------------------------

_COEF_DOC = (
  "; a number, per-layer anchors '[a, ..., z]' across depth, or '[(regex, value), ...]' rules over "
  "theta paths (first match wins)"
)
# Doc lines of the parameters several merge methods take (each default is in its method's signature).
_DOCS = {
  "base": "base (pre-trained) checkpoint; '' = the init_from every input records",
  "weights": "per-input weights '(w_1, ..., w_N)', each a coefficient; '' = all 1",
  "layer_leaves": "regexes of leaves stacked on the depth axis (one tensor per layer)",
  "scale": "lambda: scale of the merged task vector" + _COEF_DOC,
  "density": "fraction of each task vector's entries kept, in (0, 1]" + _COEF_DOC,
}


@register(
  "task_arithmetic",
  idea="base + lambda * sum_i w_i (theta_i - base): add the fine-tunes' task vectors to the "
  "pre-trained model (streaming, 1 pass)",
  reference=TASK_ARITHMETIC_REF,
  inputs="N",
  streaming=True,
  averages=True,
  docs=_DOCS,
)
def task_arithmetic(inputs, *, base: str = "", scale: str = "1.0", weights: str = "",
                    layer_leaves: tuple = DEFAULT_LAYER_LEAVES) -> Output:
  """theta = base + lambda * sum_i w_i tau_i (no normalisation, as mergekit). One pass over the inputs."""
  return generalized_task_arithmetic(inputs, base=base, weights=weights, lam=scale, layer_leaves=layer_leaves)


@register(
  "ties_merge",
  idea="TIES: trim each task vector to its top-density magnitudes per tensor, elect a sign per "
  "entry by summed mass, average the agreeing entries, scale by lambda (streaming, 2 passes)",
  reference=TIES_REF,
  inputs="N",
  streaming=True,
  averages=True,
  docs=_DOCS,
)
def ties_merge(inputs, *, base: str = "", density: str = "0.2", scale: str = "1.0", weights: str = "",
               layer_leaves: tuple = DEFAULT_LAYER_LEAVES) -> Output:
  """TIES-Merging. Two passes over the inputs: (1) trimmed task vectors summed to elect signs, (2) disjoint mean.

  Trim as the reference `topk_values_mask`: keep |tau| >= the k-th smallest
  magnitude of its tensor, k = D - int(D * density) (ties at the threshold are
  all kept). Sign: sign(sum_i w_i trim(tau_i)); a zero sum takes the sign of
  its tensor's summed signs (reference `resolve_zero_signs('majority')`).
  Disjoint mean: sum of the agreeing w_i trim(tau_i) over the sum of their w_i.
  """
  return generalized_task_arithmetic(
    inputs,
    base=base,
    weights=weights,
    lam=scale,
    method="magnitude",
    density=density,
    consensus=True,
    normalize=True,
    layer_leaves=layer_leaves,
  )


@register(
  "dare",
  idea="DARE: drop each task-vector entry with probability 1 - density and rescale the rest by "
  "1/density, then combine linearly (1 pass) or with TIES sign election (2 passes); deterministic per seed",
  reference=DARE_REF,
  inputs="N",
  streaming=True,
  averages=True,
  docs=_DOCS,
)
def dare(
  inputs,
  *,
  base: str = "",
  density: str = "0.5",
  scale: str = "1.0",
  weights: str = "",
  combine: Literal["linear", "ties"] = "linear",
  seed: int = 0,
  layer_leaves: tuple = DEFAULT_LAYER_LEAVES,
) -> Output:
  """DARE (drop and rescale). 'linear': one pass; 'ties': two passes (the masks are regenerated from the keys).

  Args:
    inputs: the fine-tuned checkpoints.
    combine: 'linear' (sum) or 'ties' (sign election, disjoint mean)
    seed: seed of the drop masks (per input and leaf: fold_in(index), fold_in(crc32(path)))
  """
  ties = combine == "ties"
  return generalized_task_arithmetic(
    inputs,
    base=base,
    weights=weights,
    lam=scale,
    method="random",
    density=density,
    seed=seed,
    consensus=ties,
    normalize=ties,
    layer_leaves=layer_leaves,
  )


@register(
  "breadcrumbs",
  idea="Model breadcrumbs: per tensor, drop the largest gamma fraction of task-vector magnitudes "
  "and the smallest ones so that density is kept, then combine linearly (streaming, 1 pass)",
  reference=BREADCRUMBS_REF,
  inputs="N",
  streaming=True,
  averages=True,
  docs={**_DOCS, "gamma": "fraction of largest magnitudes dropped per tensor" + _COEF_DOC},
)
def breadcrumbs(
  inputs, *, base: str = "", density: str = "0.9", gamma: str = "0.01", scale: str = "1.0", weights: str = "",
  layer_leaves: tuple = DEFAULT_LAYER_LEAVES,
) -> Output:
  """Breadcrumbs as mergekit's `magnitude_outliers`: n_top = int(gamma D), n_bot = D - int(density D) - n_top
  (if negative, fewer top entries are dropped); entries ranked by a stable sort of |tau|. One pass."""
  return generalized_task_arithmetic(
    inputs,
    base=base,
    weights=weights,
    lam=scale,
    method="outliers",
    density=density,
    gamma=gamma,
    layer_leaves=layer_leaves,
  )


@register(
  "slerp",
  idea="Spherical interpolation of two checkpoints per tensor with t (linear when nearly parallel), "
  "as mergekit defines it",
  reference=SLERP_REF,
  inputs="2",
  streaming=True,
  averages=True,
  docs={**_DOCS, "t": "0 gives the first input, 1 the second" + _COEF_DOC},
)
def slerp(inputs, *, t: str = "0.5", layer_leaves: tuple = DEFAULT_LAYER_LEAVES) -> Output:
  """Per tensor: slerp of the raw weights along the great circle of their directions, lerp if |cos| > 0.9995.

  One pass (both inputs are held: 2 models). model_state is the mean of the two.
  """
  st = _Stream(inputs, None, layer_leaves)
  leaves = []
  for _, x in st:
    leaves.append(x)
  tv = [jnp.asarray(v, jnp.float32) for v in st.layout.values(coefficient(t, "t", 0.5))]
  out = _slerp(leaves[0], leaves[1], tv, stacked=st.layout.stacked)
  return st.output(out, {"t": str(t)})


@register(
  "model_stock",
  idea="Model Stock: per tensor, move the fine-tunes' average towards the base by t = N cos / "
  "(1 + (N - 1) cos), cos the mean angle between task vectors (streaming, 1 pass)",
  reference=MODEL_STOCK_REF,
  inputs="N",
  streaming=True,
  averages=True,
  docs=_DOCS,
)
def model_stock(inputs, *, base: str = "", layer_leaves: tuple = DEFAULT_LAYER_LEAVES) -> Output:
  """Model Stock (Jang et al. 2024, eq. for N fine-tunes as mergekit): one pass.

  The mean pairwise cosine of the task vectors comes from running sums of unit
  task vectors, sum_{i<j} <u_i, u_j> = (|sum_i u_i|^2 - sum_i |u_i|^2) / 2, so
  no pair is held. Needs at least two fine-tunes. Report: mean t per leaf.
  """
  if len(inputs) < 2:
    raise ValueError("model_stock: needs at least two fine-tuned inputs (plus the base)")
  st = _Stream(inputs, base or "", layer_leaves)
  sx = su = suu = None
  for _, x in st:
    if sx is None:
      b = st.base_leaves()
      sx, su, suu = [None] * len(x), [None] * len(x), [None] * len(x)
    sx, su, suu = _stock_step(sx, su, suu, x, b, stacked=st.layout.stacked)
    del x
  out, ts = _stock_finish(sx, su, suu, b, stacked=st.layout.stacked, n=st.n)
  report = {"t": {n: np.asarray(t).tolist() for n, t in zip(st.layout.names, ts)}}
  return st.output(out, report)
