"""The one sequence layout of the alignment stage, and a resumable shuffled batcher.

    | prompt: last P bytes, left-padded with spaces | response bytes | [EOS] | PAD ... |
      0                                         P-1   P                          T-1

Rollouts (the RL learner prefills P prompt bytes and generates from column P),
SL-CAI fine-tuning and the reward model all see this layout, so a model never
meets a prompt placed differently from how it was trained. `mask` marks the
prompt and response (and the EOS when `eos`); the reward model reads its score
at the last masked-in position (reward.py). Responses longer than T - P bytes
are cut.

`ShuffledBatches` walks an infinite stream of items: item k is position k % N of
epoch k // N, whose order is a permutation drawn from (seed, epoch). Its state is
one counter, so get_state / set_state resume exactly (the loop checkpoints it).
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import numpy as np

from moe_jax.align.prompts import encode_prompts
from moe_jax.data.tokenizer import ByteTokenizer

PAD, EOS = ByteTokenizer.PAD, ByteTokenizer.EOS
IGNORE = -1           # a target the LM loss skips (losses.cross_entropy)


def encode_sequences(prompts: Sequence, responses: Sequence[str], prompt_len: int,
                     length: int, eos: bool = False) -> tuple[np.ndarray, np.ndarray]:
  """tokens (N, length) int32 in the layout above, and mask (N, length) bool."""
  if length <= prompt_len:
    raise ValueError(f"length={length} must exceed prompt_len={prompt_len} (room for "
                     "the response)")
  if len(prompts) != len(responses):
    raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
  tokens = np.full((len(prompts), length), PAD, np.int32)
  mask = np.zeros((len(prompts), length), bool)
  tokens[:, :prompt_len] = encode_prompts(prompts, prompt_len)
  mask[:, :prompt_len] = True
  for i, response in enumerate(responses):
    body = list(response.encode("utf-8")) + ([EOS] if eos else [])
    body = body[:length - prompt_len]
    tokens[i, prompt_len:prompt_len + len(body)] = body
    mask[i, prompt_len:prompt_len + len(body)] = True
  return tokens, mask


class ShuffledBatches:
  """An infinite iterator of batches of `make(indices) -> {name: (B, ...) array}`
  over N items, reshuffled every epoch; resumable (state: the next item)."""

  def __init__(self, n_items: int, batch: int, seed: int,
               make: Callable[[np.ndarray], dict[str, np.ndarray]]):
    if n_items < 1 or batch < 1:
      raise ValueError(f"need at least one item and batch >= 1 (got {n_items} items, "
                       f"batch={batch})")
    self.n_items, self.batch, self.seed, self._make = n_items, batch, seed, make
    self._next = 0
    self._order_epoch, self._order = None, None

  def _epoch_order(self, epoch: int) -> np.ndarray:
    if epoch != self._order_epoch:
      self._order_epoch = epoch
      self._order = np.random.default_rng([self.seed, epoch]).permutation(self.n_items)
    return self._order

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    ks = np.arange(self._next, self._next + self.batch)
    idx = np.array([self._epoch_order(k // self.n_items)[k % self.n_items] for k in ks])
    self._next += self.batch
    return self._make(idx)

  def get_state(self) -> dict[str, Any]:
    return {"next_item": self._next}

  def set_state(self, state: Mapping[str, Any]) -> None:
    self._next = int(state["next_item"])
