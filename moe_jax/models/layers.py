"""Transformer building blocks: RMSNorm, rotary embeddings, attention, SwiGLU.

Every parameter carries logical axis names ("embed", "heads", "mlp", "expert", ...)
through `nn.with_logical_partitioning`; `moe_jax.sharding` maps them to mesh axes.
On one device the names are inert metadata.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from moe_jax.config import ModelConfig


def param(module: nn.Module, name: str, shape: tuple[int, ...],
          axes: tuple[str | None, ...], config: ModelConfig, init=None) -> jax.Array:
  """A parameter with logical axis names, normal(init_std) unless `init` is given."""
  init = init or nn.initializers.normal(config.init_std)
  return module.param(name, nn.with_logical_partitioning(init, axes), shape,
                      jnp.dtype(config.param_dtype))


def cast(w, dtype) -> jax.Array:
  """`w.astype(dtype)`, skipped when `w` already has that dtype (a no-op for arrays).
  Lets qwix's PTQ weights (which cannot be cast) through moe_jax.quant.qwix_reference."""
  return w if w.dtype == dtype else w.astype(dtype)


class RMSNorm(nn.Module):
  config: ModelConfig

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    scale = param(self, "scale", (x.shape[-1],), ("norm",), self.config,
                  nn.initializers.ones)
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True)
                                 + self.config.norm_eps)
    return (normed * scale).astype(x.dtype)


def rotary(x: jax.Array, positions: jax.Array, theta: float, freqs=None,
           mscale: float = 1.0) -> jax.Array:
  """Rotary position embedding (Su et al., 2021), rotate-half form.

  x: (B, T, N, H); positions: (B, T) integer positions. `freqs` (H/2,) replaces the
  theta^(-i/(H/2)) frequencies and `mscale` scales cos and sin (YaRN, models/mla.py).
  """
  half = x.shape[-1] // 2
  if freqs is None:
    freqs = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)  # (H/2,)
  angles = positions[..., None].astype(jnp.float32) * freqs          # (B, T, H/2)
  sin = jnp.sin(angles)[:, :, None, :]                               # (B, T, 1, H/2)
  cos = jnp.cos(angles)[:, :, None, :]
  if mscale != 1.0:
    sin, cos = sin * mscale, cos * mscale
  x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)


