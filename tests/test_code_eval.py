"""Code-completion BLEU: pair extraction by hand, clipping, sacrebleu's ends, and the
engine's greedy completion == an uncached argmax loop (moe_jax/train/code_eval.py)."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax.config import get_config
from moe_jax.data import get_tokenizer
from moe_jax.models.transformer import Transformer
from moe_jax.train import code_eval

SOURCE = '''import os


def half(x):
    """Half of x."""
    y = x / 2
    return y


def nodoc(x):
    return x


def oneline(x):
    """Inline."""; return x


class Box:
    @property
    def size(self):
        """The size,
        in bytes."""
        return self._size

    def long(self):
        """Long body."""
        first = 1
        second_line_is_too_long_for_the_budget = 2
        return first
'''


def test_extract_pairs_by_hand():
  pairs = code_eval.extract_pairs(SOURCE, max_prompt_bytes=200, max_body_bytes=30,
                                  tag="t:")
  assert [p.name for p in pairs] == ["t:half@4", "t:Box.size@20", "t:Box.long@25"]
  half, size, long = pairs
  assert half.prompt == 'def half(x):\n    """Half of x."""\n'
  assert half.reference == "    y = x / 2\n    return y\n"            # 14 + 13 bytes
  # A method: no decorator, dedented to column 0 with its (multi-line) docstring.
  assert size.prompt == 'def size(self):\n    """The size,\n    in bytes."""\n'
  assert size.reference == "    return self._size\n"
  # Whole lines within 30 bytes: the second line (47 bytes) does not fit.
  assert long.reference == "    first = 1\n"
  # The prompt budget: the prompts of half, size and long are 34, 50 and 37 bytes.
  names = [p.name for p in code_eval.extract_pairs(SOURCE, 37, 30)]
  assert names == ["half@4", "Box.long@25"]
  assert [p.name for p in code_eval.extract_pairs(SOURCE, 36, 30)] == ["half@4"]
  assert code_eval.extract_pairs("def broken(:\n", 100, 100) == []


def test_clip_body_stops_at_dedent_budget_and_unfinished_line():
  text = "    a = 1\n\n    return a\ndef next_one():\n    pass\n"
  assert code_eval.clip_body(text, 100) == "    a = 1\n\n    return a\n"
  assert code_eval.clip_body(text, 12) == "    a = 1\n\n"
  assert code_eval.clip_body("    a = 1\n    retu", 100) == "    a = 1\n"
  assert code_eval.clip_body("x = 1\n", 100) == ""


def test_bleu_identical_is_100_and_disjoint_is_0():
  refs = ["    return split(p)[1]\n", "    y = x / 2\n    return y\n"]
  assert code_eval.bleu(refs, refs) == pytest.approx(100.0)
  assert code_eval.bleu(["alpha beta gamma delta", "epsilon zeta eta theta"],
                        refs) == pytest.approx(0.0, abs=1e-6)
  partial = code_eval.bleu(["    return split(p)[0]\n", "    y = x / 2\n    return x\n"],
                           refs)
  assert 0.0 < partial < 100.0
  with pytest.raises(ValueError, match="2 hypotheses for 1 references"):
    code_eval.bleu(refs, refs[:1])


@pytest.mark.slow
def test_completion_equals_uncached_greedy():
  """KV-cache greedy through the engine == one full forward per new token (tiny
  random model; init_std 0.5 so that its greedy tokens vary), with BOS in front and
  the text cut at EOS. Slow (~15 s, compiles); the engine's own equality with
  recomputation is in the default suite (test_serve.py)."""
  cfg = get_config("tiny", init_std=0.5, n_layers=2)             # 1 dense + 1 MoE
  variables = nn.meta.unbox(jax.jit(Transformer(cfg).init)(
      jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32)))
  tok = get_tokenizer("byte")
  prompts, n_new = ["def f(x):\n", "ab"], 8
  got = code_eval.complete(variables, cfg, prompts, tok, n_new, batch=2)
  apply = jax.jit(lambda t: Transformer(cfg).apply(variables, t)[0])
  for prompt, text in zip(prompts, got):
    ids = [tok.bos_id] + [int(t) for t in tok.encode(prompt)]
    buf = np.zeros((1, cfg.max_seq_len), np.int32)
    buf[0, :len(ids)] = ids
    for i in range(len(ids), len(ids) + n_new):
      buf[0, i] = int(jnp.argmax(apply(jnp.asarray(buf))[0, i - 1]))
    new = buf[0, len(ids):len(ids) + n_new]
    stop = np.flatnonzero(new == tok.eos_id)
    want = tok.decode(new[:stop[0]]) + "\n" if stop.size else tok.decode(new)
    assert text == want
  assert len(set("".join(got))) > 3                          # not a degenerate repeat
  with pytest.raises(ValueError, match="exceeds the context max_seq_len=32"):
    code_eval.complete(variables, cfg, ["x" * 25], tok, n_new)
