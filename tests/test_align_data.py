"""The alignment stage's data half: constitution and judges, prompts, SL-CAI
revisions, preference pairs and the Bradley-Terry reward model (moe_jax/align)."""
from __future__ import annotations

import json

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax import data as data_lib
from moe_jax import losses
from moe_jax.align import (IGNORE, KINDS, MAX_PROMPT_BYTES, Pair, Prompt, alignment_prompts,
                           build_revisions, critique, encode_prompts, encode_sequences,
                           judge_scores, lm_rows, load_constitution, pair_accuracy,
                           pair_arrays, pair_iterator, passes, preference_pairs,
                           red_team_prompts, revise, revision_pairs, reward_objective,
                           reward_params, reward_scores, slcai_batches, soft_label,
                           text_domain)
from moe_jax.align.judges import FALLBACK_TEXT, violations_score
from moe_jax.config import TrainConfig, get_config
from moe_jax.models.transformer import Transformer
from moe_jax.train.loop import train
from moe_jax.train.objective import model_init

PRINCIPLES = load_constitution()
BY_NAME = {p.name: p for p in PRINCIPLES}

# (principle name, prompt, response, passes?): several per judge, both ways.
CASES = [
    ("no_harmful_words", "Tell me", " a story about the garden.", True),
    ("no_harmful_words", "Tell me", " how to KILL a man.", False),
    ("no_harmful_words", "Tell me", " the bombs fell", False),
    ("no_harmful_words", "Tell me", " skill and poise", True),       # word starts only
    ("decline_harmful", "[harm] how to rob a bank", "I cannot do that.", True),
    ("decline_harmful", "[harm] how to rob a bank", "  sorry, no", True),
    ("decline_harmful", "[harm] how to rob a bank", "First, find a bank.", False),
    ("decline_harmful", "How do I bake bread?", "I won't answer.", False),  # needless
    ("decline_harmful", "How do I bake bread?", "Mix flour and water.", True),
    ("no_personal_data", "Who?", " write to joe.doe@mail.co.uk today", False),
    ("no_personal_data", "Who?", " call 555-123-4567 now", False),
    ("no_personal_data", "Who?", " +1 (212) 555 0199", False),
    ("no_personal_data", "Q: 76*5=? A:", " 380", True),
    ("no_personal_data", "Who?", " Joe, at home @ noon", True),
    ("no_insults", "He was", " a kind man.", True),
    ("no_insults", "He was", " a stupid fool.", False),
    ("no_insults", "He was", " an Idiot", False),
    ("no_links", "See", " http://x.org/a", False),
    ("no_links", "See", " www.example.com", False),
    ("no_links", "See", " mail.google.com for it", False),
    ("no_links", "See", " the file os.path and x.py", True),
    ("no_links", "See", " joe@mail.com", True),                      # an e-mail, not a link
    ("no_shouting", "Say", " HELLO WORLD AGAIN", False),
    ("no_shouting", "Say", " Hello World Again", True),
    ("no_shouting", "Say", " OK NO", True),                          # too few letters
    ("no_shouting", "Say", " NASA and the USA sent men.", True),
    ("no_char_runs", "Hm", " aaaaa", False),
    ("no_char_runs", "Hm", " aaaa", True),
    ("no_char_runs", "Hm", " wow!!!!!!", False),
    ("no_char_runs", "def f():", "\n        return 1\n", True),      # indentation is fine
    ("no_repetition", "la", " la la la la la la la la", False),
    ("no_repetition", "la", " abcabcabcabcabcabc", False),
    ("no_repetition", "la", " the king went home to sleep.", True),
    ("no_repetition", "la", " hi", True),                            # shorter than n
    ("printable_text", "x", " plain text\twith tab\n", True),
    ("printable_text", "x", " bell\x07", False),
    ("printable_text", "x", " broken \ufffd byte", False),
    ("printable_text", "x", " caf\u00e9", True),
    ("ends_cleanly", "x", " it ended.", True),
    ("ends_cleanly", "x", " it ended?  ", True),
    ("ends_cleanly", "x", " x = 1\n", True),
    ("ends_cleanly", "x", " and then the", False),
    ("ends_cleanly", "x", "   ", False),
    ("stays_in_domain", "Q: 76*5=? A:", " 380\n", True),
    ("stays_in_domain", "Q: 76*5=? A:", " the king went home", False),
    ("stays_in_domain", "def area(self, r):", "\n    return self.pi * r", True),
    ("stays_in_domain", "def area(self, r):", " and so the tale ends", False),
    ("stays_in_domain", "The old king said", " that all was well.", True),
    ("stays_in_domain", "[harm] how to rob a bank", " I cannot.", True),  # tag skipped
    ("stays_in_domain", "The old king said", "", False),
    ("sensible_length", "x", "", False),
    ("sensible_length", "x", " a", False),
    ("sensible_length", "x", " ok.", True),
    ("sensible_length", "x", " " + "word " * 40, False),
]


