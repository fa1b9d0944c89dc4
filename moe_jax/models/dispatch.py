"""Dispatch: how routed tokens reach their experts and come back, through one API.

    slots (T, k) --sort_assignments--> rank of each slot within its expert, counts (E,)
          |  a layout turns (expert, rank) into a buffer row:   rows (T, k)
          v
    permute(x)      x (T, D) -> expert rows (R, D)          a gather
    experts(rows)   an ExpertFn on blocks of rows            (N, R', D) -> (N, R', D)
    unpermute(y)    rows -> sum_j w_tj * y[rows[t, j]]       a gather, (T, D)

Every sparse path is this pipeline with its own layout; only `experts` changes for
quantized inference (quant/inference.py), and expert parallelism (expert_parallel.py)
uses the same sort and permutation for its exchange buffers. All four compute the
same function where nothing is dropped (tests pin them to the dense reference,
forward and gradient):

  dense     every expert sees every token, outputs mixed by a (T, E) matrix that is
            zero off the selected experts. E times the FLOPs: the readable reference.
  capacity  GShard/Switch: expert e takes at most C = ceil(cf * T * k / E) slots into
            rows [e*C, e*C + C), first choices before second choices; the overflow is
            dropped (zero contribution) and reported.
  dropless  nothing is dropped. "tiled": the same per-expert buffers with C = the mean
            load, computed in place (a batched matmul against the (E, D, F) weights as
            they are, no weight copies), then the slots past C go to an overflow pass
            of small tiles, one expert per tile, whose weights are gathered. The tiles
            run in chunks under a while loop, so a chunk no slot reaches is not
            computed: the cost follows the real load (O(T k) rows). Where slots can be
            masked (adaptive routing, expert-parallel receive buffers) the in-place
            buffers run in chunks too; with top-k they are full and run as one matmul.
            "ragged": lax.ragged_dot on the sorted rows (a grouped GEMM on GPU; on
            CPU XLA expands it densely, E times the FLOPs).

Slots with `Routing.active` False (adaptive routing) are sorted after all active
ones, counted nowhere and given no row. Row data only moves by gathers whose
gradients are gathers (`gather_rows`) or sorted segment sums (`gather_sorted`):
XLA's default transpose of a gather is a scatter-add, which runs element by
element on CPU.
"""
from __future__ import annotations

import math
from functools import partial
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from moe_jax.config import ModelConfig
from moe_jax.models.router import Routing

ExpertWeights = tuple[jax.Array, jax.Array, jax.Array]  # gate, up (E, D, F); down (E, F, D)
# experts(x (N, R, D), expert (N,) sorted expert of each block, or None when the N
# blocks are the E experts in order) -> (N, R, D)
ExpertFn = Callable[[jax.Array, "jax.Array | None"], jax.Array]


# ---------------------------------------------------------------------------------
# Gathers with gather-shaped gradients
# ---------------------------------------------------------------------------------

@jax.custom_vjp
def gather_rows(x: jax.Array, idx: jax.Array, back_idx: jax.Array) -> jax.Array:
  """out[i] = x[idx[i]], with idx == len(x) reading a zero row.

  `back_idx` (len(x), m) lists, for each row of x, the output rows that read it
  (len(out) for none), so the gradient is a gather too: dx[r] = sum_j g[back_idx[r, j]].
  """
  return jnp.concatenate([x, jnp.zeros((1,) + x.shape[1:], x.dtype)])[idx]


def _gather_rows_fwd(x, idx, back_idx):
  return gather_rows(x, idx, back_idx), (idx, back_idx)


def _gather_rows_bwd(res, g):
  idx, back_idx = res
  g_ext = jnp.concatenate([g, jnp.zeros((1,) + g.shape[1:], g.dtype)])
  return g_ext[back_idx].sum(1), None, None


gather_rows.defvjp(_gather_rows_fwd, _gather_rows_bwd)


@jax.custom_vjp
def gather_sorted(w: jax.Array, idx: jax.Array) -> jax.Array:
  """w[idx] for a sorted idx (tiles are sorted by expert). The gradient is a sorted
  segment sum, dw[e] = sum_{i: idx_i = e} g[i], not a general scatter-add."""
  return w[idx]


