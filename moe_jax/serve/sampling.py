"""Next-token sampling, one row per slot, each row with its own settings.

    logits (B, V) ─ /temperature ─ top-k mask ─ top-p (nucleus) mask ─ categorical
                       0 -> argmax (greedy)

Every row draws with the key fold_in(PRNGKey(seed), position): a request's tokens
depend only on its own seed and positions, never on which slot it sits in or which
other requests share the batch, so continuous batching reproduces one-at-a-time
decoding exactly (tests pin it).
"""
from __future__ import annotations

import dataclasses

import flax.struct
import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """One request's settings (OpenAI-style names where they exist)."""
  temperature: float = 0.0      # 0: greedy
  top_k: int = 0                # 0: off
  top_p: float = 1.0            # 1: off
  seed: int = 0

  def __post_init__(self):
    from moe_jax.config import require
    require(self, self.temperature >= 0, "temperature", "must be >= 0 (0 is greedy)")
    require(self, self.top_k >= 0, "top_k", "must be >= 0 (0 is off)")
    require(self, 0 < self.top_p <= 1, "top_p", "must be in (0, 1]")
    require(self, 0 <= self.seed < 2**31, "seed", "must be in [0, 2**31)")


@flax.struct.dataclass
class SlotSampling:
  """Per-slot settings as arrays (B,), so one compiled step serves any mix."""
  temperature: jax.Array        # (B,) float32
  top_k: jax.Array              # (B,) int32
  top_p: jax.Array              # (B,) float32
  key: jax.Array                # (B, 2) uint32 raw PRNG key per request

  @classmethod
  def stack(cls, configs: list[SamplingConfig]) -> "SlotSampling":
    return cls(temperature=jnp.array([s.temperature for s in configs], jnp.float32),
               top_k=jnp.array([s.top_k for s in configs], jnp.int32),
               top_p=jnp.array([s.top_p for s in configs], jnp.float32),
               key=jnp.stack([jax.random.PRNGKey(s.seed) for s in configs]))


def sample(logits: jax.Array, params: SlotSampling, positions: jax.Array) -> jax.Array:
  """logits (B, V) float32, positions (B,) of the token being drawn -> tokens (B,)."""
  v = logits.shape[-1]
  greedy = jnp.argmax(logits, axis=-1)                                # (B,)
  t = jnp.where(params.temperature > 0, params.temperature, 1.0)[:, None]
  scaled = logits / t                                                 # (B, V)
  sorted_logits = jnp.sort(scaled, axis=-1)[:, ::-1]                  # (B, V) descending
  # top-k: keep logits >= the k-th largest (k = 0 keeps all).
  k = jnp.where(params.top_k > 0, jnp.minimum(params.top_k, v), v)    # (B,)
  kth = jnp.take_along_axis(sorted_logits, (k - 1)[:, None], axis=-1)  # (B, 1)
  # top-p (Holtzman et al., 2020): the smallest prefix of the sorted distribution
  # whose mass reaches p; a token is kept if the mass before it is still < p.
  probs = jax.nn.softmax(sorted_logits, axis=-1)
  mass_before = jnp.cumsum(probs, axis=-1) - probs                    # (B, V)
  n_keep = jnp.maximum(jnp.sum(mass_before < params.top_p[:, None], axis=-1), 1)
  pth = jnp.take_along_axis(sorted_logits, (n_keep - 1)[:, None], axis=-1)
  threshold = jnp.maximum(kth, pth)                                   # (B, 1)
  masked = jnp.where(scaled >= threshold, scaled, -jnp.inf)           # (B, V)
  keys = jax.vmap(jax.random.fold_in)(
      jax.vmap(jax.random.wrap_key_data)(params.key), positions)     # (B,) keys
  drawn = jax.vmap(jax.random.categorical)(keys, masked)              # (B,)
  return jnp.where(params.temperature > 0, drawn, greedy).astype(jnp.int32)
