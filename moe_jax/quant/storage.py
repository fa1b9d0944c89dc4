"""Real quantized storage: int8 values, int4 values packed two per byte, per-channel
scales and zero points, saved with orbax.

A quantized matrix is a `QTensor`. Its channels are split into the two groups: the
high-variance ones as int8 `q_high` (G, R, Nh) with float32 scales (G, nG, Nh); the
others as `q_low` (G, ceil(R/2), Nl) uint8 holding two 4-bit values per byte (low
nibble: even row, high nibble: odd row; unpacked uint8 when low_bits > 4), with
float32 scales and uint8 zero points (G, nG, Nl). `high_idx` / `low_idx` say which
channel each stored column is. `dequantize` rebuilds exactly the weights that
`fake_quantize_params` produces (same scales, same integers).
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from moe_jax.quant import core
from moe_jax.quant.config import AXES, QuantConfig


# ---------------------------------------------------------------------------------
# int4 packing
# ---------------------------------------------------------------------------------

def pack_int4(q: jax.Array, axis: int = 0) -> jax.Array:
  """Values in 0..15 -> uint8, two per byte along `axis` (odd lengths padded)."""
  q = jnp.moveaxis(jnp.asarray(q).astype(jnp.uint8), axis, 0)
  if q.shape[0] % 2:
    q = jnp.concatenate([q, jnp.zeros((1,) + q.shape[1:], jnp.uint8)])
  packed = q[0::2] | (q[1::2] << 4)
  return jnp.moveaxis(packed, 0, axis)


def unpack_int4(packed: jax.Array, n: int, axis: int = 0) -> jax.Array:
  """Inverse of `pack_int4`: uint8 (..., ceil(n/2), ...) -> uint8 (..., n, ...)."""
  p = jnp.moveaxis(packed, axis, 0)
  q = jnp.stack([p & 0xF, p >> 4], axis=1).reshape((-1,) + p.shape[1:])[:n]
  return jnp.moveaxis(q, 0, axis)


# ---------------------------------------------------------------------------------
# QTensor
# ---------------------------------------------------------------------------------

@flax.struct.dataclass
class QTensor:
  q_high: jax.Array | None      # (G, R, Nh) int8
  s_high: jax.Array | None      # (G, nG, Nh) float32
  q_low: jax.Array | None       # (G, ceil(R/2), Nl) uint8 packed (or (G, R, Nl) unpacked)
  s_low: jax.Array | None       # (G, nG, Nl) float32
  z_low: jax.Array | None       # (G, nG, Nl) uint8
  high_idx: jax.Array           # (G, Nh) int32
  low_idx: jax.Array            # (G, Nl) int32
  shape: tuple[int, ...] = flax.struct.field(pytree_node=False)
  layout: core.Layout = flax.struct.field(pytree_node=False)
  axis: str = flax.struct.field(pytree_node=False)
  group_size: int = flax.struct.field(pytree_node=False)   # rows per scale group
  high_bits: int = flax.struct.field(pytree_node=False)
  low_bits: int = flax.struct.field(pytree_node=False)

  @property
  def canonical_shape(self) -> tuple[int, int, int]:
    nb, ni = self.layout
    g, r = math.prod(self.shape[:nb]), math.prod(self.shape[nb:nb + ni])
    c = math.prod(self.shape) // (g * r)
    return (g, r, c) if self.axis == "output" else (g, c, r)

  @property
  def packed(self) -> bool:
    return self.low_bits <= 4

  def low_values(self) -> jax.Array:
    """(G, R, Nl) uint8 values of the low-bit channels."""
    return unpack_int4(self.q_low, self.canonical_shape[1], axis=1) if self.packed \
        else self.q_low

  def gather(self, index: jax.Array) -> "QTensor":
    """The matrices `index` (a 1-D int array) along G, e.g. the experts of each tile;
    for expert weights (one leading axis)."""
    assert self.layout.n_batch == 1, "gather is for (E, ., .) expert weights"
    return jax.tree.map(lambda a: a[index], self).replace(
        shape=(index.shape[0],) + self.shape[1:])


def quantize_matrix(w: jax.Array, layout: core.Layout, qcfg: QuantConfig,
                    high: jax.Array | None = None, name: str = "") -> QTensor:
  wc = core.to_canonical(w, layout, qcfg.axis).astype(jnp.float32)   # (G, R, C)
  g, r, c = wc.shape
  high = core.channel_groups(wc, qcfg, name) if high is None else high   # (G, C)
  gs = core.group_rows(r, qcfg)
  qp = core.quant_params(wc, high, qcfg)
  q = core.quantize_values(wc.reshape(g, r // gs, gs, c), qp).reshape(g, r, c)
  n_high = int(np.asarray(high[0]).sum()) if g else 0
  order = jnp.argsort(~high, axis=1, stable=True).astype(jnp.int32)  # high first
  hi, lo = order[:, :n_high], order[:, n_high:]                       # (G, Nh), (G, Nl)
  take = lambda a, idx: jnp.take_along_axis(a, idx[:, None, :], axis=2)
  scale, zero = qp.scale[:, :, 0], qp.zero[:, :, 0]                   # (G, nG, C)
  parts = dict(q_high=None, s_high=None, q_low=None, s_low=None, z_low=None)
  if n_high:
    parts.update(q_high=take(q, hi).astype(jnp.int8), s_high=take(scale, hi))
  if c - n_high:
    q_low = take(q, lo).astype(jnp.uint8)                             # (G, R, Nl)
    parts.update(q_low=pack_int4(q_low, axis=1) if qcfg.low_bits <= 4 else q_low,
                 s_low=take(scale, lo), z_low=take(zero, lo).astype(jnp.uint8))
  return QTensor(**parts, high_idx=hi, low_idx=lo, shape=tuple(w.shape),
                 layout=layout, axis=qcfg.axis, group_size=gs,
                 high_bits=qcfg.high_bits, low_bits=qcfg.low_bits)


def dequantize_matrix(t: QTensor, dtype=jnp.float32) -> jax.Array:
  g, r, c = t.canonical_shape
  cols = []
  if t.q_high is not None:
    s = jnp.repeat(t.s_high, t.group_size, axis=1)                    # (G, R, Nh)
    cols.append(t.q_high.astype(jnp.float32) * s)
  if t.q_low is not None:
    s = jnp.repeat(t.s_low, t.group_size, axis=1)
    z = jnp.repeat(t.z_low, t.group_size, axis=1).astype(jnp.float32)
    cols.append((t.low_values().astype(jnp.float32) - z) * s)
  wc = jnp.concatenate(cols, axis=2)                                  # (G, R, Nh + Nl)
  inverse = jnp.argsort(jnp.concatenate([t.high_idx, t.low_idx], axis=1), axis=1)
  wc = jnp.take_along_axis(wc, inverse[:, None, :], axis=2)           # channel order
  return core.from_canonical(wc, t.shape, t.axis).astype(dtype)


def is_qtensor(x) -> bool:
  return isinstance(x, QTensor)


def quantize_params(params, qcfg: QuantConfig, groups: dict[str, jax.Array] | None = None):
  """The params tree with every quantized matrix replaced by a QTensor (PTQ, or the
  conversion of a QAT-trained model with the groups it was trained with)."""
  def visit(path, w):
    name = core.path_str(path)
    layout = core.matrix_layout(name, w.ndim, qcfg)
    if layout is None:
      return w
    return quantize_matrix(w, layout, qcfg, None if groups is None else groups[name], name)
  return jax.tree_util.tree_map_with_path(visit, params)


def dequantize_params(qparams, dtype=jnp.float32):
  """QTensors -> float arrays: the params the unmodified `Transformer` consumes."""
  return jax.tree.map(lambda x: dequantize_matrix(x, dtype) if is_qtensor(x) else x,
                      qparams, is_leaf=is_qtensor)


# ---------------------------------------------------------------------------------
# Accounting and orbax
# ---------------------------------------------------------------------------------

def weight_bits(qparams) -> float:
  """Average bits per weight over the quantized matrices (values only, no scales)."""
  bits = count = 0
  for t in jax.tree.leaves(qparams, is_leaf=is_qtensor):
    if is_qtensor(t):
      g, r, c = t.canonical_shape
      nh = t.high_idx.shape[1]
      bits += g * r * (nh * t.high_bits + (c - nh) * t.low_bits)
      count += g * r * c
  return bits / count if count else 32.0


def payload_bytes(tree) -> int:
  """Bytes of every array in the tree: values, scales, zero points, indices, and the
  parameters kept in full precision."""
  return int(sum(np.asarray(a).nbytes for a in jax.tree.leaves(tree)))


def _to_arrays(qparams):
  """A tree of plain arrays (QTensor -> dict, static fields into a `meta` array)."""
  def visit(x):
    if not is_qtensor(x):
      return x
    d = {k: getattr(x, k) for k in ("q_high", "s_high", "q_low", "s_low", "z_low",
                                    "high_idx", "low_idx")
         if getattr(x, k) is not None and getattr(x, k).size}   # orbax: no empty arrays
    d["meta"] = np.array([*x.layout, AXES.index(x.axis), x.group_size, x.high_bits,
                          x.low_bits, *x.shape], np.int32)
    return d
  return jax.tree.map(visit, qparams, is_leaf=is_qtensor)


def _from_arrays(tree):
  def visit(d):
    if not (isinstance(d, dict) and "meta" in d):
      return {k: visit(v) for k, v in d.items()} if isinstance(d, dict) else d
    nb, ni, axis, gs, hb, lb, *shape = (int(v) for v in np.asarray(d["meta"]))
    get = lambda k: jnp.asarray(d[k]) if k in d else None
    no_idx = jnp.zeros((math.prod(shape[:nb]), 0), jnp.int32)
    return QTensor(q_high=get("q_high"), s_high=get("s_high"), q_low=get("q_low"),
                   s_low=get("s_low"), z_low=get("z_low"),
                   high_idx=d.get("high_idx", no_idx), low_idx=d.get("low_idx", no_idx),
                   shape=tuple(shape), layout=core.Layout(nb, ni),
                   axis=AXES[axis], group_size=gs, high_bits=hb, low_bits=lb)
  return visit(tree)


def save(path: str | os.PathLike, qparams) -> int:
  """Save a (quantized or not) params tree with orbax; returns its size on disk."""
  path = Path(path).absolute()
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(path, _to_arrays(qparams), force=True)
  return disk_size(path)


def load(path: str | os.PathLike):
  with ocp.StandardCheckpointer() as ckptr:
    return _from_arrays(ckptr.restore(Path(path).absolute()))


def disk_size(path: str | os.PathLike) -> int:
  return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())
