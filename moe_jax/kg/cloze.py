"""Relational cloze data: graph facts as sentences, split so that some facts are
seen only in the graph.

    (JSONDecoder, inherits_from, object)
       -> prompt "class JSONDecoder inherits from "   answer "object."
    (dumps, defined_in, json)    -> "function dumps is defined in module json."
    (Lady Macbeth, appears_in, Macbeth) -> "Lady Macbeth is a character in Macbeth."

Facts are chosen per relation among heads with exactly one tail of that relation
(one right answer) and an unambiguous name, and among tails that answer at least
`min_support` such facts (an answer the LM can learn to spell). A hash of each
fact puts it in `heldout` (never written in training text, but its edge stays in
the graph) or `train`; a held-out fact whose answer would then appear in no
training sentence moves to train, so every held-out answer is spellable.
"""
from __future__ import annotations

import collections
import dataclasses
import hashlib

import numpy as np

from moe_jax.kg.graph import KnowledgeGraph

TEMPLATES = {
    "inherits_from": ("class {h} inherits from ", "{t}."),
    "defined_in": ("function {h} is defined in module ", "{t}."),
    "appears_in": ("{h} is a character in ", "{t}."),
}
HEAD_TYPES = {"inherits_from": "class", "defined_in": "function",
              "appears_in": "character"}


@dataclasses.dataclass(frozen=True)
class Fact:
  relation: str
  head: int       # entity ids
  tail: int
  prompt: str
  answer: str

  @property
  def sentence(self) -> str:
    return self.prompt + self.answer


def _hash01(text: str) -> float:
  return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") / 2**64


def select_facts(graph: KnowledgeGraph, linkable: set[str], *, per_relation: int,
                 min_support: int = 4, max_answer_chars: int = 16,
                 max_sentence_chars: int | None = None,
                 relations=tuple(TEMPLATES)) -> list[Fact]:
  """Up to `per_relation` facts of each relation, in a fixed hash order; with
  `max_sentence_chars`, only facts whose sentence fits (one row of the model)."""
  out = []
  names = graph.names
  for rel in relations:
    if rel not in graph.relations:
      continue
    prompt, answer = TEMPLATES[rel]
    fits = lambda h, t: max_sentence_chars is None or len(
        prompt.format(h=names[h]) + answer.format(t=names[t])) <= max_sentence_chars
    pairs = graph.facts(rel)
    heads = collections.Counter(pairs[:, 0].tolist())
    name_count = collections.Counter(names[h] for h in heads)
    cands = [(h, t) for h, t in pairs.tolist()
             if heads[h] == 1 and name_count[names[h]] == 1 and names[h] in linkable
             and graph.types[h] == HEAD_TYPES[rel] and len(names[t]) <= max_answer_chars
             and names[h] != names[t] and fits(h, t)]
    support = collections.Counter(t for _, t in cands)
    cands = [(h, t) for h, t in cands if support[t] >= min_support]
    cands.sort(key=lambda p: _hash01(f"{rel}/{graph.keys[p[0]]}"))
    # Keep answers that still have min_support facts after the cap.
    cands = cands[:per_relation]
    support = collections.Counter(t for _, t in cands)
    out += [Fact(rel, h, t, prompt.format(h=names[h]), answer.format(t=names[t]))
            for h, t in cands if support[t] >= 2]
  return out


def split_facts(facts: list[Fact], heldout_fraction: float
                ) -> tuple[list[Fact], list[Fact]]:
  """(train, heldout) by a hash of each fact; see the module docstring."""
  flags = [_hash01(f"split/{f.relation}/{f.head}") < heldout_fraction for f in facts]
  answers_in_train = collections.Counter(f.answer for f, h in zip(facts, flags) if not h)
  for i, (f, held) in enumerate(zip(facts, flags)):
    if held and answers_in_train[f.answer] == 0:
      flags[i] = False
      answers_in_train[f.answer] += 1
  return ([f for f, h in zip(facts, flags) if not h],
          [f for f, h in zip(facts, flags) if h])


def pack_sentences(sentences: list[str], seq_len: int, rng: np.random.Generator
                   ) -> list[str]:
  """One epoch: shuffled sentences ('\\n'-terminated) packed greedily into texts of
  at most seq_len bytes (the BOS token takes the first position)."""
  texts, current = [], ""
  for i in rng.permutation(len(sentences)):
    s = sentences[i] + "\n"
    if current and len(current.encode()) + len(s.encode()) > seq_len:
      texts.append(current)
      current = ""
    current += s
  if current:
    texts.append(current)
  return texts
