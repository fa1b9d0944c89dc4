"""The router: token -> scores for every expert -> top-k experts and their weights.

    logits = x @ W_r                                  (T, E)
    scores = softmax(logits)  or  sigmoid(logits)     (T, E)
    probs  = scores / sum(scores)                     (T, E) sums to one per token
    select = scores + bias                            bias: aux-loss-free balancing
    [group-limited] keep the best `topk_groups` of `n_groups` groups, mask the rest
    experts = top_k(select)                           (T, k), best first
    active  = all True                    routing="topk"
            | mass before slot j < p      routing="topp"       (slot 0 always)
            | probs[experts] > threshold  routing="threshold"  (slot 0 always)
    weights = scores[experts] * active  (renormalised over active if asked) * route_scale

The bias changes *which* experts are picked, never the weights they get
(DeepSeek-V3, Sec. 2.1.2). It lives in its own Flax collection ("router_bias"), so
the optimizer never sees it; `update_router_bias` is the V3 rule applied outside the
optimizer: b_i += gamma * sign(mean_load - load_i).

Adaptive compute (Huang et al., 2024, "Harder Tasks Need More Experts: Dynamic
Routing in MoE Models"): with routing="topp" a token takes experts in descending
order until their cumulative probability reaches `top_p`; with "threshold" it takes
every expert whose probability exceeds `route_threshold`. Either way at least one
expert and at most k_max = `top_k`. Shapes stay static: the router always returns
the top-k_max slots and a (T, k) `active` mask; an inactive slot has weight 0 and
counts in no load, and dispatch skips it. How the two adaptive rules meet the
other options:
  - bias: the *order* of the slots is the biased score's (so the bias still steers
    which experts a token uses), the *mass* that stops top-p and the threshold are
    the unbiased probabilities. The bias thus never changes how many experts a token
    needs, only which ones.
  - groups: experts outside the kept groups cannot be selected; the mass is still
    measured in the global probabilities, so a token whose kept groups hold little
    mass takes up to k_max experts.
  - sigmoid scores: the mass and the threshold use the normalised `probs`.
"""
from __future__ import annotations

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from moe_jax.config import ModelConfig
from moe_jax.models.layers import param


class Routing(NamedTuple):
  experts: jax.Array   # (T, k) int32, the selected experts of each token
  weights: jax.Array   # (T, k) float32, their combine weights
  probs: jax.Array     # (T, E) float32, scores normalised to sum to one per token
  logits: jax.Array    # (T, E) float32, raw router logits
  load: jax.Array      # (E,) float32, number of active (token, slot) assignments per expert
  active: jax.Array    # (T, k) bool, the slots a token uses (all True for top-k)


def active_slots(slot_probs: jax.Array, config: ModelConfig) -> jax.Array:
  """Which of the k_max selected slots a token uses. slot_probs: (T, k) the
  normalised probability of each selected expert, best slot first -> (T, k) bool."""
  first = jnp.arange(slot_probs.shape[-1]) == 0                      # (k,)
  if config.routing == "topk":
    return jnp.ones(slot_probs.shape, bool)
  if config.routing == "topp":
    # Exclusive prefix sums: slot j is taken while the mass of the slots before it
    # has not reached p (Huang et al. eq. 3: the smallest prefix with mass >= p).
    mass_before = jnp.concatenate(
        [jnp.zeros_like(slot_probs[:, :1]), jnp.cumsum(slot_probs[:, :-1], -1)], -1)
    return (mass_before < config.top_p) | first                       # (T, k)
  return (slot_probs > config.route_threshold) | first               # (T, k)


def route(logits: jax.Array, bias: jax.Array | None, config: ModelConfig) -> Routing:
  """Top-k (or adaptive, masked top-k_max) routing of a flat batch of tokens.
  logits: (T, E)."""
  c = config
  t, e = logits.shape
  logits = logits.astype(jnp.float32)
  if c.score_func == "softmax":
    scores = jax.nn.softmax(logits, axis=-1)                          # (T, E)
  else:
    scores = jax.nn.sigmoid(logits)                                   # (T, E)
  select = scores if bias is None else scores + bias                  # (T, E)

  if c.n_groups > 1:
    per_group = e // c.n_groups
    grouped = select.reshape(t, c.n_groups, per_group)                # (T, G, E/G)
    # A group's score: its best expert, or (with a bias, as in V3) its best two.
    n_best = 1 if bias is None else min(2, per_group)
    group_score = jax.lax.top_k(grouped, n_best)[0].sum(-1)           # (T, G)
    _, best_groups = jax.lax.top_k(group_score, c.topk_groups)        # (T, topk_groups)
    keep = jnp.zeros((t, c.n_groups), bool).at[
        jnp.arange(t)[:, None], best_groups].set(True)                # (T, G)
    select = jnp.where(keep[:, :, None], grouped, -jnp.inf).reshape(t, e)

  _, experts = jax.lax.top_k(select, c.top_k)                         # (T, k) best first
  probs = scores / jnp.sum(scores, axis=-1, keepdims=True)            # (T, E)
  active = active_slots(jnp.take_along_axis(probs, experts, axis=-1), c)  # (T, k)
  weights = jnp.take_along_axis(scores, experts, axis=-1)             # (T, k)
  weights = jnp.where(active, weights, 0.0)
  if c.norm_topk_prob:
    weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
  weights = weights * c.route_scale
  load = jnp.zeros((e,), jnp.float32).at[experts.reshape(-1)].add(
      active.reshape(-1).astype(jnp.float32))                         # (E,)
  return Routing(experts=experts.astype(jnp.int32), weights=weights, probs=probs,
                 logits=logits, load=load, active=active)


class RouterWeights(nn.Module):
  """Declares the router's parameters and returns them as plain arrays, so the
  routing itself stays a pure function that also runs inside `shard_map`."""
  config: ModelConfig

  @nn.compact
  def __call__(self, d_model: int) -> tuple[jax.Array, jax.Array | None]:
    c = self.config
    kernel = param(self, "kernel", (d_model, c.n_experts), ("embed", None), c)
    bias = None
    if c.router_bias:
      bias = self.variable("router_bias", "bias",
                           lambda: jnp.zeros((c.n_experts,), jnp.float32)).value
    return kernel, bias


def route_tokens(x: jax.Array, kernel: jax.Array, bias: jax.Array | None,
                 config: ModelConfig) -> Routing:
  """x: (T, D) -> Routing. Logits in float32: routing decisions are sensitive to
  rounding."""
  logits = x.astype(jnp.float32) @ kernel.astype(jnp.float32)       # (T, E)
  return route(logits, bias, config)


def update_router_bias(bias: jax.Array, load: jax.Array, gamma: float) -> jax.Array:
  """DeepSeek-V3's auxiliary-loss-free update: raise the bias of under-loaded experts,
  lower it for over-loaded ones, by a fixed step gamma. bias, load: (..., E)."""
  mean_load = jnp.mean(load, axis=-1, keepdims=True)
  return bias + gamma * jnp.sign(mean_load - load)
