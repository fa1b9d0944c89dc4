"""Losses as pure functions: language modelling, load balance, router z-loss, the
dynamic (router entropy) loss.

The balance losses read the router statistics of `moe.router_stats` (leading axes,
e.g. the MoE-layer axis of the model's aux dict, are averaged):
  load       (..., E)    hard assignment counts per expert
  mean_prob  (..., E)    mean normalised router score per expert
  seq_load   (..., B, E) counts per sequence
  seq_prob   (..., B, E) mean normalised score per sequence
  router_z, router_entropy  (...,)  per-layer means over tokens

Notation: E experts, k experts per token, f_i = load_i / sum(load) the fraction of
assignments that went to expert i (sums to one; 1/E when balanced), P_i = mean_prob_i.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from moe_jax.config import BALANCE_LOSSES


def cross_entropy(logits: jax.Array, targets: jax.Array,
                  mask: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """Mean next-token cross-entropy and accuracy. logits (B, T, V), targets (B, T).

  Negative targets are ignored (not counted in either mean), e.g. the prompt of an
  SL-CAI example (moe_jax/align/slcai.py); `mask` (B, T) weights the rest."""
  logits = logits.astype(jnp.float32)
  valid = targets >= 0                                                       # (B, T)
  safe = jnp.where(valid, targets, 0)
  log_z = jax.nn.logsumexp(logits, axis=-1)                                  # (B, T)
  target_logit = jnp.take_along_axis(logits, safe[..., None], -1)[..., 0]    # (B, T)
  nll = log_z - target_logit
  correct = (jnp.argmax(logits, -1) == targets).astype(jnp.float32)
  mask = valid.astype(jnp.float32) if mask is None else mask * valid
  mask = mask.astype(jnp.float32)
  denom = jnp.maximum(jnp.sum(mask), 1.0)
  return jnp.sum(nll * mask) / denom, jnp.sum(correct * mask) / denom


def _fraction(load: jax.Array) -> jax.Array:
  return load / jnp.maximum(jnp.sum(load, axis=-1, keepdims=True), 1e-9)


def source_balance_loss(load: jax.Array, mean_prob: jax.Array,
                        alpha: float = 0.01) -> jax.Array:
  """The overview's  L = alpha * sum_i (f_i / mu - 1)^2,  mu = mean_i f_i (= 1/E).

  f_i counts hard top-k decisions and has no gradient. We use a straight-through
  estimate: the *value* is computed from the hard fractions f_i, the *gradient*
  flows through the mean router probability P_i (f_i := P_i + stop_grad(f_i - P_i)),
  the same factor that carries the gradient in the Switch loss. The gradient with
  respect to P_i is 2 alpha (f_i / mu - 1) / mu: it lowers the probability of
  over-loaded experts and raises it for under-loaded ones, in proportion to their
  imbalance. It is zero exactly at perfect balance.
  """
  f = _fraction(load)
  f_st = mean_prob + jax.lax.stop_gradient(f - mean_prob)
  mu = jnp.mean(jax.lax.stop_gradient(f), axis=-1, keepdims=True)
  return alpha * jnp.mean(jnp.sum((f_st / mu - 1.0) ** 2, axis=-1))


def switch_balance_loss(load: jax.Array, mean_prob: jax.Array,
                        alpha: float = 0.01) -> jax.Array:
  """Switch Transformer (Fedus et al., 2021, eq. 4): alpha * E * sum_i f_i * P_i.
  Equals alpha at perfect balance; gradient only through P_i."""
  n_experts = load.shape[-1]
  return alpha * n_experts * jnp.mean(jnp.sum(_fraction(load) * mean_prob, axis=-1))


def switch_alpha_matching_source(alpha: float, n_experts: int) -> float:
  """The Switch alpha whose gradient equals that of the source loss at `alpha`: 2 E alpha.

  Gradients with respect to the mean router probabilities P (f: hard fractions,
  mu = mean_i f_i = 1/E since the f_i sum to one):
    source   d/dP_i [alpha sum_j (f_j/mu - 1)^2]  = 2 alpha E (E f_i - 1)
                                                  = 2 alpha E^2 f_i  -  2 alpha E
    Switch   d/dP_i [alpha_w E sum_j f_j P_j]     = alpha_w E f_i
  The P_i are means of scores normalised per token, so they sum to one whatever the
  router's parameters: any change dP sums to zero, and a gradient that is the same for
  every expert (-2 alpha E) moves no parameter. The rest is equal when
  alpha_w E = 2 alpha E^2. So the straight-through source loss has exactly the
  gradient of the Switch loss at alpha_w = 2 E alpha (the loss values differ); at
  equal alpha its gradient is 2E times larger (32x for 16 experts).
  """
  return 2.0 * n_experts * alpha


def sequence_balance_loss(seq_load: jax.Array, seq_prob: jax.Array,
                          alpha: float = 0.01) -> jax.Array:
  """DeepSeek-V3's sequence-wise loss (eq. 17-20), per sequence then averaged:
  f_i = E / (k T) * count_i (= E * fraction), P_i = mean over the sequence of the
  normalised scores, L = alpha * sum_i f_i P_i."""
  n_experts = seq_load.shape[-1]
  f = n_experts * _fraction(seq_load)
  return alpha * jnp.mean(jnp.sum(f * seq_prob, axis=-1))


def router_z_loss(router_z: jax.Array, alpha: float = 1e-3) -> jax.Array:
  """ST-MoE z-loss (Zoph et al., 2022): alpha * mean_t logsumexp(logits_t)^2.
  `router_z` is that mean per MoE layer, from the aux dict."""
  return alpha * jnp.mean(router_z)


def router_entropy_loss(router_entropy: jax.Array, alpha: float) -> jax.Array:
  """The dynamic loss of Huang et al. (2024), "Harder Tasks Need More Experts":
  alpha * mean_t H(p_t),  H(p) = -sum_i p_i log p_i  over the router distribution.

  Top-p routing alone rewards a flat router (a flat distribution needs many experts
  to reach p, and more experts usually lower the LM loss), so it drifts to k_max for
  every token. Minimising the entropy pushes each token's mass onto few experts;
  tokens that stay uncertain still take more. `router_entropy` is that mean per
  MoE layer, from the aux dict."""
  return alpha * jnp.mean(router_entropy)


def balance_loss(aux: dict[str, jax.Array], kind: str, alpha: float) -> jax.Array:
  """The configured balance term from the model's aux dict (0 when no MoE layer)."""
  if kind not in BALANCE_LOSSES:
    raise ValueError(f"balance loss kind={kind!r} is unknown; allowed: {BALANCE_LOSSES}")
  if kind == "none" or not aux:
    return jnp.zeros((), jnp.float32)
  if kind == "source":
    return source_balance_loss(aux["load"], aux["mean_prob"], alpha)
  if kind == "switch":
    return switch_balance_loss(aux["load"], aux["mean_prob"], alpha)
  return sequence_balance_loss(aux["seq_load"], aux["seq_prob"], alpha)
