"""The math of PPO and GRPO on response tokens: pure functions, shapes in (B, N).

    per-token reward   r_t = -kl_coef * KL_t  +  [t = last] * R          (Ziegler et al., 2019)
    GAE                δ_t = r_t + γ V_{t+1} - V_t,   A_t = Σ_k (γλ)^k δ_{t+k}   (Schulman et al., 2016)
    policy loss        -min(ρ A, clip(ρ, 1-ε, 1+ε) A),  ρ = exp(logp - logp_old)  (PPO, 2017)
    value loss         ½ max((V - G)², (V_old + clip(V - V_old, ±ε_v) - G)²)
    KL estimators      k1 = log q/p,  k2 = ½ (log q/p)²,  k3 = p/q - 1 - log p/q   (Schulman, 2020,
                       "Approximating KL divergence"; samples from q = the policy)
    GRPO               A_i = (R_i - mean_G R) / (std_G R + eps) within a group of G samples
                       of one prompt (Shao et al., 2024, DeepSeekMath)

`mask` (B, N) is 1 on response tokens that count (before and including the end of a
response) and 0 after it; every mean is over masked tokens only.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

KL_ESTIMATORS = ("k1", "k2", "k3")


def masked_mean(x: jax.Array, mask: jax.Array, axis=None) -> jax.Array:
  return jnp.sum(x * mask, axis=axis) / jnp.maximum(jnp.sum(mask, axis=axis), 1.0)


def whiten(x: jax.Array, mask: jax.Array, shift_mean: bool = True, eps: float = 1e-8
           ) -> jax.Array:
  """(x - mean) / std over the masked entries (PPO's advantage normalisation);
  `shift_mean=False` keeps the mean (only rescales)."""
  mean = masked_mean(x, mask)
  var = masked_mean(jnp.square(x - mean), mask)
  out = (x - mean) * jax.lax.rsqrt(var + eps)
  return (out if shift_mean else out + mean) * mask


def kl_estimate(logp: jax.Array, logp_ref: jax.Array, kind: str = "k1") -> jax.Array:
  """Per-token estimate of KL(q || p) from tokens sampled from q (the policy).
  logp = log q(x), logp_ref = log p(x), both (B, N). k1 is unbiased but can be
  negative; k2 is biased, low-variance; k3 is unbiased and >= 0."""
  log_ratio = logp - logp_ref                                         # log q/p
  if kind == "k1":
    return log_ratio
  if kind == "k2":
    return 0.5 * jnp.square(log_ratio)
  if kind == "k3":
    return jnp.expm1(-log_ratio) + log_ratio                          # p/q - 1 - log p/q
  raise ValueError(f"kl estimator {kind!r} must be one of {KL_ESTIMATORS}")


def token_rewards(score: jax.Array, kl: jax.Array, mask: jax.Array, kl_coef: float
                  ) -> jax.Array:
  """score (B,) at each response's last counted token, minus kl_coef * KL (B, N)
  on every token (InstructGPT's per-token KL penalty) -> (B, N)."""
  last = jnp.maximum(jnp.sum(mask, axis=1).astype(jnp.int32) - 1, 0)   # (B,)
  at_end = jax.nn.one_hot(last, mask.shape[1], dtype=kl.dtype)        # (B, N)
  return (score[:, None] * at_end - kl_coef * kl) * mask


def gae(rewards: jax.Array, values: jax.Array, mask: jax.Array, gamma: float,
        lam: float) -> tuple[jax.Array, jax.Array]:
  """Generalised advantage estimation over response tokens.

  rewards, values, mask (B, N) -> advantages (B, N), returns = advantages + values.
  The value after the last counted token is 0 (the episode ends there)."""
  mask = mask.astype(values.dtype)
  values = values * mask
  next_values = jnp.concatenate([values[:, 1:], jnp.zeros_like(values[:, :1])], axis=1)
  deltas = rewards + gamma * next_values * jnp.concatenate(
      [mask[:, 1:], jnp.zeros_like(mask[:, :1])], axis=1) - values    # (B, N)

  def back(carry, x):                                                 # right to left
    delta, m = x
    adv = (delta + gamma * lam * carry) * m
    return adv, adv
  _, adv = jax.lax.scan(back, jnp.zeros(values.shape[0], values.dtype),
                        (deltas.T, mask.T), reverse=True)             # (N, B)
  adv = adv.T                                                         # (B, N)
  return adv, (adv + values) * mask


def policy_loss(logp: jax.Array, logp_old: jax.Array, advantages: jax.Array,
                mask: jax.Array, clip: float) -> tuple[jax.Array, jax.Array]:
  """PPO's clipped surrogate (to minimise) and the fraction of clipped tokens.
  All (B, N). Where the ratio has left [1-ε, 1+ε] in the direction the advantage
  favours, the min picks the constant clipped term and the gradient is 0."""
  ratio = jnp.exp(logp - logp_old)                                    # (B, N)
  unclipped = ratio * advantages
  clipped = jnp.clip(ratio, 1.0 - clip, 1.0 + clip) * advantages
  loss = masked_mean(-jnp.minimum(unclipped, clipped), mask)
  clip_frac = masked_mean((clipped < unclipped).astype(jnp.float32), mask)
  return loss, clip_frac


def value_loss(values: jax.Array, values_old: jax.Array, returns: jax.Array,
               mask: jax.Array, clip: float) -> jax.Array:
  """½ max of the unclipped and clipped squared errors (PPO2's value clipping), (B, N)."""
  clipped = values_old + jnp.clip(values - values_old, -clip, clip)
  err = jnp.maximum(jnp.square(values - returns), jnp.square(clipped - returns))
  return 0.5 * masked_mean(err, mask)


def group_advantages(rewards: jax.Array, group: int, eps: float = 1e-6) -> jax.Array:
  """GRPO: rewards (B,) or (B, P) principles, rows in groups of `group` consecutive
  samples of one prompt -> (B,) advantages. With (B, P), each principle is
  normalised within the group first, then the normalised rewards are summed, so a
  principle with a small spread is not drowned by one with a large one."""
  b = rewards.shape[0]
  if b % group:
    raise ValueError(f"batch {b} is not a multiple of the group size {group}")
  r = rewards.reshape(b // group, group, -1)                          # (B/G, G, P)
  norm = (r - r.mean(axis=1, keepdims=True)) / (r.std(axis=1, keepdims=True) + eps)
  return norm.sum(axis=-1).reshape(b)                                 # (B,)


def entropy(logits: jax.Array) -> jax.Array:
  """Entropy of each softmax row: logits (..., V) -> (...)."""
  logp = jax.nn.log_softmax(logits, axis=-1)
  return -jnp.sum(jnp.exp(logp) * logp, axis=-1)
