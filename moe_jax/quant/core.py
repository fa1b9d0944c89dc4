"""Fake quantization: variance grouping, quantizers, the clipped straight-through
estimator, and the params-tree transform used by QAT and PTQ.

Canonical view. Every quantized weight is viewed as (G, R, C): G independent matrices
(experts: one per expert; others: 1), C channels that each get their own scale, R the
values of one channel. With axis="output" a channel is a column of W in y = x @ W,
i.e. one output feature, and R is the contraction axis. That is the axis we choose,
as is usual for weight quantization: a per-output-channel scale factors out of the dot
product, y_n = s_n * sum_k x_k q_kn, so the matmul itself runs on integers with int32
accumulation and one rescale per column (see `inference.py`). Per-input-channel (row)
scales do not factor out of the sum; axis="input" is offered for fake quantization
and storage, not for the integer matmul.

    symmetric b bits:   s = max|w| / (2^(b-1) - 1)       q = clip(round(w/s), -qmax, qmax)
    asymmetric b bits:  s = (max(w,0) - min(w,0)) / (2^b - 1)    z = round(-min(w,0)/s)
                        q = clip(round(w/s) + z, 0, 2^b - 1)      w_hat = (q - z) s

Grouping: per matrix (per expert), the `n_high = C - round(quantile * C)` channels of
largest variance over R form the high-variance group ("above the 70th percentile";
ties go to the lower index), quantized high_bits symmetric; the rest low_bits
asymmetric. A fixed count keeps every shape static, for jit and for storage. The
control (grouping="random") keeps the same count per matrix at high_bits, drawn at
random from (grouping_seed, the parameter's path): equal bits, no variance rule.
"""
from __future__ import annotations

import math
import zlib
from typing import NamedTuple

import jax
import jax.numpy as jnp

from moe_jax.quant.config import QuantConfig


# ---------------------------------------------------------------------------------
# Which parameters, and their canonical (G, R, C) view
# ---------------------------------------------------------------------------------

class Layout(NamedTuple):
  n_batch: int     # leading axes that index independent matrices (experts)
  n_in: int        # the contraction axes that follow; the rest are output axes


def path_str(path) -> str:
  return "/".join(str(getattr(k, "key", k)) for k in path)


def matrix_layout(path: str, ndim: int, qcfg: QuantConfig) -> Layout | None:
  """The layout of a quantized parameter, None for one kept in full precision.
  wq/wk/wv (D, N, H): contract D. wo (N, H, D): contract N, H. MLP (D, F) / (F, D):
  contract the first. Experts (E, D, F) / (E, F, D): per expert, contract the middle."""
  name = path.rsplit("/", 1)[-1]
  if name not in qcfg.matrices:
    return None
  if name == "wo":
    return Layout(0, 2)
  if name.startswith("w_") and ndim == 3:
    return Layout(1, 1)
  return Layout(0, 1)


def to_canonical(w: jax.Array, layout: Layout, axis: str) -> jax.Array:
  """(..., ) -> (G, R, C), C the channel axis."""
  nb, ni = layout
  g = math.prod(w.shape[:nb])
  k = math.prod(w.shape[nb:nb + ni])
  wc = w.reshape(g, k, -1)                                            # (G, K_in, N_out)
  return wc if axis == "output" else jnp.swapaxes(wc, 1, 2)


def from_canonical(wc: jax.Array, shape: tuple[int, ...], axis: str) -> jax.Array:
  return (wc if axis == "output" else jnp.swapaxes(wc, 1, 2)).reshape(shape)


def group_rows(r: int, qcfg: QuantConfig) -> int:
  """Rows per scale group along R (R itself without sub-channel groups)."""
  gs = qcfg.group_size or r
  if r % gs:
    raise ValueError(f"QuantConfig.group_size={qcfg.group_size} must divide the "
                     f"channel length {r}")
  return gs


# ---------------------------------------------------------------------------------
# Grouping by channel variance
# ---------------------------------------------------------------------------------

def n_high_channels(n_channels: int, qcfg: QuantConfig) -> int:
  if qcfg.scheme == "all_high":
    return n_channels
  if qcfg.scheme == "all_low":
    return 0
  return n_channels - int(round(qcfg.quantile * n_channels))


def channel_groups(wc: jax.Array, qcfg: QuantConfig, name: str = "") -> jax.Array:
  """wc: (G, R, C) -> (G, C) bool, True for the high_bits channels: the n_high of
  largest variance, or (grouping="random") n_high drawn at random, a draw that
  depends only on qcfg.grouping_seed and `name` (the parameter's path), so that the
  fake-quantized and the stored model pick the same channels."""
  g, _, c = wc.shape
  n_high = n_high_channels(c, qcfg)
  if n_high in (0, c):
    return jnp.full((g, c), n_high == c)
  if qcfg.grouping == "random":
    key = jax.random.fold_in(jax.random.key(qcfg.grouping_seed),
                             zlib.crc32(name.encode()) & 0x7FFFFFFF)
    score = jax.random.uniform(key, (g, c))                           # (G, C)
  else:
    score = jnp.var(wc.astype(jnp.float32), axis=1)                   # (G, C)
  _, top = jax.lax.top_k(score, n_high)                               # (G, n_high)
  return jnp.zeros((g, c), bool).at[jnp.arange(g)[:, None], top].set(True)


