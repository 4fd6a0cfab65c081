"""The small model zoo of the MNIST-1D paper's baselines (Greydanus and Kobak), in Flax Linen.

Registered names and their default sizes, as the baselines of the paper's
reference code (`notebooks/models.py` of greydanus/mnist1d) for 40-step signals:

    logreg  Dense(40 -> 10)                                            410 params
    mlp     h = relu(fc1(x)); h = h + relu(fc2(h)) (hidden 100); head    15,210 params
    cnn1d   3 x (Conv1D, 25 channels, kernels 5/3/3, stride 2, padding 1, relu);
            flatten (5 x 25); head                                      5,210 params
    gru     bidirectional GRU, 6 hidden units; flatten all 40 x 12 outputs; head
                                                                        5,110 params (5,134 in
            PyTorch: its GRU has two redundant biases per gate where Flax's has one)

The ViT with 1D patches is the registered `vit` with `vit1d_config()` (patch
length 4 over the 40 steps: 10 tokens).

Every model takes signals [B, T, C] or [B, T] (one channel) and returns logits
[B, num_classes]. Kernels are initialised as PyTorch does (uniform in
+-1/sqrt(fan_in), `init_scheme='torch'`, the default, so the baselines start where
the paper's did) or with Flax's `lecun_normal` (`init_scheme='flax'`); biases start at 0.

Parameter paths: logreg `head`; mlp `fc1`, `fc2` (one per extra residual
layer: `fc2`, `fc3`, ...), `head`; cnn1d `conv1..convN`, `head`; gru
`rnn/forward_rnn/cell/{ir,iz,in,hr,hz,hn}`, `rnn/backward_rnn/cell/...`, `head`.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from jaxlab.models import registry

TORCH_KERNEL_INIT = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")  # U(+-1/sqrt(fan_in))


def _kernel_init(init: str):
  if init == "torch":
    return TORCH_KERNEL_INIT
  if init == "flax":
    return nn.initializers.lecun_normal()
  raise ValueError(f"config.model.init_scheme must be 'torch' or 'flax', got {init!r}")


def _as_signal(x) -> jnp.ndarray:
  """[B, T] -> [B, T, 1]; [B, T, C] unchanged; float32."""
  x = jnp.asarray(x, jnp.float32)
  if x.ndim == 2:
    x = x[..., None]
  if x.ndim != 3:
    raise ValueError(f"zoo models take signals [B, T, C] or [B, T], got shape {x.shape}")
  return x


class LogisticRegression(nn.Module):
  """Multinomial logistic regression on the flattened signal."""
  num_classes: int
  init_scheme: str = "torch"

  @nn.compact
  def __call__(self, x, train: bool = False):
    del train
    x = _as_signal(x)
    head = nn.Dense(self.num_classes, name="head", kernel_init=_kernel_init(self.init_scheme))
    return head(x.reshape(x.shape[0], -1))


class MLP(nn.Module):
  """The paper's MLP: a first ReLU layer, then `num_residual` residual ReLU layers, then a linear head."""
  num_classes: int
  hidden: int = 100
  num_residual: int = 1
  init_scheme: str = "torch"

  @nn.compact
  def __call__(self, x, train: bool = False):
    del train
    x = _as_signal(x)
    kinit = _kernel_init(self.init_scheme)
    h = nn.relu(nn.Dense(self.hidden, name="fc1", kernel_init=kinit)(x.reshape(x.shape[0], -1)))
    for i in range(self.num_residual):
      h = h + nn.relu(nn.Dense(self.hidden, name=f"fc{i + 2}", kernel_init=kinit)(h))
    return nn.Dense(self.num_classes, name="head", kernel_init=kinit)(h)


class CNN1D(nn.Module):
  """The paper's 1D CNN: strided ReLU convolutions, flattened, then a linear head."""
  num_classes: int
  channels: int = 25
  kernel_sizes: tuple[int, ...] = (5, 3, 3)
  stride: int = 2
  padding: int = 1
  init_scheme: str = "torch"

  @nn.compact
  def __call__(self, x, train: bool = False):
    del train
    h = _as_signal(x)
    kinit = _kernel_init(self.init_scheme)
    for i, k in enumerate(self.kernel_sizes):
      h = nn.Conv(self.channels, (int(k),), strides=(self.stride,), padding=((self.padding, self.padding),),
                  name=f"conv{i + 1}", kernel_init=kinit)(h)
      h = nn.relu(h)
    return nn.Dense(self.num_classes, name="head", kernel_init=kinit)(h.reshape(h.shape[0], -1))