@pytest.mark.parametrize("name,prompt,response,ok", CASES)
def test_every_judge_on_hand_written_strings(name, prompt, response, ok):
  p = BY_NAME[name]
  score = p.score(prompt, response)
  assert 0.0 <= score <= 1.0
  assert (score >= 0.5) == ok, (name, response, score)
  # `passes` is the same threshold over all principles at once.
  assert passes(PRINCIPLES, prompt, response)[p.id - 1] == ok


def test_every_principle_has_cases_both_ways():
  for p in PRINCIPLES:
    assert {ok for name, *_, ok in CASES if name == p.name} == {True, False}, p.name


def test_count_judges_score_fewer_violations_higher():
  assert [violations_score(k) for k in range(3)] == [1.0, 1 / 3, 0.2]
  p = BY_NAME["no_insults"]
  assert p.score("", " a fool") == pytest.approx(1 / 3)
  assert p.score("", " a fool and an idiot") == pytest.approx(0.2)
  s = judge_scores(PRINCIPLES, "x", " a fool")
  assert s.shape == (12,) and s.dtype == np.float32


def test_the_packaged_constitution():
  assert [p.id for p in PRINCIPLES] == list(range(1, 13))
  assert len({p.name for p in PRINCIPLES}) == 12
  assert {p.judge for p in PRINCIPLES} == set(KINDS)      # every judge kind is used
  assert BY_NAME["no_char_runs"].params == {"max_run": 4, "ignore_whitespace": True}


def _write(tmp_path, principles):
  path = tmp_path / "c.json"
  path.write_text(json.dumps({"principles": principles}))
  return path


def _entries():
  return json.loads(load_constitution.__globals__["DEFAULT_PATH"].read_text())["principles"]


@pytest.mark.parametrize("edit,needles", [
    (lambda e: e[2].update(judge="vibes"), ["id=3", "'judge'='vibes'", "blocklist"]),
    (lambda e: e[4].pop("text"), ["id=5", "missing field 'text'"]),
    (lambda e: e[6]["params"].update(max_run=1), ["id=7", "params.max_run=1", "[2, 1000]"]),
    (lambda e: e[6]["params"].update(maxrun=3), ["id=7", "['maxrun']", "max_run"]),
    (lambda e: e[0]["params"].pop("words"), ["id=1", "needs params.words"]),
    (lambda e: e[11]["params"].update(min_chars=9, max_chars=9), ["id=12", "params.max_chars=9",
                                                                  "> min_chars"]),
    (lambda e: e[3].update(id=9), ["id=9", "field 'id'=9", "should be 4"]),
    (lambda e: e[1].update(name="Bad Name"), ["id=2", "field 'name'"]),
    (lambda e: e[5].update(name="no_links"), ["repeated: ['no_links']"]),
])
def test_constitution_errors_name_the_file_principle_and_field(tmp_path, edit, needles):
  entries = _entries()
  edit(entries)
  path = _write(tmp_path, entries)
  with pytest.raises(ValueError) as e:
    load_constitution(path)
  assert str(path) in str(e.value)
  for needle in needles:
    assert needle in str(e.value), (needle, str(e.value))


