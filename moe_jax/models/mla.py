"""Multi-head latent attention (MLA, DeepSeek-V2 Sec. 2.1; DeepSeek-V3 Sec. 2.1.1).

    x ─ wkv_a ─> c_kv (B,T,C) ─ kv_norm ─┬─ wk_b ─> k_nope (B,T,N,Dn) ─┐
      │                                  └─ wv_b ─> v      (B,T,N,Dv)  │ concat
      └ wk_rope ─> RoPE ─> k_rope (B,T,1,Dr), shared by every head ────┘─> k
    x ─ [wq_a ─ q_norm ─] wq ─> (q_nope | q_rope ─ RoPE) ─> q        (B,T,N,Dn+Dr)
    softmax(q k^T * scale) v ─ wo ─> (B,T,D)

Keys and values are decompressed from a per-token latent c_kv of width C =
kv_lora_rank; positional information travels in a separate, decoupled rotary key
k_rope of width Dr shared by all heads, so only (c_kv, k_rope), C + Dr numbers per
token and layer, need to be cached for decoding (`mla_attend_cached`), instead of
2 N Dh for multi-head attention. With q_lora_rank > 0 the queries are compressed too
(V2 full, V3), which saves activation memory in training, not cache.

Long contexts: DeepSeek checkpoints extend RoPE with YaRN (`rope_frequencies`).

Decoding uses the "absorbed" form: q_nope wk_b^T is a query in latent space, so
scores are q_lat . c_kv + q_rope . k_rope and the output is (probs c_kv) wv_b, and
keys and values are never decompressed (DeepSeek-V2 Sec. 2.1.2, "absorb").
"""
from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from moe_jax.config import ModelConfig
from moe_jax.models.layers import RMSNorm, cast, causal_attention_probs, param, rotary


def _yarn_m(scale: float, mscale: float) -> float:
  return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def mla_scale(c: ModelConfig) -> float:
  """Softmax temperature: 1 / sqrt(Dn + Dr), as in both papers; with YaRN times
  m(s, mscale_all_dim)^2 (DeepSeek-V2/V3's long-context setting)."""
  scale = (c.qk_nope_head_dim + c.qk_rope_head_dim) ** -0.5
  if c.rope_scaling == "yarn" and c.yarn_mscale_all_dim:
    scale *= _yarn_m(c.rope_factor, c.yarn_mscale_all_dim) ** 2
  return scale


def rope_frequencies(c: ModelConfig) -> tuple[np.ndarray | None, float]:
  """(frequencies (Dr/2,) float32 or None for plain RoPE, cos/sin scale).

  YaRN (Peng et al., 2023, "YaRN: Efficient Context Window Extension"): dimensions
  that rotate more than beta_fast times over the original context keep their
  frequency, those under beta_slow are divided by the factor s, a linear ramp in
  between; cos and sin are scaled by m(s, mscale) / m(s, mscale_all_dim). Computed
  in float32 as transformers does, so converted checkpoints match it."""
  if c.rope_scaling != "yarn":
    return None, 1.0
  dim, base, s = c.qk_rope_head_dim, c.rope_theta, c.rope_factor

  def correction_dim(rotations):
    return dim * math.log(c.rope_original_max_len / (rotations * 2 * math.pi)) / (
        2 * math.log(base))
  low = max(math.floor(correction_dim(c.yarn_beta_fast)), 0)
  high = min(math.ceil(correction_dim(c.yarn_beta_slow)), dim - 1)
  high = high + 0.001 if low == high else high
  ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
  pos = np.float32(base) ** (np.arange(0, dim, 2).astype(np.float32) / np.float32(dim))
  keep = (1 - ramp).astype(np.float32)                    # 1: extrapolate (unchanged)
  freqs = (1.0 / (s * pos)) * (1 - keep) + (1.0 / pos) * keep
  if c.yarn_mscale and c.yarn_mscale_all_dim:
    mscale = _yarn_m(s, c.yarn_mscale) / _yarn_m(s, c.yarn_mscale_all_dim)
  else:
    mscale = _yarn_m(s, 1.0)
  return freqs.astype(np.float32), float(mscale)


