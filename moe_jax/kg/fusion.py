"""Knowledge-graph fusion: GAT entity embeddings injected into the residual stream
at the tokens that mention an entity, through a gated projection.

    node features (B, N, F) --dense--> GAT --> entity embeddings u (B, N, Dg)
    after each chosen layer l, at a token t that ends a mention of node m:
        v = W_l u_m                                  (D,)
        g = sigmoid(G_l [x_t ; v])                   (D,)  per-channel gate
        x_t <- x_t + g * v                           other tokens: x_t unchanged

The injection follows ERNIE (Zhang et al., 2019, "ERNIE: Enhanced Language
Representation with Informative Entities", ACL): entity embeddings are fused into
the token states at the aligned mention positions; the gate reads both the token
and the entity, as GreaseLM's interaction layers let the LM decide how much of
the graph to take (Zhang et al., 2022, "GreaseLM: Graph REASoning Enhanced
Language Models", ICLR). Differences from both: the graph side is a GAT run on a
per-sequence subgraph of the mentioned entities and their neighbours, and the
fusion is one-way (graph -> text), trained jointly with the LM from scratch.

A mention is marked on its LAST token: in a causal LM the entity is only known
once its name is complete, and marking earlier tokens would leak the name's own
remaining bytes to the model (see `moe_jax/kg/linking.py`).

Inputs (`kg` dict, one padded subgraph per sequence; `moe_jax.kg.batching`):
  node_features (B, N, F) float   edge_src/edge_dst/edge_rel (B, E) int
  edge_mask (B, E) bool           node_mask (B, N) bool
  mentions (B, T) int             local node id of the mention ending at t, or -1
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from moe_jax.config import ModelConfig
from moe_jax.kg.gat import GAT

KG_KEYS = ("node_features", "edge_src", "edge_dst", "edge_rel", "edge_mask",
           "node_mask", "mentions")


def kg_inputs(batch, config: ModelConfig) -> dict | None:
  """The kg dict of a batch, or None when fusion is off or the batch has no kg
  arrays (plain text through a fused model: no mentions, so the trunk's function)."""
  if not config.kg_fusion or "mentions" not in batch:
    return None
  return {k: batch[k] for k in KG_KEYS}


def example_inputs(config: ModelConfig, batch: int = 1, seq_len: int = 8,
                   nodes: int = 1, edges: int = 1) -> dict[str, jnp.ndarray]:
  """Placeholder kg inputs of the right dtypes, for `init` and parameter counts:
  the kg submodule is created only when called with kg inputs, and its parameters
  depend on config.kg_* alone, not on the (padded) graph sizes."""
  return {"node_features": jnp.zeros((batch, nodes, config.kg_features), jnp.float32),
          "edge_src": jnp.zeros((batch, edges), jnp.int32),
          "edge_dst": jnp.zeros((batch, edges), jnp.int32),
          "edge_rel": jnp.zeros((batch, edges), jnp.int32),
          "edge_mask": jnp.zeros((batch, edges), bool),
          "node_mask": jnp.zeros((batch, nodes), bool),
          "mentions": jnp.full((batch, seq_len), -1, jnp.int32)}


class KGFusion(nn.Module):
  """The graph encoder and one gated injection per layer in `config.kg_layers`."""
  config: ModelConfig

  def setup(self):
    c = self.config
    self.node_in = nn.Dense(c.kg_dim, name="node_in")
    self.gat = GAT(c.kg_dim, c.kg_heads, c.kg_gat_layers, c.kg_relations,
                   c.kg_aggregation, name="gat")
    # Zero-initialised value projection: at step 0 fusion adds exactly nothing, so
    # training starts from the plain LM's function (cf. GreaseLM's modality
    # interaction starting near identity).
    self.values = [nn.Dense(c.d_model, use_bias=False, kernel_init=nn.initializers.zeros,
                            name=f"value_{l}") for l in c.kg_layers]
    self.gates = [nn.Dense(c.d_model, name=f"gate_{l}") for l in c.kg_layers]

  def encode(self, kg: dict[str, jax.Array]) -> jax.Array:
    """Entity embeddings (B, N, kg_dim) of each sequence's subgraph."""
    missing = [k for k in KG_KEYS if k not in kg]
    if missing:
      raise ValueError(f"kg inputs lack {missing}; expected keys {KG_KEYS}")
    h = nn.elu(self.node_in(kg["node_features"].astype(jnp.float32)))      # (B, N, Dg)
    return self.gat(h, kg["edge_src"], kg["edge_dst"], kg["edge_rel"], kg["edge_mask"],
                    kg["node_mask"])                                        # (B, N, Dg)

  def inject(self, layer: int, x: jax.Array, nodes: jax.Array,
             mentions: jax.Array) -> jax.Array:
    """x (B, T, D) after `layer`; returns it with entity information added at the
    mention tokens (bit-identical elsewhere, and everywhere if `layer` is not in
    config.kg_layers)."""
    if layer not in self.config.kg_layers:
      return x
    j = self.config.kg_layers.index(layer)
    ent = jnp.take_along_axis(nodes, jnp.maximum(mentions, 0)[..., None], axis=1)  # (B, T, Dg)
    v = self.values[j](ent).astype(x.dtype)                                 # (B, T, D)
    g = nn.sigmoid(self.gates[j](jnp.concatenate([x, v], -1))).astype(x.dtype)  # (B, T, D)
    return jnp.where((mentions >= 0)[..., None], x + g * v, x)