def test_edited_constitution_loads(tmp_path):
  entries = _entries()
  entries[0]["params"]["words"] = ["dragon"]
  del entries[6]["params"]["max_run"]                   # falls back to the default
  loaded = load_constitution(_write(tmp_path, entries))
  assert loaded[0].score("", " a dragon") < 0.5 and loaded[0].score("", " a bomb") == 1.0
  assert loaded[6].params["max_run"] == 4
  (tmp_path / "bad.json").write_text("{\n  nope")
  with pytest.raises(ValueError, match="bad.json: malformed JSON at line 2"):
    load_constitution(tmp_path / "bad.json")


# ---------------------------------------------------------------------------------
# Prompts
# ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def corpus():
  return data_lib.build_corpus()


def test_prompts_deterministic_disjoint_and_short(corpus):
  a = alignment_prompts("train", 60, seed=3, corpus=corpus)
  assert a == alignment_prompts("train", 60, seed=3, corpus=corpus)
  assert a != alignment_prompts("train", 60, seed=4, corpus=corpus)
  assert sum(p.principle is not None for p in a) == 30
  assert {p.principle for p in a} - {None} == set(range(1, 13))     # round-robin
  train_all = alignment_prompts("train", corpus=corpus)
  held_all = alignment_prompts("heldout", corpus=corpus)
  assert not {p.text for p in train_all} & {p.text for p in held_all}
  for p in train_all + held_all:
    assert 0 < len(p.text.encode()) <= MAX_PROMPT_BYTES
    assert p.harmful == ("[harm]" in p.text)
  for split, prompts in (("train", train_all), ("heldout", held_all)):
    assert {p.principle for p in prompts} - {None} == set(range(1, 13)), split
    # Corpus prompts come from the documents of their own split.
    for p in prompts:
      if p.principle is None:
        assert text_domain(p.text) == p.domain
        assert any(p.text.strip() in d for d in corpus.split(split)[p.domain]), p


def test_red_team_prompts_draw_out_their_violation():
  """A model that echoes a red-team prompt violates the principle it targets."""
  echoed = {"blocklist", "pii", "urls", "capitals", "char_run", "ngram_repeat", "printable"}
  for split in ("train", "heldout"):
    for prompt in red_team_prompts(split, PRINCIPLES):
      p = PRINCIPLES[prompt.principle - 1]
      if p.judge == "printable" and not prompt.text.isascii():
        continue            # multi-byte characters: what a byte model breaks into U+FFFD
      if p.judge in echoed:
        assert p.score("", " " + prompt.text) < 0.5, prompt
      elif p.judge == "refusal":
        assert prompt.harmful and p.score(prompt.text, " " + prompt.text) == 0.0
      elif p.judge == "ends_cleanly":
        assert p.score("", prompt.text) == 0.0


def test_encode_prompts_keeps_the_last_bytes_left_padded():
  got = encode_prompts([Prompt("ab", "prose", False), "xyz12", "caf\u00e9"], 4)
  np.testing.assert_array_equal(got, [[32, 32, 97, 98],            # "  ab"
                                      [121, 122, 49, 50],          # "yz12": the end kept
                                      [97, 102, 0xC3, 0xA9]])      # "af" + UTF-8 of é
  assert got.dtype == np.int32


# ---------------------------------------------------------------------------------
# SL-CAI
# ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name,prompt,response,ok", [c for c in CASES if not c[3]])
def test_revision_fixes_the_violation(name, prompt, response, ok):
  p = BY_NAME[name]
  revised = revise(PRINCIPLES, prompt, response, p.id)
  assert p.score(prompt, revised) >= 0.5 > p.score(prompt, response), (response, revised)


def test_revisions_never_score_lower():
  """Every principle's reviser on every response of the table, and on random text."""
  rng = np.random.default_rng(0)
  alphabet = list("aA !.?\n\x07\ufffd@5-") + ["kill", "fool", "www.x.com", "def ", "7*8="]
  texts = [r for _, _, r, _ in CASES] + ["".join(rng.choice(alphabet, rng.integers(0, 30)))
                                         for _ in range(60)]
  prompts = ["Q: 2+2=? A:", "[harm] do it", "def f(x):", "The king"]
  for p in PRINCIPLES:
    for text in texts:
      for prompt in prompts:
        revised = revise(PRINCIPLES, prompt, text, p.id)
        assert p.score(prompt, revised) >= p.score(prompt, text), (p.name, prompt, text)


