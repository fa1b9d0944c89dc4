"""Greedy generation and side-by-side generation throughput (student vs teacher).

`greedy_decode` is one jitted program: a fixed (B, P + N) token buffer and a
`fori_loop` that runs the full forward on the buffer and writes the argmax at the
next position. There is no KV cache, so each new token costs one full forward over
the buffer. `generation_throughput(..., cache=True)` times the serving engine's
`greedy_decode` instead (moe_jax/serve/engine.py: one prefill, then one-token steps
through a KV cache, also one compiled program): the speed a deployed model has.
"""
from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp

from moe_jax.config import ModelConfig
from moe_jax.models.transformer import Transformer


@functools.partial(jax.jit, static_argnames=("cfg", "n_new"))
def greedy_decode(variables, prompt: jax.Array, *, cfg: ModelConfig, n_new: int
                  ) -> jax.Array:
  """prompt (B, P) int -> (B, P + n_new): the prompt and n_new greedy tokens."""
  b, p = prompt.shape
  tokens = jnp.concatenate([prompt, jnp.zeros((b, n_new), prompt.dtype)], axis=1)

  def step(i, tokens):
    logits, _ = Transformer(cfg).apply(variables, tokens)            # (B, P+N, V)
    next_token = jnp.argmax(logits[:, p + i - 1], axis=-1)            # (B,)
    return tokens.at[:, p + i].set(next_token.astype(tokens.dtype))

  return jax.lax.fori_loop(0, n_new, step, tokens)


def generation_throughput(models: dict[str, tuple[dict, ModelConfig]],
                          prompt: jax.Array, n_new: int, *, rounds: int = 5,
                          cache: bool = False) -> dict[str, float]:
  """Generated tokens per second of each model {name: (variables, cfg)}, compiled
  first, then timed in interleaved rounds so that background load hits every model
  alike; the best round counts. cache: decode through a KV cache (the serving
  engine's greedy_decode; same tokens) instead of a full forward per token."""
  if cache:
    from moe_jax.serve.engine import greedy_decode as decode
  else:
    decode = greedy_decode
  for variables, cfg in models.values():
    decode(variables, prompt, cfg=cfg, n_new=n_new).block_until_ready()
  best = {name: float("inf") for name in models}
  for _ in range(rounds):
    for name, (variables, cfg) in models.items():
      t0 = time.perf_counter()
      decode(variables, prompt, cfg=cfg, n_new=n_new).block_until_ready()
      best[name] = min(best[name], time.perf_counter() - t0)
  return {name: prompt.shape[0] * n_new / seconds for name, seconds in best.items()}
