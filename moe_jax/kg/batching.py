"""Cloze facts -> fused batches, and the resumable iterator the training loop reads.

    fact "class JSONDecoder inherits from object."
    row      [BOS] c l a s s ... o b j e c t . [PAD ...]          (T + 1,) bytes
    inputs = row[:-1]   targets = row[1:]   mask = targets != PAD
    answer_mask         the targets of the answer bytes "object."
    kg arrays           subgraph of the entities linked in the PROMPT only, the
                        mention marked on its last byte (moe_jax.kg.linking)

Every fact is encoded once (`encode_facts`); a training batch is a gather of rows:

    FactBatches(rows, batch_size, seed)       epoch e = permutation(rng(seed, e))
      next()       -> the next batch_size rows of the epoch (remainder dropped)
      get_state()  -> {"seed", "epoch", "batch"}   (JSON: stored in checkpoints)
      set_state(s) -> continue exactly there        (the loop's resume)

The same seed gives every variant of an experiment the same rows in the same order
(equal tokens); only the kg arrays differ (graph or shuffled graph).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from moe_jax.data.tokenizer import ByteTokenizer
from moe_jax.kg.cloze import Fact
from moe_jax.kg.linking import EntityLinker, SubgraphSampler, kg_example, stack

BYTE = ByteTokenizer()


def encode_facts(facts: Sequence[Fact], seq_len: int, linker: EntityLinker | None = None,
                 sampler: SubgraphSampler | None = None) -> dict[str, np.ndarray]:
  """(n, ...) arrays of the facts' rows: inputs, targets, mask, answer_mask (n, T),
  plus the kg arrays when a linker and sampler are given."""
  T = seq_len
  rows = np.full((len(facts), T + 1), BYTE.pad_id, np.int32)
  answer = np.zeros((len(facts), T), bool)
  for i, f in enumerate(facts):
    ids = BYTE.encode(f.sentence)
    if len(ids) > T:
      raise ValueError(f"fact {f.sentence!r} is {len(ids)} bytes; data.seq_len={T} "
                       f"holds at most {T} (the BOS token comes first)")
    rows[i, 0], rows[i, 1:1 + len(ids)] = BYTE.bos_id, ids
    start = len(f.prompt.encode())         # target t predicts sentence byte t
    answer[i, start:len(ids)] = True
  out = {"inputs": rows[:, :-1], "targets": rows[:, 1:], "mask": rows[:, 1:] != BYTE.pad_id,
         "answer_mask": answer}
  if linker is not None:
    out.update(stack([kg_example(f.sentence, linker, sampler, T, len(f.prompt), offset=1)
                      for f in facts]))
  return out


def take(rows: dict[str, np.ndarray], index: np.ndarray) -> dict[str, np.ndarray]:
  return {k: v[index] for k, v in rows.items()}


def eval_batches(rows: dict[str, np.ndarray], batch_size: int) -> list[dict[str, np.ndarray]]:
  """Fixed-size batches of all rows in order; the last is filled with copies of row 0
  whose masks are cleared (they count nothing), so one compiled eval step serves all."""
  n = len(rows["inputs"])
  out = []
  for start in range(0, n, batch_size):
    index = np.arange(start, start + batch_size)
    real = index < n
    batch = take(rows, np.where(real, index, 0))
    for k in ("mask", "answer_mask"):
      batch[k] = batch[k] & real[:, None]
    out.append(batch)
  return out


class FactBatches:
  """Shuffled epochs of rows, batch by batch, resumable exactly (module docstring)."""

  def __init__(self, rows: dict[str, np.ndarray], batch_size: int, seed: int):
    self.rows, self.batch_size, self.seed = rows, batch_size, seed
    self.n = len(rows["inputs"])
    if not 0 < batch_size <= self.n:
      raise ValueError(f"batch_size={batch_size}: must be in 1..{self.n} (the number of "
                       f"training rows)")
    self.batches_per_epoch = self.n // batch_size
    self.epoch, self.batch = 0, 0
    self._order = None

  def order(self, epoch: int) -> np.ndarray:
    """The row order of `epoch` (a function of seed and epoch alone)."""
    return np.random.default_rng([self.seed, epoch]).permutation(self.n)

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    if self._order is None or self._order[0] != self.epoch:
      self._order = (self.epoch, self.order(self.epoch))
    b = self.batch_size
    index = self._order[1][self.batch * b:(self.batch + 1) * b]
    self.batch += 1
    if self.batch == self.batches_per_epoch:
      self.epoch, self.batch = self.epoch + 1, 0
    return take(self.rows, index)

  def get_state(self) -> dict[str, int]:
    return {"seed": self.seed, "epoch": self.epoch, "batch": self.batch}

  def set_state(self, state: dict) -> None:
    if set(state) != {"seed", "epoch", "batch"}:
      raise ValueError(f"FactBatches state {state!r}: expected keys seed, epoch, batch")
    if int(state["seed"]) != self.seed:
      raise ValueError(f"FactBatches state is of seed {state['seed']}, this iterator's "
                       f"is {self.seed}")
    if not 0 <= int(state["batch"]) < self.batches_per_epoch or int(state["epoch"]) < 0:
      raise ValueError(f"FactBatches state {state!r}: batch must be in "
                       f"0..{self.batches_per_epoch - 1} and epoch >= 0")
    self.epoch, self.batch = int(state["epoch"]), int(state["batch"])
