"""A graph attention network (GAT; Veličković et al., 2018, "Graph Attention
Networks", ICLR) over edge lists, with optional relation-typed edges.

    z_i = W h_i                                              (N, H, F) per head
    e_ij = LeakyReLU_0.2(a_dst . z_i + a_src . z_j + a_rel . r_ij)   edge j -> i
    alpha_ij = softmax over the incoming edges of i (self-loop included)
    h'_i = sum_j alpha_ij (z_j + r_ij)      heads concatenated (hidden layers)
                                            or averaged (output layer)

The softmax is a *segment* softmax: edges are a flat list (src, dst), scores are
normalised per destination with `segment_max` / `segment_sum`, so the cost is
O(E) instead of the O(N^2) of a dense adjacency (`tests/test_kg.py` checks the
two agree). Every node gets a self-loop (Veličković et al. §2.1: "we only compute
e_ij for nodes j in N_i, ... including i"), so an isolated node keeps its own
transform W h_i. With `n_relations > 0` each edge carries a relation id and a
learned per-head relation vector r enters both the score and the message (the
relation-aware variant used by knowledge-graph GATs); the self-loop is its own
relation, id `n_relations`. `aggregation="mean"` replaces attention by the plain
mean over incoming edges (the GCN-style ablation of the kg_fusion experiment).

Shapes are static: a batch holds B subgraphs padded to N nodes and E edges,
`edge_mask` marks real edges, and every function is vmapped over B.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from moe_jax.config import KG_AGGREGATIONS as AGGREGATIONS


def segment_softmax(scores: jax.Array, segments: jax.Array, num_segments: int,
                    mask: jax.Array) -> jax.Array:
  """Softmax of scores (E, H) over the entries sharing a segment id (E,); masked
  entries get weight 0; a segment with no unmasked entry sums to 0, not NaN."""
  scores = jnp.where(mask[:, None], scores, -jnp.inf)
  seg_max = jax.ops.segment_max(scores, segments, num_segments)          # (N, H)
  # Subtracting the segment max keeps exp() in range; it cancels in the ratio.
  seg_max = jax.lax.stop_gradient(jnp.where(jnp.isfinite(seg_max), seg_max, 0.0))
  ex = jnp.where(mask[:, None], jnp.exp(scores - seg_max[segments]), 0.0)   # (E, H)
  denom = jax.ops.segment_sum(ex, segments, num_segments)                 # (N, H)
  return ex / jnp.maximum(denom[segments], 1e-20)


def segment_mean_weights(segments: jax.Array, num_segments: int, mask: jax.Array,
                         heads: int) -> jax.Array:
  """(E, H) weights 1/in-degree: the mean over each segment's unmasked entries."""
  m = mask.astype(jnp.float32)
  degree = jax.ops.segment_sum(m, segments, num_segments)                 # (N,)
  return jnp.broadcast_to((m / jnp.maximum(degree[segments], 1.0))[:, None],
                          (m.shape[0], heads))


def with_self_loops(src, dst, rel, mask, n_nodes: int, self_relation: int,
                    node_mask=None):
  """Append one self-loop per node (masked for padded nodes) to the (E,) lists."""
  ids = jnp.arange(n_nodes, dtype=src.dtype)
  loop_mask = jnp.ones((n_nodes,), bool) if node_mask is None else node_mask
  return (jnp.concatenate([src, ids]), jnp.concatenate([dst, ids]),
          jnp.concatenate([rel, jnp.full((n_nodes,), self_relation, rel.dtype)]),
          jnp.concatenate([mask, loop_mask]))