class MLAttention(nn.Module):
  """Causal multi-head latent attention. Same call signature as `Attention`."""
  config: ModelConfig

  def setup(self):
    c = self.config
    d, n = c.d_model, c.n_heads
    dq = c.qk_nope_head_dim + c.qk_rope_head_dim
    if c.q_lora_rank:
      self.wq_a = param(self, "wq_a", (d, c.q_lora_rank), ("embed", None), c)
      self.q_norm = RMSNorm(c, name="q_norm")
      self.wq = param(self, "wq", (c.q_lora_rank, n, dq), ("latent", "heads", "head_dim"), c)
    else:
      self.wq = param(self, "wq", (d, n, dq), ("embed", "heads", "head_dim"), c)
    self.wkv_a = param(self, "wkv_a", (d, c.kv_lora_rank), ("embed", None), c)
    self.wk_rope = param(self, "wk_rope", (d, c.qk_rope_head_dim), ("embed", None), c)
    self.kv_norm = RMSNorm(c, name="kv_norm")
    self.wk_b = param(self, "wk_b", (c.kv_lora_rank, n, c.qk_nope_head_dim),
                      ("latent", "heads", "head_dim"), c)
    self.wv_b = param(self, "wv_b", (c.kv_lora_rank, n, c.v_head_dim),
                      ("latent", "heads", "head_dim"), c)
    self.wo = param(self, "wo", (n, c.v_head_dim, d), ("heads", "head_dim", "embed"), c)

  def rope(self, x: jax.Array, positions: jax.Array) -> jax.Array:
    freqs, mscale = rope_frequencies(self.config)
    return rotary(x, positions, self.config.rope_theta,
                  None if freqs is None else jnp.asarray(freqs), mscale)

  def queries(self, x: jax.Array, positions: jax.Array):
    """x (B, T, D) -> q_nope (B, T, N, Dn), rotated q_rope (B, T, N, Dr)."""
    c = self.config
    dtype = jnp.dtype(c.dtype)
    h = x
    if c.q_lora_rank:
      h = self.q_norm(jnp.einsum("btd,dr->btr", x, cast(self.wq_a, dtype)))  # (B, T, Rq)
    q = jnp.einsum("btd,dnh->btnh", h, cast(self.wq, dtype))           # (B, T, N, Dn+Dr)
    q_nope, q_rope = jnp.split(q, [c.qk_nope_head_dim], axis=-1)
    return q_nope, self.rope(q_rope, positions)

  def latents(self, x: jax.Array, positions: jax.Array):
    """x (B, T, D) -> what is cached: c_kv (B, T, C) normed, k_rope (B, T, Dr) rotated."""
    c = self.config
    dtype = jnp.dtype(c.dtype)
    c_kv = self.kv_norm(jnp.einsum("btd,dc->btc", x, cast(self.wkv_a, dtype)))  # (B,T,C)
    k_rope = jnp.einsum("btd,dr->btr", x, cast(self.wk_rope, dtype))    # (B, T, Dr)
    k_rope = self.rope(k_rope[:, :, None, :], positions)[:, :, 0]
    return c_kv, k_rope

  def __call__(self, x: jax.Array, positions: jax.Array, return_probs: bool = False,
               cache: dict | None = None):
    """x (B, T, D) -> (B, T, D); with `return_probs`, also (B, N, T, T); with a
    latent `cache` (`init_mla_cache`), also the updated cache (`mla_attend_cached`)."""
    c = self.config
    dtype = jnp.dtype(c.dtype)
    x = x.astype(dtype)
    if cache is not None:
      return mla_attend_cached(self, x, positions, cache)
    q_nope, q_rope = self.queries(x, positions)
    c_kv, k_rope = self.latents(x, positions)
    k_nope = jnp.einsum("btc,cnh->btnh", c_kv, cast(self.wk_b, dtype))  # (B, T, N, Dn)
    v = jnp.einsum("btc,cnh->btnh", c_kv, cast(self.wv_b, dtype))      # (B, T, N, Dv)
    k_rope = jnp.broadcast_to(k_rope[:, :, None, :], q_rope.shape)     # (B, T, N, Dr)
    q = jnp.concatenate([q_nope, q_rope], axis=-1)                     # (B, T, N, Dq)
    k = jnp.concatenate([k_nope, k_rope], axis=-1)                     # (B, T, N, Dq)
    wo = cast(self.wo, dtype)
    if return_probs:
      probs = causal_attention_probs(q, k)                               # (B, N, T, T)
      out = jnp.einsum("bnts,bsnh->btnh", probs.astype(dtype), v)        # (B, T, N, Dv)
      return jnp.einsum("btnh,nhd->btd", out, wo), probs
    # dot_product_attention wants one head width for q, k and v: zero-pad the
    # narrower side (zeros change neither the scores nor the output's first Dv).
    dq, dv = q.shape[-1], v.shape[-1]
    width = max(dq, dv)
    pad = lambda a: jnp.pad(a, [(0, 0)] * 3 + [(0, width - a.shape[-1])])
    out = jax.nn.dot_product_attention(pad(q), pad(k), pad(v), is_causal=True,
                                       scale=mla_scale(c))[..., :dv]     # (B, T, N, Dv)
    return jnp.einsum("btnh,nhd->btd", out, wo)                          # (B, T, D)



