"""Dispatch strategies: how routed tokens reach their experts and come back.

All three compute the same function (tests pin them equal, forward and gradient):

  dense     every expert sees every token; the outputs are mixed with a (T, E)
            weight matrix that is zero off the selected experts. E times the FLOPs:
            the readable reference.
  capacity  GShard/Switch: each expert takes at most C = ceil(cf * T * k / E)
            tokens into a fixed buffer, first choices before second choices; the
            overflow is dropped (its contribution is zero) and reported.
  dropless  nothing is dropped. Assignments are sorted by expert; "tiled" pads each
            expert's run to a multiple of `dropless_block` rows so every tile of
            rows belongs to one expert, then runs one batched matmul over the tiles
            (static shapes, fast on CPU and GPU). "ragged" uses lax.ragged_dot on
            the sorted rows (a grouped GEMM where the backend has one).

Each takes x (T, D), a Routing and the expert weights, and returns (y (T, D) float32,
dropped fraction).
"""
from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp

from moe_jax.config import ModelConfig
from moe_jax.models.router import Routing

ExpertWeights = tuple[jax.Array, jax.Array, jax.Array]  # gate, up (E, D, F); down (E, F, D)


def _expert_ffn(x: jax.Array, w: ExpertWeights) -> jax.Array:
  """SwiGLU of a batch of per-expert row blocks. x: (N, R, D), w[i]: (N, ., .)."""
  w_gate, w_up, w_down = w
  h = jax.nn.silu(jnp.einsum("nrd,ndf->nrf", x, w_gate)) * \
      jnp.einsum("nrd,ndf->nrf", x, w_up)                             # (N, R, F)
  return jnp.einsum("nrf,nfd->nrd", h, w_down)                        # (N, R, D)


def _flatten_assignments(routing: Routing):
  """(T, k) assignments -> flat (A,) arrays in choice-major order (all first choices,
  then all second choices), the priority order GShard uses when buffers overflow."""
  t, k = routing.experts.shape
  expert = routing.experts.T.reshape(-1)                              # (A,)
  token = jnp.tile(jnp.arange(t, dtype=jnp.int32), k)                 # (A,)
  weight = routing.weights.T.reshape(-1)                              # (A,)
  return expert, token, weight


def _sort_by_expert(expert: jax.Array, n_experts: int):
  """Stable sort of assignments by expert. Returns the permutation, the per-expert
  counts, and each sorted assignment's rank within its expert."""
  order = jnp.argsort(expert, stable=True)                            # (A,)
  sorted_expert = expert[order]
  counts = jnp.bincount(expert, length=n_experts)                     # (E,)
  starts = jnp.cumsum(counts) - counts                                # (E,) exclusive
  rank = jnp.arange(expert.shape[0]) - starts[sorted_expert]          # (A,)
  return order, sorted_expert, counts, rank


@jax.custom_vjp
def gather_rows(x: jax.Array, idx: jax.Array, back_idx: jax.Array) -> jax.Array:
  """out[i] = x[idx[i]], with idx == len(x) reading a zero row.

  `back_idx` (len(x), m) lists, for each row of x, the output rows that read it
  (len(out) for none), so the gradient is a gather too:
  dx[r] = sum_j g[back_idx[r, j]]. XLA lowers a gather's default transpose to a
  scatter-add, which on CPU runs element by element; dispatch moves every token
  twice each way, so this matters (about 2x for the whole MoE block).
  """
  return jnp.concatenate([x, jnp.zeros((1,) + x.shape[1:], x.dtype)])[idx]


def _gather_rows_fwd(x, idx, back_idx):
  return gather_rows(x, idx, back_idx), (idx, back_idx)


def _gather_rows_bwd(res, g):
  idx, back_idx = res
  g_ext = jnp.concatenate([g, jnp.zeros((1,) + g.shape[1:], g.dtype)])
  return g_ext[back_idx].sum(1), None, None


gather_rows.defvjp(_gather_rows_fwd, _gather_rows_bwd)