class Attention(nn.Module):
  """Causal multi-head attention; grouped-query when n_kv_heads < n_heads."""
  config: ModelConfig

  @nn.compact
  def __call__(self, x: jax.Array, positions: jax.Array, return_probs: bool = False,
               cache: dict | None = None):
    """x (B, T, D) -> (B, T, D); with `return_probs`, also the attention
    probabilities (B, Nq, T, T), computed explicitly (only then). With a KV `cache`
    (moe_jax.serve.kv_cache), also the updated cache (see `attend_cached`)."""
    c = self.config
    dtype = jnp.dtype(c.dtype)
    b, t, d = x.shape
    hd, nq, nkv = c.resolved_head_dim, c.n_heads, c.n_kv_heads
    wq = param(self, "wq", (d, nq, hd), ("embed", "heads", "head_dim"), c)
    wk = param(self, "wk", (d, nkv, hd), ("embed", "kv_heads", "head_dim"), c)
    wv = param(self, "wv", (d, nkv, hd), ("embed", "kv_heads", "head_dim"), c)
    wo = param(self, "wo", (nq, hd, d), ("heads", "head_dim", "embed"), c)
    x = x.astype(dtype)
    q = jnp.einsum("btd,dnh->btnh", x, cast(wq, dtype))             # (B, T, Nq, H)
    k = jnp.einsum("btd,dnh->btnh", x, cast(wk, dtype))             # (B, T, Nkv, H)
    v = jnp.einsum("btd,dnh->btnh", x, cast(wv, dtype))             # (B, T, Nkv, H)
    if c.qkv_bias:   # Qwen2-MoE
      zeros = nn.initializers.zeros
      bq = param(self, "bq", (nq, hd), ("heads", "head_dim"), c, zeros)
      bk = param(self, "bk", (nkv, hd), ("kv_heads", "head_dim"), c, zeros)
      bv = param(self, "bv", (nkv, hd), ("kv_heads", "head_dim"), c, zeros)
      q, k, v = q + cast(bq, dtype), k + cast(bk, dtype), v + cast(bv, dtype)
    if c.qk_norm:    # Qwen3: RMSNorm over each head's width, before RoPE
      q = RMSNorm(c, name="q_norm")(q)
      k = RMSNorm(c, name="k_norm")(k)
    q = rotary(q, positions, c.rope_theta)
    k = rotary(k, positions, c.rope_theta)
    if cache is not None:
      out, cache = attend_cached(q, k, v, positions, cache)           # (B, T, Nq, H)
      return jnp.einsum("btnh,nhd->btd", out, cast(wo, dtype)), cache
    if return_probs:   # for distillation: the probabilities themselves are needed
      probs = causal_attention_probs(q, k)                           # (B, Nq, T, T)
      v_rep = jnp.repeat(v, nq // nkv, axis=2)                        # (B, T, Nq, H)
      out = jnp.einsum("bnts,bsnh->btnh", probs.astype(dtype), v_rep)  # (B, T, Nq, H)
      return jnp.einsum("btnh,nhd->btd", out, cast(wo, dtype)), probs
    # jax.nn.dot_product_attention handles GQA (Nq a multiple of Nkv) and picks
    # cuDNN flash attention on GPU when available, XLA elsewhere.
    out = jax.nn.dot_product_attention(q, k, v, is_causal=True)      # (B, T, Nq, H)
    return jnp.einsum("btnh,nhd->btd", out, cast(wo, dtype))         # (B, T, D)


def attend_cached(q: jax.Array, k: jax.Array, v: jax.Array, positions: jax.Array,
                  cache: dict) -> tuple[jax.Array, dict]:
  """Attention through a KV cache (serving). q: (B, T, Nq, H); k, v: (B, T, Nkv, H)
  of the new tokens at `positions` (B, T); cache {"k", "v"}: (B, S, Nkv, H).

  The new keys and values are written at their absolute positions, then every query
  reads the cached keys at positions <= its own. Entries past a query's position
  (padding, or a previous request's leftovers in a reused slot) are masked, so a slot
  never needs clearing. Positions >= S are dropped by the scatter."""
  rows = jnp.arange(q.shape[0])[:, None]                              # (B, 1)
  ck = cache["k"].at[rows, positions].set(k.astype(cache["k"].dtype))  # (B, S, Nkv, H)
  cv = cache["v"].at[rows, positions].set(v.astype(cache["v"].dtype))
  visible = jnp.arange(ck.shape[1]) <= positions[:, :, None]          # (B, T, S)
  out = jax.nn.dot_product_attention(q, ck.astype(q.dtype), cv.astype(q.dtype),
                                     mask=visible[:, None])           # (B, T, Nq, H)
  return out, {**cache, "k": ck, "v": cv}


def causal_attention_probs(q: jax.Array, k: jax.Array) -> jax.Array:
  """softmax(q k^T / sqrt(H)) under a causal mask, float32. q: (B, T, Nq, H),
  k: (B, S, Nkv, H) with query head n reading key head n // (Nq / Nkv), as
  jax.nn.dot_product_attention groups them -> (B, Nq, T, S)."""
  k = jnp.repeat(k, q.shape[2] // k.shape[2], axis=2)                 # (B, S, Nq, H)
  scores = jnp.einsum("btnh,bsnh->bnts", q.astype(jnp.float32), k.astype(jnp.float32))
  scores = scores / jnp.sqrt(jnp.float32(q.shape[-1]))
  causal = jnp.tril(jnp.ones((q.shape[1], k.shape[1]), bool))         # (T, S)
  scores = jnp.where(causal, scores, jnp.finfo(jnp.float32).min)
  return jax.nn.softmax(scores, axis=-1)


def swiglu(x: jax.Array, w_gate: jax.Array, w_up: jax.Array,
           w_down: jax.Array) -> jax.Array:
  """SwiGLU feed-forward (Shazeer, 2020): (silu(x Wg) * x Wu) Wd. x: (..., D).

  jnp.dot rather than `@`: the same dot_general (identical jaxpr), but jnp.dot is one of
  the ops qwix intercepts, so its PTQ reference quantizes these matrices too."""
  return jnp.dot(jax.nn.silu(jnp.dot(x, w_gate)) * jnp.dot(x, w_up), w_down)


class DenseMLP(nn.Module):
  """The dense SwiGLU used by the first `n_dense_layers` layers."""
  config: ModelConfig
  hidden: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = self.config
    dtype = jnp.dtype(c.dtype)
    d = x.shape[-1]
    w_gate = param(self, "w_gate", (d, self.hidden), ("embed", "mlp"), c)
    w_up = param(self, "w_up", (d, self.hidden), ("embed", "mlp"), c)
    w_down = param(self, "w_down", (self.hidden, d), ("mlp", "embed"), c)
    return swiglu(x.astype(dtype), cast(w_gate, dtype), cast(w_up, dtype),
                  cast(w_down, dtype))
