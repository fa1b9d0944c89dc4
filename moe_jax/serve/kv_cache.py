"""The slot-major KV cache: one static-shape buffer per layer, one row per slot.

    cache = {"layer_0": {"k": (B, S, Nkv, H), "v": (B, S, Nkv, H)}, "layer_1": ...}
             slot b ─┘    position s ─┘   (GQA: only the Nkv key/value heads are kept)

Every layer has its own entry even when the sharing plan gives several layers one
attention parameter set: their inputs differ, so their keys differ. Each layer's
entry is a dict so that an attention variant with another cache layout (MLA's
compressed latent) can add its own arrays next to (or instead of) "k" and "v";
everything here treats the entries as pytrees.

A slot holds one request. Positions past a request's current length are never read
(`layers.attend_cached` masks keys after the query's position), so inserting a new
request only overwrites the prefix it prefilled, and a freed slot is never cleared.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from moe_jax.config import ModelConfig
from moe_jax.models import mla


def init_cache(config: ModelConfig, batch: int, length: int, dtype=None) -> dict:
  """Zeros: {"layer_i": {"k", "v": (batch, length, Nkv, H)}} in the activation dtype;
  with MLA {"layer_i": {"c_kv": (batch, length, C), "k_rope": (batch, length, Dr)}},
  the compressed latent and the shared rope key (C + Dr numbers per token, not 2 N H)."""
  if config.attention == "mla":
    return {f"layer_{i}": mla.init_mla_cache(config, batch, length, dtype)
            for i in range(config.n_layers)}
  dtype = jnp.dtype(dtype or config.dtype)
  shape = (batch, length, config.n_kv_heads, config.resolved_head_dim)
  return {f"layer_{i}": {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}
          for i in range(config.n_layers)}


def cache_bytes(config: ModelConfig, batch: int, length: int, dtype=None) -> int:
  """Memory of a cache of that shape (for planning slots and context on a device)."""
  shapes = jax.eval_shape(lambda: init_cache(config, batch, length, dtype))
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(shapes))


def write_slots(cache: dict, prefix: dict, slots: jax.Array) -> dict:
  """Copy prefix rows (n, P, ...) into positions [0, P) of the given slots (n,) of
  the cache (B, S, ...); a slot index out of range (B) drops its row, and every
  other slot and position is left as it was. One scatter per array."""
  def write(big, small):
    p = small.shape[1]
    return big.at[slots, :p].set(small.astype(big.dtype), mode="drop")
  return jax.tree.map(write, cache, prefix)


def take_positions(cache: dict, length: int) -> dict:
  """The first `length` positions of every slot (a static slice): a decode step
  whose requests are all shorter than `length` attends over only these."""
  return jax.tree.map(lambda x: x[:, :length], cache)


def put_positions(cache: dict, part: dict) -> dict:
  """Inverse of `take_positions`: write the first positions back."""
  return jax.tree.map(
      lambda x, p: jax.lax.dynamic_update_slice(x, p, (0,) * x.ndim), cache, part)