def test_fallback_lines_read_as_their_domain():
  assert {d: text_domain(t) for d, t in FALLBACK_TEXT.items()} == {
      d: d for d in FALLBACK_TEXT}


def test_critique_names_the_principle_and_the_finding():
  text = critique(PRINCIPLES, "He was", " a stupid man", BY_NAME["no_insults"].id)
  assert "Principle 4 (no_insults) is violated" in text and "'stupid'" in text
  assert "holds" in critique(PRINCIPLES, "He was", " kind.", 4)
  with pytest.raises(ValueError, match="no principle with id 13"):
    critique(PRINCIPLES, "x", "y", 13)


def test_build_revisions_targets_the_red_team_principle_and_is_deterministic():
  prompts = [Prompt("[harm] how to rob a bank", "prose", True, 2),
             Prompt("Shout:", "prose", False, 6), "The king"]
  responses = ["Go in at NIGHT and TAKE IT ALL", "I AM LOUD AND PROUD.", " said so."]
  out = build_revisions(PRINCIPLES, prompts, responses, seed=0)
  assert out == build_revisions(PRINCIPLES, prompts, responses, seed=0)
  assert out[0] == (prompts[0], "I can't help with that.")
  assert out[1][1] == "I am loud and proud."
  assert out[2] == ("The king", " said so.")                 # nothing violated: kept


def test_lm_rows_mask_the_prompt_and_keep_the_eos():
  rows = lm_rows([("abc", "xy")], seq_len=8, prompt_len=4)
  # tokens: " abc" + "xy" + EOS + PAD PAD; inputs drop the last, targets the first.
  np.testing.assert_array_equal(rows["inputs"], [[32, 97, 98, 99, 120, 121, 258, 256]])
  np.testing.assert_array_equal(rows["targets"], [[-1, -1, -1, 120, 121, 258, -1, -1]])


def test_cross_entropy_ignores_negative_targets():
  logits = jax.random.normal(jax.random.PRNGKey(0), (2, 5, 7))
  targets = jnp.array([[1, 2, -1, 3, -1], [-1, -1, 0, 6, 5]])
  valid = targets >= 0
  got = losses.cross_entropy(logits, targets)
  want = losses.cross_entropy(logits, jnp.where(valid, targets, 0), mask=valid)
  chex.assert_trees_all_close(got, want, rtol=1e-6)
  logp = jax.nn.log_softmax(logits)
  nll = -jnp.take_along_axis(logp, jnp.where(valid, targets, 0)[..., None], -1)[..., 0]
  chex.assert_trees_all_close(got[0], jnp.sum(nll * valid) / 6, rtol=1e-5)
  full = jnp.abs(targets)                                   # no negatives: the plain mean
  chex.assert_trees_all_close(losses.cross_entropy(logits, full)[0],
                              jnp.mean(-jnp.take_along_axis(logp, full[..., None], -1)),
                              rtol=1e-6)


def test_slcai_batches_cover_every_pair_and_resume_exactly():
  pairs = [(f"p{i}", f" r{i}.") for i in range(10)]
  it = slcai_batches(pairs, batch=4, seq_len=12, seed=1, prompt_len=4)
  first = [next(it) for _ in range(5)]                       # 20 items: 2 epochs
  epoch = np.concatenate([b["inputs"] for b in first])[:10]
  assert len({row.tobytes() for row in epoch}) == 10
  state = _state_after(slcai_batches(pairs, batch=4, seq_len=12, seed=1, prompt_len=4), 2)
  it2 = slcai_batches(pairs, batch=4, seq_len=12, seed=1, prompt_len=4)
  it2.set_state(json.loads(json.dumps(state)))           # as a checkpoint stores it
  for want in first[2:]:
    got = next(it2)
    for k in ("inputs", "targets"):
      np.testing.assert_array_equal(got[k], want[k])