def _route_rows(routing: Routing, row: jax.Array, n_rows: int):
  """Index maps between tokens and expert rows, given each assignment's row.

  row: (T, k) the expert row each (token, slot) is computed in; n_rows marks a
  dropped assignment. Returns (row_token (R,), row_assignment (R, 1)): which token
  each row reads and which assignment (t * k + j) reads it back (T and T*k for
  padding rows). Only integer scatters of T*k elements, no row data.
  """
  t, k = row.shape
  flat = row.reshape(-1)                                              # (A,)
  assignment = jnp.arange(t * k, dtype=jnp.int32)
  row_token = jnp.full((n_rows,), t, jnp.int32).at[flat].set(assignment // k, mode="drop")
  row_assignment = jnp.full((n_rows,), t * k, jnp.int32).at[flat].set(assignment,
                                                                    mode="drop")
  return row_token, row_assignment[:, None]


def _run_rows(x, routing: Routing, row, n_rows: int, ffn):
  """x (T, D) -> expert rows -> ffn -> weighted sum back per token, all by gathers."""
  t, d = x.shape
  row_token, row_assignment = _route_rows(routing, row, n_rows)
  x_rows = gather_rows(x, row_token, row)                             # (R, D)
  y_rows = ffn(x_rows)                                                # (R, D)
  y_assign = gather_rows(y_rows, row.reshape(-1), row_assignment)     # (A, D)
  y_assign = y_assign.reshape(t, -1, d).astype(jnp.float32)           # (T, k, D)
  return jnp.einsum("tk,tkd->td", routing.weights, y_assign)


def _rank_in_expert(expert: jax.Array, n_experts: int):
  """Each assignment's position among the assignments to its expert, in the given
  order (a stable sort keeps earlier assignments first), and per-expert counts."""
  order, sorted_expert, counts, rank_sorted = _sort_by_expert(expert, n_experts)
  rank = jnp.zeros_like(rank_sorted).at[order].set(rank_sorted)       # (A,)
  return rank, counts


def dispatch_dense(x, routing: Routing, w: ExpertWeights, config: ModelConfig):
  t = x.shape[0]
  combine = jnp.zeros((t, config.n_experts), jnp.float32).at[
      jnp.arange(t)[:, None], routing.experts].add(routing.weights)   # (T, E)
  x_all = jnp.broadcast_to(x, (config.n_experts,) + x.shape)          # (E, T, D)
  y_all = _expert_ffn(x_all, w)                                       # (E, T, D)
  y = jnp.einsum("te,etd->td", combine, y_all.astype(jnp.float32))
  return y, jnp.zeros((), jnp.float32)


def expert_capacity(n_tokens: int, config: ModelConfig) -> int:
  return max(1, math.ceil(config.capacity_factor * n_tokens * config.top_k
                          / config.n_experts))


def dispatch_capacity(x, routing: Routing, w: ExpertWeights, config: ModelConfig):
  t, d = x.shape
  e, cap = config.n_experts, expert_capacity(t, config)
  k = routing.experts.shape[1]
  # Priority: all first choices, then second choices (choice-major), as GShard.
  rank, _ = _rank_in_expert(routing.experts.T.reshape(-1), e)
  rank = rank.reshape(k, t).T                                         # (T, k)
  keep = rank < cap
  row = jnp.where(keep, routing.experts * cap + rank, e * cap)        # (T, k)
  y = _run_rows(x, routing, row, e * cap,
                lambda rows: _expert_ffn(rows.reshape(e, cap, d), w).reshape(e * cap, d))
  return y, 1.0 - jnp.mean(keep.astype(jnp.float32))


def dropless_tile_rows(n_assignments: int, config: ModelConfig) -> tuple[int, int]:
  """(block, n_tiles) of the tiled dropless path. Every expert's run is padded to a
  multiple of `block`; sum_e ceil(c_e / B) <= (A + E (B - 1)) / B bounds the tiles."""
  e = config.n_experts
  block = max(1, min(config.dropless_block, math.ceil(n_assignments / e)))
  return block, (n_assignments + e * (block - 1)) // block


def dispatch_dropless(x, routing: Routing, w: ExpertWeights, config: ModelConfig):
  t, d = x.shape
  e = config.n_experts
  expert = routing.experts.reshape(-1)                                # (A,) token-major
  rank, counts = _rank_in_expert(expert, e)

  if config.dropless_impl == "ragged":
    starts = jnp.cumsum(counts) - counts                              # (E,)
    row = (starts[expert] + rank).reshape(routing.experts.shape)      # sorted position

    def ffn(rows):
      w_gate, w_up, w_down = w
      h = jax.nn.silu(jax.lax.ragged_dot(rows, w_gate, counts)) * \
          jax.lax.ragged_dot(rows, w_up, counts)                      # (A, F)
      return jax.lax.ragged_dot(h, w_down, counts)                    # (A, D)

    return _run_rows(x, routing, row, expert.shape[0], ffn), jnp.zeros((), jnp.float32)

  block, n_tiles = dropless_tile_rows(expert.shape[0], config)
  padded = (counts + block - 1) // block * block                      # (E,)
  padded_end = jnp.cumsum(padded)                                     # (E,)
  row = (padded_end - padded)[expert] + rank                          # (A,) unique rows
  # Tile i starts at row i*B and belongs to the expert whose padded run covers it;
  # tiles past the last run hold zeros and are given any valid expert.
  tile_expert = jnp.searchsorted(padded_end, jnp.arange(n_tiles) * block, side="right")
  tile_expert = jnp.minimum(tile_expert, e - 1)                       # (n_tiles,)
  # Each tile's weights as a one-hot matmul rather than a gather: its gradient is a
  # matmul too, where a gather's would be a scatter-add (slow on CPU).
  one_hot = jax.nn.one_hot(tile_expert, e, dtype=x.dtype)            # (n_tiles, E)
  w_tiles = tuple(jnp.einsum("ne,eij->nij", one_hot, wi) for wi in w)  # (n_tiles, ., .)

  def ffn(rows):
    return _expert_ffn(rows.reshape(n_tiles, block, d), w_tiles).reshape(-1, d)

  y = _run_rows(x, routing, row.reshape(routing.experts.shape), n_tiles * block, ffn)
  return y, jnp.zeros((), jnp.float32)


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
      "load": routing.load,                                   # (E,) assignment counts
      "mean_prob": jnp.mean(routing.probs, axis=0),           # (E,)
      "seq_load": seq_assign,                                 # (B, E) counts per sequence
      "seq_prob": jnp.mean(per_seq(routing.probs), axis=1),   # (B, E)
      "router_z": jnp.mean(lse ** 2),                         # () for the z-loss
      "router_entropy": jnp.mean(entropy),                    # () for the dynamic loss
      "effective_k": jnp.mean(k_per_token),                   # () mean experts per token
      "k_per_token": per_seq(k_per_token),                    # (B, T) experts per token
      "dropped": dropped,                                     # () fraction dropped
  }
