"""Rollouts for PPO / GRPO: prompts in, sampled responses and their log-probs out.

    prompts (B, P) ──decode (engine KV cache, sampled)──> tokens (B, P + N)
        │                                                   │ response = tokens[:, P:]
        │                        mask (B, N): 1 up to and including the stop token
        └── forward(policy | reference, tokens) ──> logp (B, N), entropy (B, N),
                                                    values (B, N) from the value head

The decoder is `serve.engine.decode`, the serving engine's jitted prefill + KV-cache
loop, called inside the train step. Logits at position t score token t+1, so response
token i (at position P+i) is scored by position P-1+i, and its value V_i (the state
before emitting it) reads the hidden state there too.

`PromptIterator` feeds the loop (`train(..., train_iter=)`): {"prompts": (B, P)} per
step, a fresh permutation each epoch, with get_state / set_state for exact resume.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from moe_jax.adapt import lora as lora_lib
from moe_jax.config import ModelConfig
from moe_jax.models.transformer import Transformer
from moe_jax.serve.engine import decode
from moe_jax.serve.sampling import SlotSampling
from moe_jax.train.objective import variables_of
from moe_jax.align import rl_math


class PromptIterator:
  """Batches of `batch` prompt rows of `prompts` (N, P) int32, reshuffled per epoch
  with `seed`; its position is two ints (epoch, row), so a checkpoint resumes it."""

  def __init__(self, prompts: np.ndarray, batch: int, seed: int = 0):
    self.prompts = np.asarray(prompts, np.int32)
    if self.prompts.ndim != 2 or len(self.prompts) < batch:
      raise ValueError(f"prompts {self.prompts.shape} must be (N, P) with N >= batch={batch}")
    self.batch, self.seed = batch, seed
    self._epoch, self._row = 0, 0

  def _order(self) -> np.ndarray:
    return np.random.default_rng([self.seed, self._epoch]).permutation(len(self.prompts))

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    if self._row + self.batch > len(self.prompts):
      self._epoch, self._row = self._epoch + 1, 0
    rows = self._order()[self._row:self._row + self.batch]
    self._row += self.batch
    return {"prompts": self.prompts[rows]}

  def get_state(self) -> dict[str, Any]:
    return {"epoch": self._epoch, "row": self._row}

  def set_state(self, state) -> None:
    self._epoch, self._row = int(state["epoch"]), int(state["row"])


def response_mask(response: jax.Array, stop_token: int) -> jax.Array:
  """(B, N) float: 1 up to and including the first `stop_token` (-1: no stop token,
  every token counts)."""
  if stop_token < 0:
    return jnp.ones(response.shape, jnp.float32)
  stops = jnp.cumsum((response == stop_token).astype(jnp.int32), axis=1)   # (B, N)
  before = jnp.concatenate([jnp.zeros_like(stops[:, :1]), stops[:, :-1]], axis=1)
  return (before == 0).astype(jnp.float32)


def sample_responses(variables, prompts: jax.Array, rng: jax.Array, *, mcfg: ModelConfig,
                     n_new: int, temperature: float, top_k: int = 0) -> jax.Array:
  """prompts (B, P) -> tokens (B, P + n_new), each row with its own key."""
  b = prompts.shape[0]
  sampling = SlotSampling(temperature=jnp.full((b,), temperature, jnp.float32),
                          top_k=jnp.full((b,), top_k, jnp.int32),
                          top_p=jnp.ones((b,), jnp.float32),
                          key=jax.random.key_data(jax.random.split(rng, b))
                          if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key)
                          else jax.random.split(rng, b))
  return decode(variables, prompts, cfg=mcfg, n_new=n_new, sampling=sampling)


def init_value_head(d_model: int) -> dict[str, jax.Array]:
  """A linear value head V = h @ w + b on the trunk's final-norm features, zero at
  the start (no noise in the first advantages from a random critic)."""
  return {"w": jnp.zeros((d_model,), jnp.float32), "b": jnp.zeros((), jnp.float32)}


def forward(variables, tokens: jax.Array, prompt_len: int, mcfg: ModelConfig,
            temperature: float = 1.0, value_head=None):
  """tokens (B, P + N) -> logp (B, N) of the response tokens, entropy (B, N) of the
  policy at each response position, values (B, N) (None without a value head).
  `temperature` divides the logits, as the sampler did, so logp is the probability
  the tokens were drawn with."""
  logits, aux = Transformer(mcfg).apply(variables, tokens,
                                        return_features=value_head is not None)
  logits = logits[:, prompt_len - 1:-1] / temperature                 # (B, N, V)
  response = tokens[:, prompt_len:]                                   # (B, N)
  logp_all = jax.nn.log_softmax(logits, axis=-1)
  logp = jnp.take_along_axis(logp_all, response[..., None], axis=-1)[..., 0]
  ent = rl_math.entropy(logits)                                       # (B, N)
  values = None
  if value_head is not None:
    # The final-norm output the logits are read from (the reward model's too).
    h = aux["features"][:, prompt_len - 1:-1].astype(jnp.float32)     # (B, N, D)
    values = h @ value_head["w"] + value_head["b"]                    # (B, N)
  return logp, ent, values


def policy_variables(params, extra, frozen, lcfg: lora_lib.LoraConfig | None):
  """The actor's flax variables: the trained LM, or LoRA adapters on frozen["base"]."""
  lm = (lora_lib.adapted(frozen["base"], params["adapters"], lcfg) if lcfg is not None
        else params["policy"])
  return variables_of(lm, extra)


def reference_variables(extra, frozen):
  """The frozen reference policy: frozen["reference"], or the LoRA base."""
  ref = frozen["reference"] if "reference" in frozen else frozen["base"]
  return variables_of(ref, extra)


def full_mask(prompt_len: int, mask: jax.Array) -> jax.Array:
  """(B, P + N) mask of the whole sequence (the prompt counts) from the response mask."""
  return jnp.concatenate([jnp.ones((mask.shape[0], prompt_len), mask.dtype), mask], axis=1)
