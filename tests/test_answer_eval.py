"""Teacher-forced answer scoring (moe_jax.train.answer_eval): the separator is not an
answer token, counts by hand, and the batched padded forward equals a single-sequence
greedy reference."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax.config import get_config
from moe_jax.data.tokenizer import ByteTokenizer
from moe_jax.models.transformer import Transformer
from moe_jax.train import answer_eval

TOK = ByteTokenizer()


def test_spans_leave_the_separator_out_of_the_answer():
  rows, spans = answer_eval._encode(["Q: 1+2=? A:"], ["-13"], TOK, seq_len=24)
  sep, lo, hi = spans[0]
  assert (sep, lo, hi) == (12, 13, 16)          # BOS + 11 prompt bytes, " ", "-13"
  assert bytes(rows[0, sep:lo].tolist()) == b" "
  assert bytes(rows[0, lo:hi].tolist()) == b"-13"
  assert (rows[0, hi:] == TOK.pad_id).all()


def test_score_by_hand():
  rows, spans = answer_eval._encode(["Q: 9=? A:", "Q: 9=? A:"], ["85", "85"], TOK, seq_len=16)
  sep, lo, hi = spans[0]                             # 10, 11, 13
  pred = np.zeros_like(rows)
  pred[:, :-1] = rows[:, 1:]                         # the reference everywhere ...
  pred[:, hi - 1] = ord("\n")                        # ... then a newline: exact
  pred[1, sep - 1] = ord("8")                        # row 1 misses the separator only
  nll = np.zeros((2, 15))
  nll[:, lo - 1:hi - 1] = [[0.5, 1.5], [0.25, 0.25]]
  nll[:, sep - 1] = 9.0                              # the separator's NLL is not counted
  exact, hits, total, nll_sum = answer_eval.score(pred, nll, rows, spans)
  # Row 1 would not generate " 85" greedily, but its answer tokens are both right.
  assert (exact, hits, total, nll_sum) == (1, 4, 4, 2.5)
  pred[0, hi - 1] = ord("0")                         # "850": not an exact match
  pred[1, lo] = ord("4")                             # "84": one answer token wrong
  assert answer_eval.score(pred, nll, rows, spans)[:3] == (0, 3, 4)


def test_batched_scoring_equals_single_sequence_reference():
  cfg = get_config("tiny", vocab_size=TOK.vocab_size, max_seq_len=32)
  variables = nn.meta.unbox(jax.jit(Transformer(cfg).init)(jax.random.PRNGKey(3),
                                                           jnp.zeros((1, 8), jnp.int32)))
  forward = jax.jit(lambda tokens: Transformer(cfg).apply(variables, tokens)[0])
  # Equal lengths, so the reference compiles once; answers of 2 and 3 tokens.
  problems = [("Q: 12+7=? A:", "19"), ("Q: 1+77=? A:", "-5"), ("Q: 7x=9. A:", "x=2"),
              ("Q: 1+9=? A:", "123")]
  got = answer_eval.answer_accuracy(variables, cfg, problems, TOK, seq_len=32, batch_size=2)
  hits, nlls, exact = [], [], 0
  for prompt, answer in problems:
    ids = [TOK.bos_id] + list(TOK.encode(prompt))
    tail = list(TOK.encode(" " + answer))
    # One unpadded, unbatched forward: position j's logits predict token j + 1.
    logits = forward(jnp.asarray([ids + tail]))
    logits = np.asarray(logits[0, len(ids) - 1:], np.float64)     # (len(tail) + 1, V)
    guess = logits.argmax(-1)
    exact += bool((guess[:-1] == tail).all()) and int(guess[-1]) in answer_eval.WHITESPACE
    for j in range(1, len(tail)):                    # answer tokens, not the separator
      hits.append(guess[j] == tail[j])
      top = logits[j].max()
      nlls.append(np.log(np.exp(logits[j] - top).sum()) + top - logits[j, tail[j]])
  assert got["exact_match"] == exact / 4
  assert got["answer_token_acc"] == pytest.approx(np.mean(hits))
  assert got["answer_nll"] == pytest.approx(np.mean(nlls), rel=1e-4)