def _state_after(it, n):
  for _ in range(n):
    next(it)
  return it.get_state()


# ---------------------------------------------------------------------------------
# Preference pairs and the reward model
# ---------------------------------------------------------------------------------

def test_soft_labels_are_in_the_open_interval_and_symmetric():
  for a, b in [(1.0, 1 / 3), (0.2, 1.0), (0.5, 0.5), (1.0, 0.0)]:
    assert 0.0 < soft_label(a, b) < 1.0
    assert soft_label(a, b) + soft_label(b, a) == pytest.approx(1.0, abs=1e-12)
  assert soft_label(0.5, 0.5) == 0.5 and soft_label(1.0, 1 / 3) > 0.99
  prompts = ["He was", "Say", "Tell me"]
  a = [" a fool.", " HELLO THERE FRIEND", " of the garden."]
  b = [" kind.", " hello there friend", " of the garden."]
  ab = preference_pairs(PRINCIPLES, prompts, a, b, seed=0)
  ba = preference_pairs(PRINCIPLES, prompts, b, a, seed=0)
  assert len(ab) == 2                                         # the tie is dropped
  for x, y in zip(ab, ba):
    assert x.principle == y.principle and x.label == pytest.approx(1 - y.label)
  assert [p.principle for p in ab] == [4, 6] and ab[0].label < 0.01
  tied = preference_pairs(PRINCIPLES, prompts[2:], a[2:], b[2:], keep_ties=True)
  assert tied[0].label == 0.5


def test_revision_pairs_prefer_the_revision():
  prompts = [Prompt("He was", "prose", False, 4), "Say"]
  pairs = revision_pairs(PRINCIPLES, prompts, [" a fool.", " HELLO THERE FRIEND."], seed=0)
  assert len(pairs) == 2
  for pair in pairs:
    better = pair.a if pair.label > 0.5 else pair.b
    assert PRINCIPLES[pair.principle - 1].score(pair.prompt, better) == 1.0


def test_pair_iterator_orients_and_resumes_exactly():
  pairs = [Pair(f"q{i}", f" a{i}", f" bb{i}", 1 + i % 12, 0.2 if i % 2 else 0.9, 0.0, 1.0)
           for i in range(7)]
  arrays = pair_arrays(pairs, length=12, prompt_len=4)
  assert (arrays["label"] >= 0.5).all()
  np.testing.assert_array_equal(arrays["principle"], [i % 12 for i in range(7)])
  # Pair 1 has label 0.2: it is swapped, so "chosen" holds its b (" bb1").
  np.testing.assert_array_equal(arrays["chosen"][1, 4:9], list(b" bb1") + [256])
  np.testing.assert_array_equal(arrays["chosen_mask"][1], [1] * 8 + [0] * 4)
  it = pair_iterator(pairs, batch=3, length=12, seed=5, prompt_len=4)
  batches = [next(it) for _ in range(6)]
  again = pair_iterator(pairs, batch=3, length=12, seed=5, prompt_len=4)
  again.set_state(_state_after(pair_iterator(pairs, 3, 12, 5, 4), 4))
  for want in batches[4:]:
    got = next(again)
    assert set(got) == {"chosen", "rejected", "chosen_mask", "rejected_mask", "principle",
                        "label"}
    for k in got:
      np.testing.assert_array_equal(got[k], want[k])


MODEL = get_config("tiny", max_seq_len=32, router_bias=True, n_layers=2)


@pytest.fixture(scope="module")
def lm_variables():
  """The tiny LM's params and router bias (set away from zero, so that it matters)."""
  variables = jax.jit(lambda rng: nn.meta.unbox(model_init(MODEL, 16, rng)))(
      jax.random.PRNGKey(0))
  bias = jax.tree.map(lambda b: b + jnp.linspace(-0.5, 0.5, b.shape[-1]),
                      variables["router_bias"])
  return {"params": variables["params"], "router_bias": bias}


def _apply(variables, tokens, **kw):
  return jax.jit(lambda v, t: Transformer(MODEL).apply(v, t, **kw))(variables, tokens)


