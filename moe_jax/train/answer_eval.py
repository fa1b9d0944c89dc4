"""Exact-match accuracy of short answers (the math domain's held-out problems).

Greedy decoding produces the reference answer exactly if and only if, fed the
reference itself (teacher forcing), the model's argmax at every answer position is
the reference token. So one batched forward pass scores all problems, with no decode
loop: for prompt "Q: 37+48=? A:" and answer "85" we feed [BOS] "Q: 37+48=? A: 85"
and require argmax = " ", "8", "5" at the answer positions and a whitespace byte
after them (greedy output "85" followed by a separator, as `score_answer` reads it).

The per-token metrics (`answer_token_acc`, `answer_nll`) read the answer's own tokens
only ("8", "5"): the separator " " after "A:" is the same in every problem, so a model
predicts it from the format alone, and counting it would pin a third of a 2-digit
answer's tokens near 100% and hide how well the model does arithmetic.
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
    sep = _separator_tokens(tail, tokenizer)
    # (separator start, answer start, answer end) token positions
    spans.append((len(head), len(head) + sep, len(head) + len(tail)))
  return rows, spans


def _separator_tokens(tail, tokenizer) -> int:
  """How many leading tokens of " " + answer are whitespace only (1 for bytes; 0
  where a subword tokenizer merges the space into the answer's first token)."""
  k = 0
  while k < len(tail) - 1 and not tokenizer.decode(list(tail[:k + 1])).strip():
    k += 1
  return k


@functools.partial(jax.jit, static_argnames="mcfg")
def _predict(variables, tokens, mcfg: ModelConfig):
  """Greedy next token and the NLL of the actual next token, at every position."""
  logits, _ = Transformer(mcfg).apply(variables, tokens)
  logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32))   # (B, T-1, V)
  nll = -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
  return jnp.argmax(logits, axis=-1), nll                         # (B, T), (B, T-1)


def score(pred, nll, rows, spans) -> tuple[int, int, int, float]:
  """(exact matches, answer tokens right, answer tokens, answer NLL sum) of a batch.

  pred[i, j] is the greedy token after position j, nll[i, j] the NLL of rows[i, j+1].
  """
  exact, hits, total, nll_sum = 0, 0, 0, 0.0
  for i, (sep, lo, hi) in enumerate(spans):
    right = pred[i, sep - 1:hi - 1] == rows[i, sep:hi]          # separator + answer
    exact += bool(right.all()) and int(pred[i, hi - 1]) in WHITESPACE
    hits += int(right[lo - sep:].sum())
    total += hi - lo
    nll_sum += float(nll[i, lo - 1:hi - 1].sum())
  return exact, hits, total, nll_sum


def answer_accuracy(variables, mcfg: ModelConfig, problems: list[tuple[str, str]],
                    tokenizer, seq_len: int = 64, batch_size: int = 64) -> dict[str, float]:
  """Exact match of the greedy answer, and accuracy and mean NLL (nats) of the
  answer's own tokens under teacher forcing.

  variables: {"params": ..., ["router_bias": ...]}; problems: (prompt, answer) pairs.
  """
  exact, token_hits, token_total, nll_sum = 0, 0, 0, 0.0
  for start in range(0, len(problems), batch_size):
    chunk = problems[start:start + batch_size]
    rows, spans = _encode([p for p, _ in chunk], [a for _, a in chunk], tokenizer, seq_len)
    n = len(chunk)
    if n < batch_size:                                 # one shape: one compilation
      rows = np.concatenate([rows, np.repeat(rows[-1:], batch_size - n, 0)])
    pred, nll = jax.device_get(_predict(variables, jnp.asarray(rows), mcfg))
    e, h, t, s = score(pred, nll, rows, spans)
    exact, token_hits, token_total, nll_sum = exact + e, token_hits + h, token_total + t, \
        nll_sum + s
  return {"exact_match": exact / len(problems), "answer_token_acc": token_hits / token_total,
          "answer_nll": nll_sum / token_total}
