"""Distillation losses as pure functions: features, attention, logits, rules.

Each is zero when the student reproduces the teacher exactly (hand-computed values
in tests/test_distill.py). Shapes: L layers, B batch, T positions, D width, N heads,
V vocabulary. Student quantities carry an `s`, teacher quantities a `t`.

    feature    mean over mapped layers of mean((h_s[i] W - h_t[g(i)])^2)   TinyBERT eq. 8
    attention  mean over mapped layers, heads, queries of KL(A_t || A_s)   MiniLM eq. 5
    logit      tau^2 KL(softmax(z_t / tau) || softmax(z_s / tau))          Hinton et al. 2015
    rules      KL(p_rule || softmax(z_s)) on tokens a rule covers          (rules.py)
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def layer_map(student_layers: int, teacher_layers: int) -> tuple[int, ...]:
  """Uniform layer mapping (TinyBERT's g(m) = m * Lt / Ls): student layer i (0-based)
  learns from teacher layer (i + 1) * Lt // Ls - 1, the last layer of the i-th of Ls
  equal blocks of the teacher, so the student's last layer always maps to the
  teacher's last. E.g. Ls=2, Lt=4 -> (1, 3); Ls=3, Lt=4 -> (0, 1, 3)."""
  if not 1 <= student_layers <= teacher_layers:
    raise ValueError(f"student_layers={student_layers} must be in [1, teacher_layers="
                     f"{teacher_layers}] for a uniform layer mapping")
  return tuple((i + 1) * teacher_layers // student_layers - 1
               for i in range(student_layers))


def feature_loss(student_hidden: jax.Array, teacher_hidden: jax.Array,
                 mapping: tuple[int, ...], projection: jax.Array | None = None
                 ) -> jax.Array:
  """Hidden-state L2 (mean squared error) at mapped layers.

  student_hidden (Ls, B, T, Ds), teacher_hidden (Lt, B, T, Dt), mapping[i] the
  teacher layer of student layer i, projection (Ds, Dt) or None (identity, Ds == Dt).
  -> () mean over mapped layers, positions and teacher features.
  """
  h_s = student_hidden.astype(jnp.float32)                            # (Ls, B, T, Ds)
  if projection is not None:
    h_s = jnp.einsum("lbtd,de->lbte", h_s, projection.astype(jnp.float32))
  h_t = teacher_hidden[jnp.asarray(mapping)].astype(jnp.float32)      # (Ls, B, T, Dt)
  if h_s.shape != h_t.shape:
    raise ValueError(f"student features {h_s.shape} (after projection) do not match "
                     f"teacher features {h_t.shape}: give a (Ds, Dt) projection")
  return jnp.mean((h_s - h_t) ** 2)


def group_heads(probs: jax.Array, n_heads: int) -> jax.Array:
  """Average the attention distributions of consecutive groups of heads down to
  `n_heads` (a mean of distributions is a distribution): (..., N, T, S) ->
  (..., n_heads, T, S). Teacher head group j = heads [j*G, (j+1)*G), G = N/n_heads."""
  n = probs.shape[-3]
  if n % n_heads:
    raise ValueError(f"teacher heads ({n}) must be a multiple of student heads "
                     f"({n_heads}) to map head groups onto student heads")
  shape = probs.shape[:-3] + (n_heads, n // n_heads) + probs.shape[-2:]
  return jnp.mean(probs.reshape(shape), axis=-3)


def attention_kl(student_attention: jax.Array, teacher_attention: jax.Array,
                 mapping: tuple[int, ...], eps: float = 1e-9) -> jax.Array:
  """KL(teacher || student) between attention distributions at mapped layers.

  student_attention (Ls, B, Ns, T, T), teacher_attention (Lt, B, Nt, T, T), rows are
  distributions over keys (causally masked entries are 0). Teacher heads are
  averaged in groups onto the student's heads (`group_heads`; MiniLM's choice is
  Ns == Nt, which this reduces to). -> () mean over mapped layers, batch, heads
  and query positions of sum_s p_t log(p_t / p_s).
  """
  p_t = group_heads(teacher_attention[jnp.asarray(mapping)].astype(jnp.float32),
                    student_attention.shape[-3])                      # (Ls, B, Ns, T, S)
  p_s = student_attention.astype(jnp.float32)
  kl = jnp.sum(jnp.where(p_t > 0, p_t * (jnp.log(p_t + eps) - jnp.log(p_s + eps)), 0.0),
               axis=-1)                                               # (Ls, B, Ns, T)
  return jnp.mean(kl)


def soft_cross_entropy(target_probs: jax.Array, logits: jax.Array) -> jax.Array:
  """-sum_v p(v) log softmax(logits)_v per position: (..., V), (..., V) -> (...)."""
  return -jnp.sum(target_probs * jax.nn.log_softmax(logits.astype(jnp.float32)), -1)


def entropy(probs: jax.Array, eps: float = 1e-12) -> jax.Array:
  """-sum_v p(v) log p(v): (..., V) -> (...)."""
  return -jnp.sum(jnp.where(probs > 0, probs * jnp.log(probs + eps), 0.0), axis=-1)


def logit_kd(student_logits: jax.Array, teacher_logits: jax.Array,
             temperature: float = 2.0) -> jax.Array:
  """Hinton et al. (2015): tau^2 KL(softmax(z_t/tau) || softmax(z_s/tau)), mean over
  positions. The tau^2 keeps gradient magnitudes comparable across temperatures.
  logits (B, T, V) -> ()."""
  p_t = jax.nn.softmax(teacher_logits.astype(jnp.float32) / temperature, axis=-1)
  kl = soft_cross_entropy(p_t, student_logits / temperature) - entropy(p_t)  # (B, T)
  return temperature ** 2 * jnp.mean(kl)


def rule_loss(student_logits: jax.Array, rule_probs: jax.Array, mask: jax.Array
              ) -> jax.Array:
  """KL(p_rule || p_student) averaged over the positions a rule covers.

  student_logits (B, T, V), rule_probs (B, T, V) the class distribution of the
  decision-tree leaf each position falls in, mask (B, T) 1 where a rule applies.
  -> () (0 when no position is covered)."""
  kl = soft_cross_entropy(rule_probs, student_logits) - entropy(rule_probs)  # (B, T)
  mask = mask.astype(jnp.float32)
  return jnp.sum(kl * mask) / jnp.maximum(jnp.sum(mask), 1.0)