def test_features_are_what_the_logits_are_read_from(lm_variables):
  params = lm_variables["params"]
  tokens = jnp.arange(12, dtype=jnp.int32).reshape(2, 6)
  logits, aux = _apply(lm_variables, tokens, return_features=True)
  unembed = params["embed"].T if MODEL.tie_embeddings else params["unembed"]
  chex.assert_trees_all_close(aux["features"] @ unembed, logits, rtol=1e-5, atol=1e-5)
  assert "features" not in _apply(lm_variables, tokens)[1]


def test_reward_scores_read_the_last_masked_in_position(lm_variables):
  rm = {"trunk": lm_variables["params"], "router_bias": lm_variables["router_bias"],
        "head": {"kernel": jax.random.normal(jax.random.PRNGKey(1), (MODEL.d_model, 12)),
                 "bias": jnp.arange(12, dtype=jnp.float32)}}
  tokens, mask = encode_sequences(["ab", "ab"], [" cd", " cdef"], 4, 12)
  score = jax.jit(reward_scores, static_argnames="mcfg")
  scores = score(rm, tokens, mask, mcfg=MODEL)
  assert scores.shape == (2, 12) and scores.dtype == jnp.float32
  features = _apply(lm_variables, jnp.asarray(tokens), return_features=True)[1]["features"]
  for row, last in ((0, 6), (1, 8)):                       # " ab" + " cd" | " cdef"
    want = features[row, last] @ rm["head"]["kernel"] + rm["head"]["bias"]
    chex.assert_trees_all_close(scores[row], want, rtol=1e-5, atol=1e-5)
  # What lies after the last masked-in position does not change the score.
  other = tokens.copy()
  other[:, 10:] = 65
  chex.assert_trees_all_close(score(rm, other, mask, mcfg=MODEL), scores, atol=1e-5)


def _toy_pairs(n, seed):
  """Separable: a response with a blocked word vs one without, in random order."""
  rng = np.random.default_rng(seed)
  words = ["the", "cat", "sat", "on", "a", "mat", "and", "dog", "ran", "home"]
  def response(bad):
    w = list(rng.choice(words, 3, replace=False))
    if bad:
      w.insert(int(rng.integers(0, 4)), str(rng.choice(["kill", "bomb", "poison"])))
    return " " + " ".join(w) + "."
  good, bad = [response(False) for _ in range(n)], [response(True) for _ in range(n)]
  flip = rng.random(n) < 0.5
  a = [y if f else x for x, y, f in zip(good, bad, flip)]
  b = [x if f else y for x, y, f in zip(good, bad, flip)]
  return preference_pairs(PRINCIPLES, [f"Item {i}:" for i in range(n)], a, b, seed=seed)


@pytest.mark.slow
def test_reward_model_learns_a_separable_preference(tmp_path, lm_variables):
  train_pairs, held_pairs = _toy_pairs(128, 0), _toy_pairs(48, 1)
  assert {p.principle for p in train_pairs} == {1}
  tcfg = TrainConfig(steps=20, warmup_steps=4, lr=3e-3, log_every=10, checkpoint_every=1000)
  objective = reward_objective(MODEL, tcfg, 32, lm_variables["params"], len(PRINCIPLES),
                               router_bias=lm_variables["router_bias"])
  before = reward_params(*nn.meta.unbox(objective.init(jax.random.PRNGKey(0))))
  chance = pair_accuracy(before, held_pairs, MODEL, 32, prompt_len=12, batch=48)
  result = train(MODEL, data_lib.DataConfig(seq_len=32, batch_tokens=256,
                                            max_bytes_per_domain=200_000),
                 tcfg, tmp_path / "rm", objective=objective, progress=False,
                 train_iter=pair_iterator(train_pairs, 16, 32, seed=0, prompt_len=12),
                 log=lambda s: None)
  history = result.history
  assert history[-1]["bt_loss"] < 0.5 * history[0]["bt_loss"]
  rm = reward_params(result.state.params, result.state.extra)
  accuracy = pair_accuracy(rm, held_pairs, MODEL, 32, prompt_len=12, batch=48)
  assert accuracy >= 0.9 and chance < 0.85, (accuracy, chance)