def _gather_sorted_fwd(w, idx):
  # w[:0] carries w's type (inside shard_map: the mesh axes it varies over) for free.
  return w[idx], (idx, w[:0], w.shape[0])


def _gather_sorted_bwd(res, g):
  idx, w_empty, n = res
  dw = jax.ops.segment_sum(g, idx, n, indices_are_sorted=True)       # (E, ...)
  return _vary_like(dw, w_empty), None


def _vary_like(x: jax.Array, like: jax.Array) -> jax.Array:
  """The cotangent x given the manual-axis type of its primal `like` (inside
  shard_map; a no-op outside): summed over the mesh axes it varies over and `like`
  does not (w is the same on every data shard, so its gradient is their sum, what
  autodiff's own transpose of the implicit broadcast does), and marked varying over
  the axes `like` varies over and it does not."""
  varying = lambda a: jax.typeof(a).manual_axis_type.varying
  extra = tuple(sorted(varying(x) - varying(like)))
  x = jax.lax.psum(x, extra) if extra else x
  missing = tuple(sorted(varying(like) - varying(x)))
  return jax.lax.pcast(x, missing, to="varying") if missing else x


gather_sorted.defvjp(_gather_sorted_fwd, _gather_sorted_bwd)


# ---------------------------------------------------------------------------------
# The permutation API
# ---------------------------------------------------------------------------------

class Sorted(NamedTuple):
  rank: jax.Array     # (T, k) int32, position among the active slots of the same expert
  counts: jax.Array   # (E,) int32, active slots per expert


def sort_assignments(experts: jax.Array, active: jax.Array, n_experts: int, *,
                     choice_major: bool = False) -> Sorted:
  """Stable sort of the (T, k) slots by expert, inactive slots last.

  Priority among slots of one expert: token order, or with `choice_major` all first
  choices before all second choices (GShard's order when buffers overflow).
  """
  t, k = experts.shape
  key = jnp.where(active, experts, n_experts)                         # (T, k)
  flat = key.T.reshape(-1) if choice_major else key.reshape(-1)       # (A,)
  order = jnp.argsort(flat, stable=True)                              # (A,)
  sorted_key = flat[order]
  starts = jnp.searchsorted(sorted_key, jnp.arange(n_experts + 1, dtype=flat.dtype))
  counts = jnp.diff(starts).astype(jnp.int32)                         # (E,)
  rank_sorted = jnp.arange(t * k, dtype=jnp.int32) - starts[sorted_key]
  rank = jnp.zeros_like(rank_sorted).at[order].set(rank_sorted)       # int scatter
  rank = rank.reshape(k, t).T if choice_major else rank.reshape(t, k)
  return Sorted(rank=rank, counts=counts)


class Permutation(NamedTuple):
  rows: jax.Array        # (T, k) int32, buffer row of each slot; n_rows: not computed
  row_token: jax.Array   # (R,) int32, token each row reads; T for an empty row
  row_slot: jax.Array    # (R, 1) int32, slot t*k + j that reads it back; T*k for none


