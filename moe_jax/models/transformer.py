"""The decoder-only MoE language model.

    tokens -> embed -> L x [ x + Attn_a(i)(norm(x)) ; x + FFN_f(i)(norm(x)) ] -> norm -> logits

Layer i applies attention parameter set a(i) and feed-forward set f(i) from the
sharing plan (`sharing.py`). Each set is one Flax submodule, created once and
called by every layer that uses it, so shared layers hold one array and receive the
sum of the gradients of all their uses. The norm in front of a sublayer belongs to
its set.

With `config.remat` other than "none", each sublayer runs under `jax.checkpoint`
(`nn.remat`) with that policy: the backward pass recomputes its activations instead
of keeping them (Chen et al., 2016, "Training deep nets with sublinear memory cost").

`__call__` returns the logits and an aux dict of router statistics stacked over the
MoE layers (leading axis = MoE layer, in depth order); losses and metrics are pure
functions of that dict.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from moe_jax.config import ModelConfig
from moe_jax.kg.fusion import KGFusion
from moe_jax.models.layers import Attention, DenseMLP, RMSNorm, param
from moe_jax.models.mla import MLAttention
from moe_jax.models.moe import MoEBlock
from moe_jax.models.sharing import make_plan


class AttentionSublayer(nn.Module):
  config: ModelConfig

  @nn.compact
  def __call__(self, x, positions, return_probs: bool = False, cache=None):
    attn = MLAttention if self.config.attention == "mla" else Attention
    return attn(self.config, name="attn")(
        RMSNorm(self.config, name="norm")(x), positions, return_probs, cache=cache)


class FeedForwardSublayer(nn.Module):
  config: ModelConfig
  moe: bool

  @nn.compact
  def __call__(self, x):
    h = RMSNorm(self.config, name="norm")(x)
    if self.moe:
      return MoEBlock(self.config, name="moe")(h)
    return DenseMLP(self.config, self.config.d_ff, name="mlp")(h), None


REMAT_POLICIES = {
    "full": None,                                          # save nothing but the inputs
    "dots": jax.checkpoint_policies.dots_saveable,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def _maybe_remat(cls, config: ModelConfig, static_argnums=()):
  if config.remat == "none":
    return cls
  return nn.remat(cls, policy=REMAT_POLICIES[config.remat], static_argnums=static_argnums)


class Transformer(nn.Module):
  config: ModelConfig

  def setup(self):
    c = self.config
    self.plan = make_plan(c)
    self.embed = param(self, "embed", (c.vocab_size, c.d_model), ("vocab", "embed"), c)
    # static_argnums count `self` as 0: return_probs is a Python bool.
    attn_cls = _maybe_remat(AttentionSublayer, c, static_argnums=(3,))
    ffn_cls = _maybe_remat(FeedForwardSublayer, c)
    self.attn_sets = [attn_cls(c, name=f"attn_{i}")
                      for i in range(max(self.plan.attn) + 1)]
    nd = c.n_dense_layers
    n_dense_sets = max(self.plan.ffn[:nd], default=-1) + 1
    n_moe_sets = max(self.plan.ffn[nd:], default=-1) + 1
    self.dense_sets = [ffn_cls(c, moe=False, name=f"dense_ffn_{i}")
                       for i in range(n_dense_sets)]
    self.moe_sets = [ffn_cls(c, moe=True, name=f"moe_ffn_{i}")
                     for i in range(n_moe_sets)]
    self.final_norm = RMSNorm(c, name="final_norm")
    if c.kg_fusion:
      self.kg = KGFusion(c, name="kg")      # knowledge-graph fusion (moe_jax/kg)
    if not c.tie_embeddings:
      self.unembed = param(self, "unembed", (c.d_model, c.vocab_size),
                           ("embed", "vocab"), c)

  def __call__(self, tokens: jax.Array, positions: jax.Array | None = None, *,
               return_hidden: bool = False, return_attention: bool = False,
               return_features: bool = False, cache: dict | None = None, kg=None):
    """tokens: (B, T) int -> logits (B, T, V) float32, aux {name: (L_moe, ...)}.

    For distillation, `return_hidden` adds aux["hidden"] (L, B, T, D), the residual
    stream after each layer, and `return_attention` adds aux["attention"]
    (L, B, Nq, T, T), each layer's attention probabilities (computed explicitly,
    only when asked for). `return_features` adds aux["features"] (B, T, D), the
    final-norm output the logits are read from (reward and value heads, moe_jax/align). `kg` (config.kg_fusion only): the subgraph and mention
    arrays of `moe_jax.kg.fusion`, injected after the layers in config.kg_layers.

    For serving, `cache` {"layer_i": per-layer KV cache} (moe_jax.serve.kv_cache)
    makes attention read and extend it; aux["cache"] is the updated cache. Keyed by
    layer, not by parameter set: layers that share weights still see different
    activations, so they keep their own keys and values."""
    c = self.config
    dtype = jnp.dtype(c.dtype)
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    x = jnp.take(self.embed, tokens, axis=0).astype(dtype)              # (B, T, D)
    if kg is not None and not c.kg_fusion:
      raise ValueError("kg inputs were given but ModelConfig.kg_fusion=False")
    kg_nodes = self.kg.encode(kg) if kg is not None else None           # (B, N, Dg)
    stats, hidden, attention = [], [], []
    new_cache = {}
    for layer in range(c.n_layers):
      if cache is not None:
        name = f"layer_{layer}"
        a, new_cache[name] = self.attn_sets[self.plan.attn[layer]](
            x, positions, cache=cache[name])
        x = x + a
      elif return_attention:
        a, probs = self.attn_sets[self.plan.attn[layer]](x, positions, True)
        x = x + a
        attention.append(probs)
      else:
        x = x + self.attn_sets[self.plan.attn[layer]](x, positions, False)
      if layer < c.n_dense_layers:
        y, _ = self.dense_sets[self.plan.ffn[layer]](x)
      else:
        y, layer_stats = self.moe_sets[self.plan.ffn[layer]](x)
        stats.append(layer_stats)
      x = x + y
      if kg_nodes is not None:
        x = self.kg.inject(layer, x, kg_nodes, kg["mentions"])
      if return_hidden:
        hidden.append(x)
    x = self.final_norm(x)                                              # (B, T, D)
    unembed = self.embed.T if c.tie_embeddings else self.unembed        # (D, V)
    logits = jnp.einsum("btd,dv->btv", x, unembed.astype(dtype)).astype(jnp.float32)
    aux = jax.tree.map(lambda *a: jnp.stack(a), *stats) if stats else {}
    if return_hidden:
      aux["hidden"] = jnp.stack(hidden)                                 # (L, B, T, D)
    if return_attention:
      aux["attention"] = jnp.stack(attention)                           # (L, B, N, T, T)
    if return_features:
      aux["features"] = x                                               # (B, T, D)
    if cache is not None:
      aux["cache"] = new_cache
    return logits, aux


def moe_layer_sets(config: ModelConfig) -> list[str]:
  """Module name of the MoE parameter set each MoE layer uses, in depth order (the
  leading axis of the aux dict)."""
  plan = make_plan(config)
  return [f"moe_ffn_{plan.ffn[i]}" for i in range(config.n_dense_layers, config.n_layers)]