def init_mla_cache(config: ModelConfig, batch: int, length: int, dtype=None
                   ) -> dict[str, jax.Array]:
  """One layer's empty MLA cache, in the serving engine's convention (one dict per
  layer, slot-major): the normed latent and the rotated shared key, C + Dr numbers
  per token instead of 2 N H."""
  dtype = jnp.dtype(dtype or config.dtype)
  return {"c_kv": jnp.zeros((batch, length, config.kv_lora_rank), dtype),
          "k_rope": jnp.zeros((batch, length, config.qk_rope_head_dim), dtype)}


def mla_attend_cached(module: MLAttention, x: jax.Array, positions: jax.Array,
                      cache: dict[str, jax.Array]) -> tuple[jax.Array, dict]:
  """x: (B, T, D) new tokens at absolute `positions` (B, T); cache {"c_kv": (B, S, C),
  "k_rope": (B, S, Dr)}. Writes the new latents at their positions, then query t of
  row b reads the slots s <= positions[b, t] (later ones, padding or a previous
  request's leftovers, are masked, as in layers.attend_cached). -> (y (B, T, D), cache).

  Absorbed form: keys and values are never decompressed; each head's query moves
  into latent space instead, q_lat = q_nope wk_b^T (B, T, N, C), and the output is
  (probs c_kv) wv_b. Scores: q_lat . c_kv + q_rope . k_rope."""
  c = module.config
  dtype = jnp.dtype(c.dtype)
  x = x.astype(dtype)
  q_nope, q_rope = module.queries(x, positions)
  c_new, k_new = module.latents(x, positions)
  rows = jnp.arange(x.shape[0])[:, None]                                 # (B, 1)
  c_kv = cache["c_kv"].at[rows, positions].set(c_new.astype(cache["c_kv"].dtype))
  k_rope = cache["k_rope"].at[rows, positions].set(k_new.astype(cache["k_rope"].dtype))
  q_lat = jnp.einsum("btnh,cnh->btnc", q_nope, cast(module.wk_b, dtype))  # (B, T, N, C)
  scores = (jnp.einsum("btnc,bsc->bnts", q_lat.astype(jnp.float32),
                       c_kv.astype(jnp.float32))
            + jnp.einsum("btnr,bsr->bnts", q_rope.astype(jnp.float32),
                         k_rope.astype(jnp.float32))) * mla_scale(c)     # (B, N, T, S)
  visible = jnp.arange(c_kv.shape[1]) <= positions[:, :, None]           # (B, T, S)
  scores = jnp.where(visible[:, None], scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1)
  out_lat = jnp.einsum("bnts,bsc->btnc", probs.astype(dtype), c_kv.astype(dtype))
  out = jnp.einsum("btnc,cnh->btnh", out_lat, cast(module.wv_b, dtype))   # (B, T, N, Dv)
  y = jnp.einsum("btnh,nhd->btd", out, cast(module.wo, dtype))            # (B, T, D)
  return y, {**cache, "c_kv": c_kv, "k_rope": k_rope}
