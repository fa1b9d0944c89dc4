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


def _combine(rows: jax.Array, token: jax.Array, weight: jax.Array, n_tokens: int):
  """Weighted scatter-add of per-assignment outputs back to their tokens."""
  out = jnp.zeros((n_tokens, rows.shape[-1]), jnp.float32)
  return out.at[token].add(rows.astype(jnp.float32) * weight[:, None])


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
  expert, token, weight = _flatten_assignments(routing)
  order, sorted_expert, _, rank = _sort_by_expert(expert, e)
  keep = rank < cap                                                   # (A,)
  # Overflowing assignments go to a spare row E*C that is never computed.
  slot = jnp.where(keep, sorted_expert * cap + rank, e * cap)         # (A,)
  buffer = jnp.zeros((e * cap + 1, d), x.dtype).at[slot].set(x[token[order]])
  y_buf = _expert_ffn(buffer[:-1].reshape(e, cap, d), w).reshape(e * cap, d)
  y_buf = jnp.concatenate([y_buf, jnp.zeros((1, d), y_buf.dtype)])    # (E*C+1, D)
  y = _combine(y_buf[slot], token[order], weight[order], t)
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
  expert, token, weight = _flatten_assignments(routing)
  order, sorted_expert, counts, rank = _sort_by_expert(expert, e)
  x_sorted = x[token[order]]                                          # (A, D)

  if config.dropless_impl == "ragged":
    w_gate, w_up, w_down = w
    h = jax.nn.silu(jax.lax.ragged_dot(x_sorted, w_gate, counts)) * \
        jax.lax.ragged_dot(x_sorted, w_up, counts)                    # (A, F)
    rows = jax.lax.ragged_dot(h, w_down, counts)                      # (A, D)
    return _combine(rows, token[order], weight[order], t), jnp.zeros((), jnp.float32)

  block, n_tiles = dropless_tile_rows(expert.shape[0], config)
  padded = (counts + block - 1) // block * block                      # (E,)
  padded_end = jnp.cumsum(padded)                                     # (E,)
  dest = padded_end[sorted_expert] - padded[sorted_expert] + rank     # (A,) unique rows
  x_tiles = jnp.zeros((n_tiles * block, d), x.dtype).at[dest].set(x_sorted)
  # Tile i starts at row i*B and belongs to the expert whose padded run covers it;
  # tiles past the last run hold zeros and are given any valid expert.
  tile_expert = jnp.searchsorted(padded_end, jnp.arange(n_tiles) * block, side="right")
  tile_expert = jnp.minimum(tile_expert, e - 1)                       # (n_tiles,)
  w_tiles = tuple(wi[tile_expert] for wi in w)                        # (n_tiles, ., .)
  y_tiles = _expert_ffn(x_tiles.reshape(n_tiles, block, d), w_tiles)  # (n_tiles, B, D)
  rows = y_tiles.reshape(n_tiles * block, d)[dest]                    # (A, D)
  return _combine(rows, token[order], weight[order], t), jnp.zeros((), jnp.float32)


DISPATCH: dict[str, Callable] = {
    "dense": dispatch_dense, "capacity": dispatch_capacity, "dropless": dispatch_dropless,
}


def router_stats(routing: Routing, batch: int, dropped: jax.Array) -> dict[str, jax.Array]:
  """The plain arrays that balance losses and monitoring are computed from."""
  t_all, e = routing.probs.shape
  per_seq = lambda a: a.reshape(batch, t_all // batch, *a.shape[1:])
  seq_assign = jax.nn.one_hot(per_seq(routing.experts), e).sum((1, 2))  # (B, E)
  lse = jax.nn.logsumexp(routing.logits, axis=-1)                       # (T',)
  return {
      "load": routing.load,                                   # (E,) assignment counts
      "mean_prob": jnp.mean(routing.probs, axis=0),           # (E,)
      "seq_load": seq_assign,                                 # (B, E) counts per sequence
      "seq_prob": jnp.mean(per_seq(routing.probs), axis=1),   # (B, E)
      "router_z": jnp.mean(lse ** 2),                         # () for the z-loss
      "dropped": dropped,                                     # () fraction dropped
  }