def compute_groups(params, qcfg: QuantConfig) -> dict[str, jax.Array]:
  """{param path: (G, C) bool high_bits mask} for every quantized matrix."""
  groups = {}
  for path, w in jax.tree_util.tree_flatten_with_path(params)[0]:
    name = path_str(path)
    layout = matrix_layout(name, w.ndim, qcfg)
    if layout is not None:
      groups[name] = channel_groups(to_canonical(w, layout, qcfg.axis), qcfg, name)
  return groups


# ---------------------------------------------------------------------------------
# Quantizer parameters and the straight-through estimator
# ---------------------------------------------------------------------------------

class QParams(NamedTuple):
  """Per (matrix, row group, channel) quantizer, each (G, nG, 1, C) float32."""
  scale: jax.Array
  zero: jax.Array
  qmin: jax.Array
  qmax: jax.Array


def symmetric_params(wg: jax.Array, bits: int, clip_ratio: float = 1.0) -> QParams:
  """wg: (..., R, C) -> per-channel symmetric quantizer (reduced over R)."""
  qmax = 2.0 ** (bits - 1) - 1
  amax = jnp.max(jnp.abs(wg), axis=-2, keepdims=True) * clip_ratio
  scale = jnp.where(amax > 0, amax / qmax, 1.0)
  zeros = jnp.zeros_like(scale)
  return QParams(scale, zeros, zeros - qmax, zeros + qmax)


def asymmetric_params(wg: jax.Array, bits: int, clip_ratio: float = 1.0) -> QParams:
  """Per-channel asymmetric quantizer; the range includes 0 so zero is exact."""
  qmax = 2.0 ** bits - 1
  lo = jnp.minimum(jnp.min(wg, axis=-2, keepdims=True), 0.0) * clip_ratio
  hi = jnp.maximum(jnp.max(wg, axis=-2, keepdims=True), 0.0) * clip_ratio
  scale = jnp.where(hi > lo, (hi - lo) / qmax, 1.0)
  zero = jnp.clip(jnp.round(-lo / scale), 0.0, qmax)
  return QParams(scale, zero, jnp.zeros_like(scale), jnp.full_like(scale, qmax))


def quant_params(wc: jax.Array, high: jax.Array, qcfg: QuantConfig) -> QParams:
  """wc: (G, R, C), high: (G, C) -> QParams (G, nG, 1, C) with nG = R / group_size."""
  g, r, c = wc.shape
  gs = group_rows(r, qcfg)
  wg = wc.astype(jnp.float32).reshape(g, r // gs, gs, c)              # (G, nG, gs, C)
  sym = symmetric_params(wg, qcfg.high_bits, qcfg.clip_ratio)
  asym = asymmetric_params(wg, qcfg.low_bits, qcfg.clip_ratio)
  pick = high[:, None, None, :]                                       # (G, 1, 1, C)
  return QParams(*(jnp.where(pick, a, b) for a, b in zip(sym, asym)))


def quantize_values(wg: jax.Array, qp: QParams) -> jax.Array:
  """The integers (as float32): clip(round(w / s) + z, qmin, qmax)."""
  return jnp.clip(jnp.round(wg / qp.scale) + qp.zero, qp.qmin, qp.qmax)


@jax.custom_vjp
def fake_quant(w: jax.Array, scale, zero, qmin, qmax) -> jax.Array:
  """Quantize-dequantize; backward is the clipped straight-through estimator."""
  return (jnp.clip(jnp.round(w / scale) + zero, qmin, qmax) - zero) * scale


def _fake_quant_fwd(w, scale, zero, qmin, qmax):
  return fake_quant(w, scale, zero, qmin, qmax), (w, scale, zero, qmin, qmax)


def _fake_quant_bwd(res, g):
  w, scale, zero, qmin, qmax = res
  q = jnp.round(w / scale) + zero
  inside = (q >= qmin) & (q <= qmax)          # gradient passes in range, zero outside
  zeros = lambda a: jnp.zeros_like(a)         # the quantizer is a constant of the step
  return (jnp.where(inside, g, 0.0).astype(w.dtype), zeros(scale), zeros(zero),
          zeros(qmin), zeros(qmax))


fake_quant.defvjp(_fake_quant_fwd, _fake_quant_bwd)


# ---------------------------------------------------------------------------------
# The params-tree transform (QAT inside the loss; PTQ once)
# ---------------------------------------------------------------------------------

def fake_quantize_matrix(w: jax.Array, layout: Layout, qcfg: QuantConfig,
                         high: jax.Array | None = None, name: str = "") -> jax.Array:
  wc = to_canonical(w, layout, qcfg.axis)                             # (G, R, C)
  g, r, c = wc.shape
  if high is None:
    high = channel_groups(jax.lax.stop_gradient(wc), qcfg, name)
  qp = quant_params(jax.lax.stop_gradient(wc), high, qcfg)
  gs = group_rows(r, qcfg)
  wq = fake_quant(wc.astype(jnp.float32).reshape(g, r // gs, gs, c), *qp)
  return from_canonical(wq.reshape(g, r, c), w.shape, qcfg.axis).astype(w.dtype)


def fake_quantize_params(params, qcfg: QuantConfig,
                         groups: dict[str, jax.Array] | None = None):
  """The params tree with every quantized matrix replaced by its quantize-dequantize.
  `groups` (from `compute_groups`) fixes the high-variance channels; None recomputes
  them from `params`. Differentiable through the clipped STE."""
  def visit(path, w):
    name = path_str(path)
    layout = matrix_layout(name, w.ndim, qcfg)
    if layout is None:
      return w
    return fake_quantize_matrix(w, layout, qcfg, None if groups is None else groups[name],
                                name)
  return jax.tree_util.tree_map_with_path(visit, params)
