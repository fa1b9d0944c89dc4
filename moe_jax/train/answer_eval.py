"""Exact-match accuracy of short answers (the math domain's held-out problems).

Greedy decoding produces the reference answer exactly if and only if, fed the
reference itself (teacher forcing), the model's argmax at every answer position is
the reference token. So one batched forward pass scores all problems, with no decode
loop: for prompt "Q: 37+48=? A:" and answer "85" we feed [BOS] "Q: 37+48=? A: 85"
and require argmax = " ", "8", "5" at the answer positions and a whitespace byte
after them (greedy output "85" followed by a separator, as `score_answer` reads it).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from moe_jax.config import ModelConfig
from moe_jax.models.transformer import Transformer

WHITESPACE = tuple(b" \n\t\r")


def _encode(prompts, answers, tokenizer, seq_len):
  rows = np.full((len(prompts), seq_len), tokenizer.pad_id, np.int32)
  spans = []
  for i, (prompt, answer) in enumerate(zip(prompts, answers)):
    head = np.concatenate([[tokenizer.bos_id], tokenizer.encode(prompt)])
    tail = tokenizer.encode(" " + answer)
    ids = np.concatenate([head, tail])[:seq_len]
    if len(head) + len(tail) >= seq_len:
      raise ValueError(f"problem {prompt!r} + answer needs more than seq_len={seq_len}")
    rows[i, :len(ids)] = ids
    spans.append((len(head), len(head) + len(tail)))   # answer token positions
  return rows, spans


@functools.partial(jax.jit, static_argnames="mcfg")
def _argmax(variables, tokens, mcfg: ModelConfig):
  logits, _ = Transformer(mcfg).apply(variables, tokens)
  return jnp.argmax(logits, axis=-1)                              # (B, T)


def answer_accuracy(variables, mcfg: ModelConfig, problems: list[tuple[str, str]],
                    tokenizer, seq_len: int = 64, batch_size: int = 64) -> dict[str, float]:
  """Exact-match accuracy and per-token accuracy of the answers.

  variables: {"params": ..., ["router_bias": ...]}; problems: (prompt, answer) pairs.
  """
  exact, token_hits, token_total = 0, 0, 0
  for start in range(0, len(problems), batch_size):
    chunk = problems[start:start + batch_size]
    rows, spans = _encode([p for p, _ in chunk], [a for _, a in chunk], tokenizer, seq_len)
    n = len(chunk)
    if n < batch_size:                                 # one shape: one compilation
      rows = np.concatenate([rows, np.repeat(rows[-1:], batch_size - n, 0)])
    pred = np.asarray(_argmax(variables, jnp.asarray(rows), mcfg))
    for i, (lo, hi) in enumerate(spans):
      # prediction at position j is the token at j + 1
      hits = pred[i, lo - 1:hi - 1] == rows[i, lo:hi]
      token_hits += int(hits.sum())
      token_total += hi - lo
      exact += bool(hits.all()) and int(pred[i, hi - 1]) in WHITESPACE
  return {"exact_match": exact / len(problems), "answer_token_acc": token_hits / token_total}