class GRU(nn.Module):
  """The paper's GRU: a (bidirectional) GRU over the signal; every step's output, flattened, feeds the head."""
  num_classes: int
  hidden: int = 6
  bidirectional: bool = True
  init_scheme: str = "torch"

  @nn.compact
  def __call__(self, x, train: bool = False):
    del train
    x = _as_signal(x)
    kinit = _kernel_init(self.init_scheme)
    cell = lambda: nn.GRUCell(self.hidden, kernel_init=kinit)  # noqa: E731
    if self.bidirectional:
      rnn = nn.Bidirectional(nn.RNN(cell(), name="forward_rnn"), nn.RNN(cell(), name="backward_rnn"), name="rnn")
    else:
      rnn = nn.RNN(cell(), name="rnn")
    h = rnn(x)  # [B, T, H or 2H]
    return nn.Dense(self.num_classes, name="head", kernel_init=kinit)(h.reshape(h.shape[0], -1))


def _kwargs(cfg, allowed: tuple[str, ...], model: str) -> dict:
  kw = {k: v for k, v in dict(cfg).items() if k != "name" and v is not None}
  unknown = sorted(set(kw) - set(allowed))
  if unknown:
    raise ValueError(f"config.model: unknown keys {unknown} for model {model!r}; known: {list(allowed)}")
  return kw


@registry.register("logreg")
def build_logreg(cfg, num_classes: int) -> LogisticRegression:
  """Logistic regression; keys: init_scheme."""
  return LogisticRegression(num_classes=num_classes, **_kwargs(cfg, ("init_scheme",), "logreg"))


@registry.register("mlp")
def build_mlp(cfg, num_classes: int) -> MLP:
  """The paper's residual MLP; keys: hidden (100), num_residual (1), init_scheme."""
  return MLP(num_classes=num_classes, **_kwargs(cfg, ("hidden", "num_residual", "init_scheme"), "mlp"))


@registry.register("cnn1d")
def build_cnn1d(cfg, num_classes: int) -> CNN1D:
  """The paper's 1D CNN; keys: channels (25), kernel_sizes ((5, 3, 3)), stride (2), padding (1), init_scheme."""
  kw = _kwargs(cfg, ("channels", "kernel_sizes", "stride", "padding", "init_scheme"), "cnn1d")
  if "kernel_sizes" in kw:
    kw["kernel_sizes"] = tuple(int(k) for k in kw["kernel_sizes"])
  return CNN1D(num_classes=num_classes, **kw)


@registry.register("gru")
def build_gru(cfg, num_classes: int) -> GRU:
  """The paper's bidirectional GRU; keys: hidden (6), bidirectional (True), init_scheme."""
  return GRU(num_classes=num_classes, **_kwargs(cfg, ("hidden", "bidirectional", "init_scheme"), "gru"))


def vit1d_config(**overrides) -> dict:
  """Model config of a small ViT with 1D patches for MNIST-1D: patch length 4 (10 tokens), width 32, depth 2.

  About 18k parameters, between the paper's MLP and its CNN/GRU. Use it as
  `config.model = ml_collections.ConfigDict(zoo.vit1d_config())`.

  Returns:
    a plain dict of `vit` model keys.
  """
  cfg = dict(name="vit", patch_size=4, width=32, depth=2, num_heads=2, mlp_dim=64, pool="gap",
             final_norm="tokens", dropout=0.0, attn_dropout=0.0, drop_path=0.0, ln_eps=1e-6)
  cfg.update(overrides)
  return cfg


PAPER_MODELS = {
    "logreg": {"name": "logreg"},
    "mlp": {"name": "mlp"},
    "cnn1d": {"name": "cnn1d"},
    "gru": {"name": "gru"},
}