def permutation(rows: jax.Array, n_rows: int) -> Permutation:
  """Index maps between slots and buffer rows (integer scatters of T*k elements)."""
  t, k = rows.shape
  flat = rows.reshape(-1)                                             # (A,)
  slot = jnp.arange(t * k, dtype=jnp.int32)
  row_token = jnp.full((n_rows,), t, jnp.int32).at[flat].set(slot // k, mode="drop")
  row_slot = jnp.full((n_rows,), t * k, jnp.int32).at[flat].set(slot, mode="drop")
  return Permutation(rows=rows, row_token=row_token, row_slot=row_slot[:, None])


def permute(x: jax.Array, perm: Permutation) -> jax.Array:
  """x (T, D) -> buffer rows (R, D); empty rows are zero."""
  return gather_rows(x, perm.row_token, perm.rows)


def unpermute(y_rows: jax.Array, perm: Permutation, weights: jax.Array) -> jax.Array:
  """Buffer rows (R, D) -> y (T, D) float32 = sum_j weights[t, j] * y_rows[rows[t, j]]."""
  t, k = perm.rows.shape
  y_slots = gather_rows(y_rows, perm.rows.reshape(-1), perm.row_slot)  # (A, D)
  y_slots = y_slots.reshape(t, k, -1).astype(jnp.float32)              # (T, k, D)
  return jnp.einsum("tk,tkd->td", weights.astype(jnp.float32), y_slots)


class TileLayout(NamedTuple):
  start: jax.Array        # (E,) first row of each expert's run (runs padded to `block`)
  tile_expert: jax.Array  # (n_tiles,) expert of each tile, sorted
  n_used: jax.Array       # () tiles that hold any row; the rest are padding


def tile_layout(counts: jax.Array, block: int, n_tiles: int) -> TileLayout:
  """Each expert's rows padded to a multiple of `block`, so every tile of `block`
  rows belongs to one expert. Tiles past the last run get the last expert."""
  padded = (counts + block - 1) // block * block                      # (E,)
  end = jnp.cumsum(padded)                                            # (E,)
  tile_expert = jnp.searchsorted(end, jnp.arange(n_tiles) * block, side="right")
  return TileLayout(start=end - padded,
                    tile_expert=jnp.minimum(tile_expert, counts.shape[0] - 1),
                    n_used=end[-1] // block)


def overflow_tile_bound(n_slots: int, n_experts: int, capacity: int, block: int) -> int:
  """Static bound on sum_e ceil(o_e / block), o_e = max(0, c_e - capacity), over all
  routings with sum_e c_e <= n_slots. With n overflowing experts the overflow is at most
  n_slots - n * capacity, and padding adds < block per expert: linear in n, so one of
  n = 1 or n = most experts that can overflow is the worst case."""
  n_max = min(n_experts, n_slots // (capacity + 1))
  return max([0] + [(n_slots - n * capacity + n * (block - 1)) // block
                    for n in {1, n_max} if n >= 1])


# ---------------------------------------------------------------------------------
# Expert compute on buffers
# ---------------------------------------------------------------------------------

def expert_ffn(x: jax.Array, w: ExpertWeights) -> jax.Array:
  """SwiGLU of a batch of per-expert row blocks. x: (N, R, D), w[i]: (N, ., .)."""
  w_gate, w_up, w_down = w
  h = jax.nn.silu(jnp.einsum("nrd,ndf->nrf", x, w_gate)) * \
      jnp.einsum("nrd,ndf->nrf", x, w_up)                             # (N, R, F)
  return jnp.einsum("nrf,nfd->nrd", h, w_down)                        # (N, R, D)


def swiglu_experts(w: ExpertWeights) -> ExpertFn:
  """The float ExpertFn: weights used in place, or gathered per tile."""
  def experts(x, expert):
    return expert_ffn(x, w if expert is None else
                      tuple(gather_sorted(wi, expert) for wi in w))
  return experts


def _output_axes(experts: ExpertFn, rows, ids, axis: int) -> tuple[str, ...]:
  """The mesh axes the expert output varies over and the rows do not (inside
  shard_map, tensor-parallel expert width): a loop's carry must keep one type.
  Traced on an empty slice along the chunked `axis`; no computation is kept."""
  if not jax.sharding.get_abstract_mesh().manual_axes:     # not inside shard_map
    return ()
  varying = lambda a: jax.typeof(a).manual_axis_type.varying
  empty = experts(jax.lax.slice_in_dim(rows, 0, 0, axis=axis),
                  None if ids is None else ids[:0])
  return tuple(sorted(varying(empty) - varying(rows)))


def _chunk_start(i, size: int, length: int):
  """Start of chunk i; the last chunk is shifted back to fit (it then overlaps the
  one before it, whose rows it recomputes)."""
  return jnp.minimum(i * size, length - size)


@partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3))
def _chunk_loop(f, size: int, axis: int, out_axes: tuple[str, ...], rows, ids, n, *consts):
  """out = f applied to the first `n` chunks of `size` rows along `axis` (chunk i:
  rows[i*size:(i+1)*size] and the ids of those rows), zeros past them.

  A while loop, so a chunk no slot reaches costs nothing, and its custom gradient
  runs the same loop backwards, recomputing each chunk's forward: the cost follows
  the real load (O(T k) rows). A `lax.cond` per chunk instead zero-fills the
  residuals and weight gradients of every skipped chunk, which measured 3-10x the
  cost of the overflow rows themselves (benchmarks/moe_layer.py --profile)."""
  length = rows.shape[axis]

  def body(i, out):
    lo = _chunk_start(i, size, length)
    r = jax.lax.dynamic_slice_in_dim(rows, lo, size, axis)
    ex = None if ids is None else jax.lax.dynamic_slice_in_dim(ids, lo, size)
    return jax.lax.dynamic_update_slice_in_dim(out, f(r, ex, *consts).astype(out.dtype),
                                               lo, axis)
  out = jnp.zeros_like(rows)
  out = jax.lax.pcast(out, out_axes, to="varying") if out_axes else out
  return jax.lax.fori_loop(0, n, body, out)


def _chunk_loop_fwd(f, size, axis, out_axes, rows, ids, n, *consts):
  return (_chunk_loop(f, size, axis, out_axes, rows, ids, n, *consts),
          (rows, ids, n, consts))


def _chunk_loop_bwd(f, size, axis, out_axes, res, g):
  rows, ids, n, consts = res
  length = rows.shape[axis]
  position = jax.lax.broadcasted_iota(jnp.int32, (size,) + (1,) * (rows.ndim - axis - 1), 0)

  def body(i, acc):
    d_rows, d_consts = acc
    lo = _chunk_start(i, size, length)
    r = jax.lax.dynamic_slice_in_dim(rows, lo, size, axis)
    ex = None if ids is None else jax.lax.dynamic_slice_in_dim(ids, lo, size)
    # Rows the chunk shares with the one before it were counted there.
    g_chunk = jax.lax.dynamic_slice_in_dim(g, lo, size, axis)
    g_chunk = jnp.where(lo + position >= i * size, g_chunk, 0)
    _, vjp = jax.vjp(lambda r, *c: f(r, ex, *c).astype(g.dtype), r, *consts)
    dr, *dc = vjp(g_chunk)
    d_rows = jax.lax.dynamic_update_slice_in_dim(
        d_rows, jax.lax.dynamic_slice_in_dim(d_rows, lo, size, axis) + dr, lo, axis)
    return d_rows, [a + b for a, b in zip(d_consts, dc)]

  d_rows, d_consts = jax.lax.fori_loop(
      0, n, body, (jnp.zeros_like(rows), [jnp.zeros_like(c) for c in consts]))
  return (d_rows, None, None, *d_consts)


_chunk_loop.defvjp(_chunk_loop_fwd, _chunk_loop_bwd)


def _loop_experts(experts: ExpertFn, rows, ids, n, size: int, axis: int):
  """experts on the first n chunks of rows, through `_chunk_loop` with the closed-over
  weights passed explicitly (so that they get gradients)."""
  ex = None if ids is None else ids[:size]
  f, consts = jax.closure_convert(
      lambda r, e: experts(r, e), jax.lax.slice_in_dim(rows, 0, size, axis=axis), ex)
  return _chunk_loop(f, size, axis, _output_axes(experts, rows, ids, axis), rows, ids,
                     n, *consts)


def inplace_experts(rows, counts, experts: ExpertFn, n_chunks: int):
  """Per-expert buffers rows (E, C, D), computed in `n_chunks` chunks of capacity;
  the chunks past every expert's count are not computed. One chunk is one batched
  matmul under plain autodiff: no loop, no recomputation."""
  if n_chunks == 1:
    return experts(rows, None)
  size = -(-rows.shape[1] // n_chunks)
  n = jnp.minimum(n_chunks, -(-jnp.max(counts) // size))
  return _loop_experts(lambda r, _: experts(r, None), rows, None, n, size, axis=1)


def tiled_experts(rows, layout: TileLayout, experts: ExpertFn, chunk: int):
  """Tiles rows (n_tiles, B, D), `chunk` tiles at a time; the chunks past the used
  tiles are not computed."""
  chunk = min(chunk, rows.shape[0])
  if chunk == 0:
    return rows
  n = -(-layout.n_used // chunk)
  return _loop_experts(experts, rows, layout.tile_expert, n, chunk, axis=0)


# ---------------------------------------------------------------------------------
# The strategies: x (T, D), Routing, weights -> (y (T, D) float32, dropped fraction)
# ---------------------------------------------------------------------------------

def dispatch_dense(x, routing: Routing, w: ExpertWeights | None, config: ModelConfig,
                   experts: ExpertFn | None = None):
  t = x.shape[0]
  experts = experts or swiglu_experts(w)
  weights = jnp.where(routing.active, routing.weights, 0.0)
  combine = jnp.zeros((t, config.n_experts), jnp.float32).at[
      jnp.arange(t)[:, None], routing.experts].add(weights)          # (T, E)
  x_all = jnp.broadcast_to(x, (config.n_experts,) + x.shape)          # (E, T, D)
  y_all = experts(x_all, None)                                        # (E, T, D)
  y = jnp.einsum("te,etd->td", combine, y_all.astype(jnp.float32))
  return y, jnp.zeros((), jnp.float32)


def expert_capacity(n_tokens: int, config: ModelConfig) -> int:
  return max(1, math.ceil(config.capacity_factor * n_tokens * config.top_k
                          / config.n_experts))


def masked_slots(config: ModelConfig) -> bool:
  """Whether a routing of this config can leave slots inactive (adaptive routing)."""
  return config.routing != "topk"


def _n_chunks(capacity: int, masked: bool) -> int:
  """Capacity chunks. With every slot active the buffers are full up to the mean
  load and no chunk could be skipped: one batched matmul (a loop of four chunks
  measured 1.7x its time at 64 experts, benchmarks/moe_layer.py --profile). Masked
  slots (adaptive routing, expert-parallel receive buffers) leave the buffers partly
  empty: chunks fine enough to skip that, large enough (>= 32 rows) that each
  chunk's batched matmul stays efficient."""
  return max(1, min(4, capacity // 32)) if masked else 1


def dispatch_capacity(x, routing: Routing, w: ExpertWeights | None, config: ModelConfig,
                      experts: ExpertFn | None = None):
  t, d = x.shape
  e, cap = config.n_experts, expert_capacity(t, config)
  experts = experts or swiglu_experts(w)
  s = sort_assignments(routing.experts, routing.active, e, choice_major=True)
  keep = routing.active & (s.rank < cap)                              # (T, k)
  perm = permutation(jnp.where(keep, routing.experts * cap + s.rank, e * cap), e * cap)
  y_rows = inplace_experts(permute(x, perm).reshape(e, cap, d), jnp.minimum(s.counts, cap),
                    experts, _n_chunks(cap, masked_slots(config)))
  y = unpermute(y_rows.reshape(e * cap, d), perm, routing.weights)
  n_active = jnp.maximum(jnp.sum(routing.active), 1)
  return y, (n_active - jnp.sum(keep)) / n_active


def dropless_layout(n_slots: int, config: ModelConfig, masked: bool
                    ) -> tuple[int, int, int]:
  """(capacity, block, n_tiles) of the tiled dropless path for n_slots = T * k slots;
  `masked`: whether slots can be inactive (`_n_chunks`).

  In-place capacity: the mean load, rounded up to whole chunks. Overflow tiles: the
  rows per tile follow the mean load (an eighth of it, at least 8), so the padding
  of each overflowing expert's last tile stays small against its expected overflow;
  `dropless_block` caps it."""
  e = config.n_experts
  mean = -(-n_slots // e)
  n_chunks = _n_chunks(mean, masked)
  capacity = -(-mean // n_chunks) * n_chunks
  block = max(1, min(config.dropless_block, max(8, mean // 8)))
  return capacity, block, overflow_tile_bound(n_slots, e, capacity, block)


def dropless_permutation(routing: Routing, s: Sorted, config: ModelConfig, masked: bool
                         ) -> tuple[Permutation, TileLayout]:
  """The tiled dropless layout (`dropless_layout`): slot -> in-place row e*C + rank
  while rank < C, else a row of expert e's overflow tiles."""
  e = config.n_experts
  cap, block, n_tiles = dropless_layout(routing.experts.size, config, masked)
  over = tile_layout(jnp.maximum(s.counts - cap, 0), block, n_tiles)
  n_inplace = e * cap
  row = jnp.where(s.rank < cap, routing.experts * cap + s.rank,
                  n_inplace + over.start[routing.experts] + s.rank - cap)
  n_rows = n_inplace + n_tiles * block
  return permutation(jnp.where(routing.active, row, n_rows), n_rows), over


def dispatch_dropless(x, routing: Routing, w: ExpertWeights | None, config: ModelConfig,
                      experts: ExpertFn | None = None, masked: bool | None = None):
  """masked: whether slots can be inactive (default: adaptive routing). Only then
  do the in-place buffers run in chunks that can be skipped."""
  t, d = x.shape
  masked = masked_slots(config) if masked is None else masked
  e = config.n_experts
  s = sort_assignments(routing.experts, routing.active, e)
  if config.dropless_impl == "ragged":
    if experts is not None:
      raise ValueError("ModelConfig.dropless_impl='ragged' needs float expert weights "
                       "(lax.ragged_dot); use 'tiled' with a custom ExpertFn")
    start = jnp.cumsum(s.counts) - s.counts                           # (E,)
    n_rows = routing.experts.size
    perm = permutation(jnp.where(routing.active, start[routing.experts] + s.rank,
                                 n_rows), n_rows)
    w_gate, w_up, w_down = w
    rows = permute(x, perm)                                           # (A, D)
    h = jax.nn.silu(jax.lax.ragged_dot(rows, w_gate, s.counts)) * \
        jax.lax.ragged_dot(rows, w_up, s.counts)                      # (A, F)
    y_rows = jax.lax.ragged_dot(h, w_down, s.counts)                  # (A, D)
    return unpermute(y_rows, perm, routing.weights), jnp.zeros((), jnp.float32)

  experts = experts or swiglu_experts(w)
  cap, block, n_tiles = dropless_layout(routing.experts.size, config, masked)
  perm, over = dropless_permutation(routing, s, config, masked)
  n_inplace = e * cap
  x_rows = permute(x, perm)                                           # (R, D)
  y_in = inplace_experts(x_rows[:n_inplace].reshape(e, cap, d), s.counts, experts,
                         _n_chunks(cap, masked))                      # (E, C, D)
  y_over = tiled_experts(x_rows[n_inplace:].reshape(n_tiles, block, d), over, experts,
                         max(1, e // 4))                              # (n_tiles, B, D)
  y_rows = jnp.concatenate([y_in.reshape(-1, d), y_over.reshape(-1, d)])
  return unpermute(y_rows, perm, routing.weights), jnp.zeros((), jnp.float32)


DISPATCH: dict[str, Callable] = {
    "dense": dispatch_dense, "capacity": dispatch_capacity, "dropless": dispatch_dropless,
}


def router_stats(routing: Routing, batch: int, dropped: jax.Array) -> dict[str, jax.Array]:
  """The plain arrays that balance losses and monitoring are computed from. Only
  active slots count (adaptive routing masks some of the k_max slots)."""
  t_all, e = routing.probs.shape
  per_seq = lambda a: a.reshape(batch, t_all // batch, *a.shape[1:])
  active = routing.active.astype(jnp.float32)                           # (T', k)
  seq_assign = jnp.einsum("btke,btk->be", jax.nn.one_hot(per_seq(routing.experts), e),
                          per_seq(active))                              # (B, E)
  lse = jax.nn.logsumexp(routing.logits, axis=-1)                       # (T',)
  k_per_token = jnp.sum(active, axis=-1)                                # (T',)
  # Entropy of the routing distribution, for the dynamic loss (Huang et al., 2024).
  # The floor keeps the gradient finite where a probability underflows to zero.
  entropy = -jnp.sum(routing.probs * jnp.log(jnp.maximum(routing.probs, 1e-30)), -1)
  return {
      "load": routing.load,                                   # (E,) active slot counts
      "mean_prob": jnp.mean(routing.probs, axis=0),           # (E,)
      "seq_load": seq_assign,                                 # (B, E) counts per sequence
      "seq_prob": jnp.mean(per_seq(routing.probs), axis=1),   # (B, E)
      "router_z": jnp.mean(lse ** 2),                         # () for the z-loss
      "router_entropy": jnp.mean(entropy),                    # () for the dynamic loss
      "effective_k": jnp.mean(k_per_token),                   # () mean experts per token
      "k_per_token": per_seq(k_per_token),                    # (B, T) experts per token
      "dropped": dropped,                                     # () fraction dropped
  }