class GATLayer(nn.Module):
  """One multi-head graph attention layer on one graph or a batch of graphs.

  Call with h (..., N, F_in), src/dst/rel/edge_mask (..., E) and optional
  node_mask (..., N); returns (h' (..., N, H*F or F), alpha (..., E+N, H)), alpha
  being the weights of the edges followed by the N self-loops."""
  features: int                  # per head
  heads: int = 4
  concat: bool = True            # concat heads (hidden layers) or average (output)
  n_relations: int = 0           # 0: untyped edges
  aggregation: str = "attention"
  negative_slope: float = 0.2    # LeakyReLU slope of Veličković et al.

  @nn.compact
  def __call__(self, h, src, dst, rel, edge_mask, node_mask=None):
    if self.aggregation not in AGGREGATIONS:
      raise ValueError(f"aggregation={self.aggregation!r}; allowed: {AGGREGATIONS}")
    H, F = self.heads, self.features
    n_nodes = h.shape[-2]
    src, dst, rel = (jnp.asarray(a, jnp.int32) for a in (src, dst, rel))
    glorot = nn.initializers.glorot_uniform()
    z = nn.Dense(H * F, use_bias=False, kernel_init=glorot, name="w")(h)
    z = z.reshape(z.shape[:-1] + (H, F))                                   # (..., N, H, F)
    typed = self.n_relations > 0
    # One extra relation row for the self-loop type.
    rel_table = (self.param("rel", nn.initializers.normal(0.1),
                            (self.n_relations + 1, H, F)) if typed else None)
    if self.aggregation == "attention":
      a_src = self.param("a_src", glorot, (1, H, F))[0]                  # (H, F)
      a_dst = self.param("a_dst", glorot, (1, H, F))[0]
      a_rel = self.param("a_rel", glorot, (1, H, F))[0] if typed else None

    def one_graph(z, src, dst, rel, edge_mask, node_mask):
      src, dst, rel, mask = with_self_loops(src, dst, rel, edge_mask, n_nodes,
                                            self.n_relations, node_mask)
      msg = z[src]                                                         # (E', H, F)
      r = rel_table[jnp.clip(rel, 0, self.n_relations)] if typed else None  # (E', H, F)
      if self.aggregation == "attention":
        score = (jnp.sum(z[dst] * a_dst, -1) + jnp.sum(msg * a_src, -1))     # (E', H)
        if typed:
          score = score + jnp.sum(r * a_rel, -1)
        score = nn.leaky_relu(score, self.negative_slope)
        alpha = segment_softmax(score, dst, n_nodes, mask)                  # (E', H)
      else:
        alpha = segment_mean_weights(dst, n_nodes, mask, H)
      if typed:
        msg = msg + r
      out = jax.ops.segment_sum(alpha[..., None] * msg, dst, n_nodes)      # (N, H, F)
      return out, alpha

    if node_mask is None:
      node_mask = jnp.ones(h.shape[:-1], bool)
    fn = one_graph
    for _ in range(z.ndim - 3):                                            # batch axes
      fn = jax.vmap(fn)
    out, alpha = fn(z, src, dst, rel, edge_mask, node_mask)
    out = out.reshape(out.shape[:-2] + (H * F,)) if self.concat else out.mean(-2)
    bias = self.param("bias", nn.initializers.zeros, (out.shape[-1],))
    return out + bias, alpha


class GAT(nn.Module):
  """`n_layers` GAT layers: hidden ones concatenate `heads` heads of width
  out_features // heads and apply ELU (as in Veličković et al.); the last one
  averages its heads, each of width out_features."""
  out_features: int
  heads: int = 4
  n_layers: int = 2
  n_relations: int = 0
  aggregation: str = "attention"

  @nn.compact
  def __call__(self, h, src, dst, rel, edge_mask, node_mask=None):
    for i in range(self.n_layers):
      last = i == self.n_layers - 1
      h, _ = GATLayer(self.out_features if last else self.out_features // self.heads,
                      self.heads, concat=not last, n_relations=self.n_relations,
                      aggregation=self.aggregation, name=f"layer_{i}")(
                          h, src, dst, rel, edge_mask, node_mask)
      if not last:
        h = nn.elu(h)
    return h
