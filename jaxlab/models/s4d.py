"""S4D: diagonal state space layer (Gu, Gupta, Goel, Re, NeurIPS 2022) in Flax Linen.

Each of the H channels is an independent SISO state space model with N/2
complex modes (N = `d_state`; conjugate symmetry gives a real N-dim SSM):

    A = -exp(log_A_real) + i * A_imag        [H, N/2]
    dt = exp(log_dt)                         [H]   (log dt ~ U[log dt_min, log dt_max])
    B, C complex, D real (skip)

Discretization (elementwise): ZOH `dA = exp(dt A)`, `dB = (exp(dt A) - 1) / A * B`;
bilinear `dA = (1 + dt A / 2) / (1 - dt A / 2)`, `dB = dt / (1 - dt A / 2) * B`.
Kernel (Vandermonde): `K_l = 2 Re sum_n C_n dB_n dA_n^l`, computed in chunks of
`chunk_size` positions (`vandermonde_kernel`), so memory is O(H (N + L)) plus one
[H, N/2, chunk] table instead of O(H N L). Output `y = K * u + D u` by FFT
convolution padded to 2L (`causal_conv`); without padding the circular
wrap-around corrupts the output.

Bidirectional layout (as the official FFTConv): C carries two channels; the
forward kernel k0 and the backward kernel k1 are combined into one length-2L
kernel `[k0, 0...0] + [0...0, reverse(k1)]`, giving

    y_t = sum_{s<=t} k0_s u_{t-s}  +  sum_{m>=1} k1_{m-1} u_{t+m}  +  D u_t

i.e. the anti-causal half starts at u_{t+1} (k1_0 multiplies u_{t+1}); this
off-by-one is deliberate and matches the official code.

Recurrent (step) mode: `x_k = dA x_{k-1} + dB u_k`, `y_k = 2 Re(C x_k) + D u_k`
with a carried complex state [B, H, N/2]; over L steps it equals the
convolution (tested). Not available for bidirectional layers.

The layer (`S4D`) is the official block body: SSM -> GELU -> dropout (tied over
the sequence axis) -> Dense H->2H -> GLU. Parameter paths under the layer:

    log_dt [H]; log_A_real [H, N/2]; A_imag [H, N/2]
    B [H, N/2, 2]          complex, stored as (real, imag)
    C [c, H, N/2, 2]       complex, c = 2 if bidirectional else 1
    D [H]
    output_linear/{kernel [H, 2H], bias [2H]}

Initialisations (`init`): 'lin' (A_n = -1/2 + i pi n, B = 1), 'inv'
(A_n = -1/2 + i N/pi (N/(2n+1) - 1), B = 1), 'legs' (diagonal of the normal part
of HiPPO-LegS: Re = -1/2, B = V^* B_LegS with Im B clipped to [-2, 2]), 'real'
(A_n = -(n+1), B = 1). C ~ complex normal (each part N(0, 1/2)), D ~ N(0, 1).
The official code uses A = -Re - i Im; the sign of Im A is irrelevant
(conjugate pairs), so jaxlab stores positive imaginary parts (LegS's B is
conjugated accordingly).

Optimizer rule: `optimizer_rules(lr)` returns the config entries that give the
SSM parameters (log_dt, log_A_real, A_imag, B: regex `SSM_PARAMS`) their own
learning rate min(0.001, lr) and no weight decay, as in the paper's code.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

INITS = ("lin", "inv", "legs", "real")
DISCS = ("zoh", "bilinear")

# Regex (full match on `/`-joined parameter paths) of the SSM parameters that get
# their own learning rate and no weight decay.
SSM_PARAMS = r"(.*/)?s4d/(log_dt|log_A_real|A_imag|B)"


def optimizer_rules(lr: float, ssm_lr: float = 1e-3) -> tuple[tuple[tuple[str, float], ...], tuple[str, ...]]:
  """`config.optimizer` entries giving SSM parameters lr min(ssm_lr, lr) and no weight decay.

  Args:
    lr: the global (peak) learning rate of the config.
    ssm_lr: the SSM learning rate (0.001 in the paper's configs).

  Returns:
    `(lr_rules, no_decay_extra)`: `lr_rules` is `((SSM_PARAMS, multiplier),)`; the
    multiplier scales the global schedule, so the SSM group follows the same
    warmup/cosine shape with peak `min(ssm_lr, lr)`. Append `no_decay_extra` to
    `config.optimizer.no_decay`.

  Raises:
    ValueError: for a non-positive learning rate.
  """
  if lr <= 0 or ssm_lr <= 0:
    raise ValueError(f"optimizer_rules: learning rates must be positive, got lr={lr}, ssm_lr={ssm_lr}")
  return ((SSM_PARAMS, min(ssm_lr, lr) / lr),), (SSM_PARAMS,)


# ----------------------------------------------------------------------------
# Initialisation (numpy, deterministic parts)
# ----------------------------------------------------------------------------


def hippo_legs_normal(n: int) -> tuple[np.ndarray, np.ndarray]:
  """Diagonal of the normal part of HiPPO-LegS: (eigenvalues [n/2], B [n/2]), one per conjugate pair.

  A_LegS[i, j] = -sqrt(2i+1) sqrt(2j+1) (i > j), -(i+1) (i = j), 0 (i < j);
  P_i = sqrt(i + 1/2); S = A + P P^T = -1/2 I + skew. Eigenvalues -1/2 + i w with
  w from `eigh(-i S)`; the half with w > 0 is kept, B = V^* B_LegS (B_LegS,i =
  sqrt(2i+1)) with its imaginary part clipped to [-2, 2] (official B_clip).
  """
  q = np.sqrt(1 + 2 * np.arange(n, dtype=np.float64))
  a = -(np.tril(np.outer(q, q)) - np.diag(np.arange(n, dtype=np.float64)))
  p = np.sqrt(np.arange(n, dtype=np.float64) + 0.5)
  s = a + np.outer(p, p)
  w_re = np.mean(np.diag(s))
  w_im, v = np.linalg.eigh(s * -1j)
  order = np.argsort(-w_im)           # positive imaginary parts first
  w_im, v = w_im[order][: n // 2], v[:, order][:, : n // 2]
  b = v.conj().T @ q.astype(np.complex128)
  b = b.real + 1j * np.clip(b.imag, -2.0, 2.0)
  return w_re + 1j * w_im, b


def init_ab(init: str, d_state: int) -> tuple[np.ndarray, np.ndarray]:
  """Initial diagonal A [N/2] (complex, Re < 0) and B [N/2] for an initialisation name.

  Raises:
    ValueError: for an unknown init or an odd / non-positive d_state.
  """
  if d_state < 2 or d_state % 2:
    raise ValueError(f"model.d_state must be a positive even number (N/2 complex modes), got {d_state}")
  n = np.arange(d_state // 2, dtype=np.float64)
  ones = np.ones_like(n, dtype=np.complex128)
  if init == "lin":
    return -0.5 + 1j * np.pi * n, ones
  if init == "inv":
    return -0.5 + 1j * (d_state / np.pi) * (d_state / (2 * n + 1) - 1), ones
  if init == "legs":
    return hippo_legs_normal(d_state)
  if init == "real":
    return -(n + 1) + 0j, ones
  raise ValueError(f"model.init: unknown S4D initialisation {init!r}; choose from {', '.join(INITS)}")


# ----------------------------------------------------------------------------
# Pure functions: discretization, kernel, convolution, recurrence
# ----------------------------------------------------------------------------


def to_complex(x: jax.Array) -> jax.Array:
  """[..., 2] real array -> complex [...]."""
  return jax.lax.complex(x[..., 0], x[..., 1])


def ssm_params(p: dict) -> dict[str, jax.Array]:
  """The complex SSM quantities from a layer's raw param dict.

  Returns:
    dict with dt [H], A [H, M], B [H, M], C [c, H, M] (complex64), D [H].
  """
  a = -jnp.exp(p["log_A_real"]) + 1j * p["A_imag"]
  return {"dt": jnp.exp(p["log_dt"]), "A": a.astype(jnp.complex64), "B": to_complex(p["B"]),
          "C": to_complex(p["C"]), "D": p["D"]}


def discretize(dt: jax.Array, a: jax.Array, b: jax.Array, disc: str) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Elementwise discretization of a diagonal SSM.

  Args:
    dt: [H] step sizes; a, b: [H, M] complex.
    disc: 'zoh' or 'bilinear'.

  Returns:
    `(log_dA, dA, dB)`, each [H, M]; `exp(l * log_dA) == dA ** l` for integer l.

  Raises:
    ValueError: for an unknown discretization.
  """
  dta = dt[:, None] * a
  if disc == "zoh":
    da = jnp.exp(dta)
    return dta, da, b * (da - 1.0) / a
  if disc == "bilinear":
    da = (1.0 + dta / 2) / (1.0 - dta / 2)
    return jnp.log(da), da, b * dt[:, None] / (1.0 - dta / 2)
  raise ValueError(f"model.disc: unknown discretization {disc!r}; choose from {', '.join(DISCS)}")


def vandermonde_kernel(coef: jax.Array, log_a: jax.Array, length: int, chunk_size: int = 1024) -> jax.Array:
  """`K[..., h, l] = 2 Re sum_m coef[..., h, m] exp(l log_a[h, m])` for l < length, in chunks.

  One table `exp(j log_a)` for j < chunk is shared by every chunk; chunk c starts at
  `exp(c * chunk * log_a)`. Memory: O(H M chunk + H L) in the forward and backward
  pass (the chunk loop is a `lax.map`, whose per-chunk residuals are [H, M]).

  Args:
    coef: complex [..., H, M] (C * dB, optionally with leading channel axes).
    log_a: complex [H, M] (log of the discrete state matrix).
    length: kernel length L.
    chunk_size: positions per chunk (the whole kernel at once if >= L).

  Returns:
    float32 [..., H, L].
  """
  chunk = max(1, min(int(chunk_size), int(length)))
  n_chunks = -(-int(length) // chunk)
  j = jnp.arange(chunk, dtype=jnp.float32)
  table = jnp.exp(log_a[..., None] * j)                                   # [H, M, chunk]

  def one(start):
    c = coef * jnp.exp(log_a * start)                                     # [..., H, M]
    return 2.0 * jnp.einsum("...hm,hmj->...hj", c, table).real

  if n_chunks == 1:
    k = one(jnp.zeros((), jnp.float32))
  else:
    starts = jnp.arange(n_chunks, dtype=jnp.float32) * chunk
    k = jax.lax.map(one, starts)                                          # [n, ..., H, chunk]
    k = jnp.moveaxis(k, 0, -2).reshape(*k.shape[1:-1], n_chunks * chunk)
  return k[..., :length].astype(jnp.float32)


def ssm_kernel(p: dict, length: int, disc: str = "zoh", chunk_size: int = 1024) -> jax.Array:
  """The convolution kernel(s) [c, H, L] of a layer's raw param dict (c = 2 if bidirectional)."""
  s = ssm_params(p)
  log_da, _, db = discretize(s["dt"], s["A"], s["B"], disc)
  return vandermonde_kernel(s["C"] * db, log_da, length, chunk_size)


def causal_conv(u: jax.Array, k: jax.Array, pad: bool = True) -> jax.Array:
  """Causal convolution `y_t = sum_{s<=t} k_s u_{t-s}` by FFT.

  Args:
    u: [B, L, H] inputs; k: [H, L] kernel.
    pad: FFT length 2L (exact). `pad=False` uses length L, i.e. a circular
      convolution whose wrap-around is wrong (kept only to demonstrate that).

  Returns:
    [B, L, H] float32.
  """
  length = u.shape[1]
  n = 2 * length if pad else length
  uf = jnp.fft.rfft(u.astype(jnp.float32), n=n, axis=1)
  kf = jnp.fft.rfft(k.astype(jnp.float32).T, n=n, axis=0)
  return jnp.fft.irfft(uf * kf[None], n=n, axis=1)[:, :length]


def bidirectional_kernel(k0: jax.Array, k1: jax.Array) -> jax.Array:
  """Length-2L kernel `[k0, 0...] + [0..., reverse(k1)]` (k0, k1: [H, L]) -> [H, 2L]."""
  zeros = jnp.zeros_like(k0)
  return jnp.concatenate([k0, zeros], -1) + jnp.concatenate([zeros, k1[..., ::-1]], -1)


def bidirectional_conv(u: jax.Array, k0: jax.Array, k1: jax.Array) -> jax.Array:
  """`y_t = sum_{s<=t} k0_s u_{t-s} + sum_{m>=1} k1_{m-1} u_{t+m}` by one 2L FFT. u: [B, L, H]."""
  length = u.shape[1]
  k = bidirectional_kernel(k0, k1)
  uf = jnp.fft.rfft(u.astype(jnp.float32), n=2 * length, axis=1)
  kf = jnp.fft.rfft(k.T, n=2 * length, axis=0)
  return jnp.fft.irfft(uf * kf[None], n=2 * length, axis=1)[:, :length]


def step_matrices(p: dict, disc: str = "zoh") -> dict[str, jax.Array]:
  """dA, dB [H, M], C [H, M] (first channel) and D [H] for recurrent mode."""
  s = ssm_params(p)
  _, da, db = discretize(s["dt"], s["A"], s["B"], disc)
  return {"dA": da, "dB": db, "C": s["C"][0], "D": s["D"]}


def ssm_step(m: dict, u: jax.Array, state: jax.Array) -> tuple[jax.Array, jax.Array]:
  """One recurrent step: `x = dA x + dB u`, `y = 2 Re(sum C x) + D u`. u: [B, H]; state: [B, H, M] complex."""
  state = m["dA"] * state + m["dB"] * u[..., None].astype(m["dB"].dtype)
  y = 2.0 * jnp.einsum("hm,bhm->bh", m["C"], state).real + m["D"] * u
  return y.astype(jnp.float32), state


def ssm_scan(m: dict, u: jax.Array, state: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Runs `ssm_step` over a chunk u [B, L, H] from `state`; returns (y [B, L, H], final state)."""
  def body(x, u_t):
    y, x = ssm_step(m, u_t, x)
    return x, y
  state, ys = jax.lax.scan(body, state, jnp.swapaxes(u, 0, 1))
  return jnp.swapaxes(ys, 0, 1), state


# ----------------------------------------------------------------------------
# The layer
# ----------------------------------------------------------------------------


def _uniform_log(lo: float, hi: float):
  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, math.log(lo), math.log(hi))
  return init


class S4D(nn.Module):
  """S4D layer: SSM (+ D u) -> GELU -> dropout -> Dense(2H) -> GLU, on [B, L, H].

  Attributes:
    d_state: N (N/2 complex modes per channel).
    ssm_init: 'lin' | 'inv' | 'legs' | 'real' (config key `init`; `init` is taken by Flax).
    disc: 'zoh' | 'bilinear'.
    dt_min, dt_max: range of the log-uniform step size init.
    bidirectional: two kernels (forward and backward) combined as documented above.
    dropout: rate of the dropout after GELU, tied over the sequence axis.
    chunk_size: Vandermonde chunk length.
  """
  d_state: int = 64
  ssm_init: str = "lin"
  disc: str = "zoh"
  dt_min: float = 1e-3
  dt_max: float = 1e-1
  bidirectional: bool = False
  dropout: float = 0.0
  chunk_size: int = 1024

  def _params(self, h: int) -> dict:
    a, b = init_ab(self.ssm_init, self.d_state)
    if self.disc not in DISCS:
      raise ValueError(f"model.disc: unknown discretization {self.disc!r}; choose from {', '.join(DISCS)}")
    if not 0 < self.dt_min <= self.dt_max:
      raise ValueError(f"model.dt_min/dt_max: need 0 < dt_min <= dt_max, got {self.dt_min}, {self.dt_max}")
    m = self.d_state // 2
    c = 2 if self.bidirectional else 1
    rep = lambda x: jnp.broadcast_to(jnp.asarray(x, jnp.float32), (h, *np.shape(x)))  # noqa: E731
    b_ri = np.stack([b.real, b.imag], -1)
    return {
        "log_dt": self.param("log_dt", _uniform_log(self.dt_min, self.dt_max), (h,)),
        "log_A_real": self.param("log_A_real", lambda k, s: rep(np.log(-a.real)), (h, m)),
        "A_imag": self.param("A_imag", lambda k, s: rep(a.imag), (h, m)),
        "B": self.param("B", lambda k, s: rep(b_ri), (h, m, 2)),
        "C": self.param("C", nn.initializers.normal(stddev=math.sqrt(0.5)), (c, h, m, 2)),
        "D": self.param("D", nn.initializers.normal(stddev=1.0), (h,)),
    }

  def _post(self, y, train: bool, tie_axis: int | None):
    y = nn.gelu(y, approximate=False)
    dims = () if tie_axis is None else (tie_axis,)
    y = nn.Dropout(self.dropout, broadcast_dims=dims)(y, deterministic=not train)
    y = nn.Dense(2 * y.shape[-1], name="output_linear")(y)
    return nn.glu(y, axis=-1)

  @nn.compact
  def __call__(self, u: jax.Array, train: bool = False, state: jax.Array | None = None):
    """Convolution mode (`state=None`): u [B, L, H] -> [B, L, H].

    Step/streaming mode (`state` [B, H, N/2] complex): u [B, H] (one step) or
    [B, L, H] (a chunk, run by `lax.scan`) -> (y, new state).

    Raises:
      ValueError: step mode on a bidirectional layer, or a bad input rank.
    """
    h = u.shape[-1]
    p = self._params(h)
    if state is None:
      if u.ndim != 3:
        raise ValueError(f"S4D: convolution mode expects [batch, length, channels], got shape {u.shape}")
      length = u.shape[1]
      k = ssm_kernel(p, length, self.disc, self.chunk_size)
      if self.bidirectional:
        y = bidirectional_conv(u, k[0], k[1])
      else:
        y = causal_conv(u, k[0])
      y = y + p["D"] * u
      return self._post(y, train, 1)
    if self.bidirectional:
      raise ValueError("S4D: step/streaming mode needs a causal layer (bidirectional=False)")
    m = step_matrices(p, self.disc)
    if u.ndim == 2:
      y, state = ssm_step(m, u, state)
      return self._post(y, train, None), state
    if u.ndim == 3:
      y, state = ssm_scan(m, u, state)
      return self._post(y, train, 1), state
    raise ValueError(f"S4D: step mode expects [batch, channels] or [batch, length, channels], got {u.shape}")


def zero_state(batch: int, d_model: int, d_state: int) -> jax.Array:
  """Zero recurrent state [B, H, N/2] complex64 for one layer."""
  return jnp.zeros((batch, d_model, d_state // 2), jnp.complex64)


def layer_params_at(params: dict, layer: int | None = None, path: str = "blocks/s4d") -> dict:
  """The raw S4D param dict at `path` of a model's params (index `layer` of a stacked depth axis)."""
  node: Any = params
  for part in path.split("/"):
    node = node[part]
  if layer is None:
    return dict(node)
  return {k: v[layer] for k, v in node.items() if k != "output_linear"}
